"""What a family declaration is (`Family`) and what reads its fields (`FieldReader`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class FieldReader(Protocol):
    """Typed reads of one source's config fields (a `config.json` object, a GGUF file's
    metadata under its architecture's prefix); each refusal names the source and the field."""

    source: str

    def has(self, name: str) -> bool: ...

    def count(self, name: str, default: Any = ...) -> int: ...

    def number(self, name: str, default: Any = ..., *, optional: bool = False) -> Any: ...

    def flag(self, name: str, default: bool) -> bool: ...

    def text(self, name: str, default: Any = ...) -> Any: ...

    def nested(self, name: str) -> FieldReader | None:
        """A reader of the object at `name` (None when absent)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """How a family's Hugging Face or GGUF files hold one leaf, where the schema's default
    does not say: the tensor names (`{i}` for the layer), their shapes for a config, and the
    conversion of the tensors read into our layout (a slice of a fused tensor, say)."""

    names: tuple[str, ...]
    shapes: Callable[[Any], list[tuple[int, ...]]]
    to_ours: Callable[[list[Any], Any], Any]


def _dim(config: Any, spec: str | int) -> int:
    """A size named by config attributes and integers joined by `*` (`3*num_heads*head_dim`)."""
    size = 1
    for part in str(spec).split("*"):
        size *= int(part) if part.isdigit() else getattr(config, part)
    return size


def tensor(name: str, *dims: str | int, to_ours: Callable[[Any, Any], Any] | None = None
           ) -> Stored:
    """One stored tensor of shape `dims` (each a `_dim` spec), converted by `to_ours(array,
    config)` (taken as it is by default)."""
    return Stored((name,), lambda c: [tuple(_dim(c, d) for d in dims)],
                  lambda stored, c: stored[0] if to_ours is None else to_ours(stored[0], c))


@dataclasses.dataclass(frozen=True)
class Family:
    """One family: `defaults` hold for every model of it (config fields); `from_hf(fields,
    sizes)` and `from_gguf(fields, sizes)` read the rest from a `config.json` or from GGUF
    metadata, given the sizes every family shares (layers, widths, heads, vocabulary)."""

    name: str
    hf_model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...]
    defaults: Mapping[str, Any]
    from_hf: Callable[[FieldReader, Mapping[str, int]], dict[str, Any]]
    from_gguf: Callable[[FieldReader, Mapping[str, int]], dict[str, Any]]
    # llama.cpp's converter interleaves the halves of each query and key head of Llama
    # architectures for its rotary kernel; loading undoes it (`unpermute_rotary`).
    gguf_rotary_permuted: bool = False
    # The sizes from `config.json` where its names differ from Llama's (GPT-2's n_embd, ...).
    hf_sizes: Callable[[FieldReader], dict[str, int]] | None = None
    # Leaves whose Hugging Face names or layout differ from the schema's default, by path.
    hf_layout: Mapping[str, Stored] = dataclasses.field(default_factory=dict)
    # Leaves whose GGUF names or layout differ from the schema's default (a fused q/k/v).
    gguf_layout: Mapping[str, Stored] = dataclasses.field(default_factory=dict)
    # Stored tensors that no leaf reads and that hold nothing of the model (cached masks).
    hf_ignored: Callable[[str], bool] = lambda name: False
    # Tensors a loaded transformers model names otherwise than its files: {memory: file}.
    hf_in_memory: Mapping[str, str] = dataclasses.field(default_factory=dict)


def unpermute_rotary(w: Any, heads: int) -> Any:
    """A `[heads * head_dim, in]` query or key matrix from llama.cpp's interleaved rotary
    layout back to the split-half layout of Hugging Face (the inverse of its converter's
    `permute`; a `[heads * head_dim]` bias likewise)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
