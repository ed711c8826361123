"""Gemma's SentencePiece tokenizer, from a Kaggle `tokenizer.model` or rebuilt from a GGUF file."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from jaxtyping import Array, Bool, Int

from .atomic import replace_file

_WHITESPACE_MARK = "\u2581"  # SentencePiece's spelling of a space inside a piece


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


class Tokenizer:
    """A SentencePiece processor plus the serialised `ModelProto` it was built from."""

    def __init__(self, proto: bytes, *, source: str = "SentencePiece model"):
        """Load a serialised `ModelProto`; `source` names it in error messages."""
        self._proto = bytes(proto)
        self.source = source
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with terse text
            raise ValueError(f"{source}: not a readable SentencePiece model ({e})") from None
        self._sp = processor

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_proto(cls, proto: bytes, *, source: str = "SentencePiece model") -> Tokenizer:
        """From the bytes of a serialised SentencePiece `ModelProto` (what `to_proto` gives)."""
        return cls(proto, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """From a SentencePiece model file, e.g. Kaggle's `tokenizer.model`."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        return cls(data, source=str(path))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuilt from the vocabulary a GGUF file carries in its metadata."""
        from .gguf import read_gguf_header  # the GGUF reader is only needed here

        return cls.from_gguf_metadata(read_gguf_header(path).metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
    ) -> Tokenizer:
        """Rebuilt from GGUF metadata (`read_gguf(...).metadata`), without re-reading the file."""
        return cls(proto_from_gguf_metadata(metadata, source=source), source=source)

    def to_proto(self) -> bytes:
        """The serialised SentencePiece `ModelProto`; `from_proto` restores the tokenizer."""
        return self._proto

    def save(self, path: str | os.PathLike) -> Path:
        """Write the `ModelProto` as a `tokenizer.model`-style file (to a temporary name, then
        renamed, so a reader never sees half a file). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_file(path) as tmp:
            tmp.write_bytes(self._proto)
        return path

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The padding id (-1 if the model defines none)."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece, or `unk_id` if the vocabulary has no such piece."""
        return self._sp.PieceToId(piece)

    def _check_id(self, token_id: int, where: str = "") -> None:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(
                f"token id {int(token_id)}{where} is outside the vocabulary [0, {self.vocab_size})"
            )

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int] | Int[Array, " seq"] | np.ndarray) -> str:
        """Text of a sequence of ids; control tokens (BOS, EOS, padding) decode to nothing."""
        flat = np.asarray(ids)
        if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(
                f"decode expects a 1-D sequence of integer ids; got shape {flat.shape}, "
                f"dtype {flat.dtype}"
            )
        bad = np.flatnonzero((flat < 0) | (flat >= self.vocab_size))
        if bad.size:
            self._check_id(int(flat[bad[0]]), f" at position {int(bad[0])}")
        return self._sp.DecodeIds(flat.astype(np.int64).tolist())

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = True,
        pad_side: str = "left",  # "left" or "right"; a str so bad values get our ValueError
    ) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
        """Padded `[batch, seq]` token ids and a mask that is True on real tokens.

        Left padding (the default) lines up every sequence's last token, as generation wants;
        the model's default positions count real tokens only, so either side gives the same
        logits on real tokens. Padding uses `pad_id` (0 if the model has none).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, not one string")
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right'; got {pad_side!r}")
        if len(texts) == 0:
            raise ValueError("encode_batch needs at least one text")
        rows = [([self.bos_id] if add_bos else []) + self.encode(t) for t in texts]
        length = max(len(r) for r in rows)
        tokens = np.full((len(rows), length), max(self.pad_id, 0), np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if pad_side == "left" else slice(0, len(row))
            tokens[i, span] = row
            mask[i, span] = True
        return jnp.asarray(tokens), jnp.asarray(mask)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def proto_from_gguf_metadata(
    metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
) -> bytes:
    """A serialised SentencePiece `ModelProto` rebuilt from a GGUF file's tokenizer metadata.

    GGUF keeps SentencePiece's pieces, scores and types but not the model's settings; Gemma's
    are BPE with byte fallback and digit splitting, an identity normalizer, no dummy prefix and
    escaped whitespace. llama.cpp's conversion also changed two things that are undone here:
    `<unk>` is marked CONTROL (SentencePiece needs exactly one UNKNOWN piece), and the
    whitespace-only user-defined pieces hold real spaces where SentencePiece writes `▁`.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf; import on use

    from .gguf import ARCHITECTURES

    arch = metadata.get("general.architecture", "gemma")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {arch!r} is not a Gemma model; only Gemma vocabularies "
            "can be rebuilt (their SentencePiece settings are not stored in the file)"
        )
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer (no 'tokenizer.ggml.model')")
    if model != "llama":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') "
            "vocabularies can be rebuilt"
        )
    try:
        pieces = metadata["tokenizer.ggml.tokens"]
        scores = np.asarray(metadata["tokenizer.ggml.scores"], np.float32)
        types = np.asarray(metadata["tokenizer.ggml.token_type"], np.int64)
    except KeyError as e:
        raise ValueError(f"{source}: GGUF metadata lacks {e.args[0]!r}") from None
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(
            f"{source}: {len(pieces)} tokens but {len(scores)} scores and {len(types)} types"
        )
    special = {}
    for name, default in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        value = metadata.get(f"tokenizer.ggml.{name}_token_id", default)
        if not 0 <= int(value) < len(pieces):
            raise ValueError(f"{source}: {name} token id {value} is outside the vocabulary")
        special[name] = int(value)

    types = types.copy()
    types[types == pb.ModelProto.SentencePiece.UNKNOWN] = pb.ModelProto.SentencePiece.CONTROL
    types[special["unknown"]] = pb.ModelProto.SentencePiece.UNKNOWN
    proto = pb.ModelProto()
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    for piece, score, kind in zip(pieces, scores.tolist(), types.tolist(), strict=True):
        if kind == user_defined and piece and not piece.strip(" "):
            piece = _WHITESPACE_MARK * len(piece)
        proto.pieces.add(piece=piece, score=score, type=kind)

    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id = special["unknown"], special["bos"]
    trainer.eos_id, trainer.pad_id = special["eos"], special["padding"]
    # SentencePiece finds BOS, EOS and padding by these names, not by the ids above.
    trainer.unk_piece, trainer.bos_piece = pieces[special["unknown"]], pieces[special["bos"]]
    trainer.eos_piece, trainer.pad_piece = pieces[special["eos"]], pieces[special["padding"]]

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
