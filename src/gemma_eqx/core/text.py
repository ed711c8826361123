"""What the library asks of a tokenizer: `formats.tokenizer.Tokenizer` has it, and so can any
stand-in (a test's character tokenizer, a Hugging Face tokenizer wrapped in a few lines)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TokenizerLike(Protocol):
    """What the library asks of a tokenizer (`Tokenizer` has it; so can a test stand-in):
    special ids, `encode` without BOS, `decode`, pieces, and left/right-padded batches."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = True, pad_side: str = "left"
    ) -> tuple[Any, Any]: ...
