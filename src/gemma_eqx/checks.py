"""Input checks shared by the model, generation, loaders and `interp`: one helper per kind.

Every check runs on concrete values only (under `jax.jit` the values are tracers and the
checks that need values are skipped; shapes and dtypes are still checked, since they are
static). Each error names the argument, the shape or index, and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

__all__ = [
    "NonFiniteError",
    "check_finite",
    "check_finite_leaves",
    "check_index",
    "check_length",
    "check_padding_mask",
    "check_tokens",
    "is_concrete",
]


class NonFiniteError(ValueError):
    """An array (a weight, a mask, a patch, a sampling parameter) holds NaN or infinity."""


def is_concrete(x: Any) -> bool:
    """Whether `x` holds values that can be read now (not a tracer inside `jit` or `grad`)."""
    return not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if hasattr(x, "shape") else type(x).__name__


def _where(index: tuple[int, ...], axes: tuple[str, ...] | None) -> str:
    if axes is None or len(axes) != len(index):
        return str(list(index))
    return "[" + ", ".join(f"{a} {i}" for a, i in zip(axes, index, strict=True)) + "]"


def check_tokens(tokens: Any, vocab_size: int) -> None:
    """A clear error for tokens that are not `[batch, seq]` integer ids inside the vocabulary
    (ids are checked when concrete; traced ids are checked by `eqx.error_if` in the model)."""
    if not hasattr(tokens, "ndim") or tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D integer array [batch, seq]; got shape "
                         f"{_shape(tokens)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must have an integer dtype; got {tokens.dtype}")
    if is_concrete(tokens):
        host = np.asarray(tokens)
        bad = np.argwhere((host < 0) | (host >= vocab_size))
        if bad.size:
            b, s = bad[0]
            raise ValueError(
                f"token id {int(host[b, s])} at [batch {b}, position {s}] is outside the "
                f"vocabulary [0, {vocab_size})"
            )


def check_padding_mask(
    padding_mask: Any, shape: tuple[int, ...], *, name: str = "padding_mask"
) -> Bool[Array, "batch seq"]:
    """`padding_mask` as a bool array of exactly `shape` (True = real token).

    Never broadcast, never cast: an integer or float mask is refused (an integer mask holding
    2 would otherwise be taken as anything). A row with no real token is refused when
    concrete: it has no position to predict from, so all its outputs would be meaningless
    (under `jit` such a row gives finite, meaningless values; drop it from the batch instead).
    """
    if not hasattr(padding_mask, "shape"):
        padding_mask = np.asarray(padding_mask)
    if tuple(padding_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of tokens {tuple(shape)}; got "
                         f"{tuple(padding_mask.shape)} (masks are never broadcast)")
    if np.dtype(padding_mask.dtype) != np.bool_:
        raise TypeError(f"{name} must be a bool array (True = real token); got "
                        f"{padding_mask.dtype} (use mask == 1 if it holds 0s and 1s)")
    if is_concrete(padding_mask):
        host = np.asarray(padding_mask)
        empty = np.flatnonzero(~host.any(axis=-1))
        if empty.size:
            raise ValueError(f"{name} row {int(empty[0])} marks no real token (all padding); "
                             f"such a row has nothing to compute: drop it from the batch")
    return jnp.asarray(padding_mask)


def check_length(length: int, context_length: int, what: str) -> None:
    """Refuse `length` tokens past the model's context before any work is done."""
    if length > context_length:
        raise ValueError(f"{what} needs {length} positions, more than the model's context of "
                         f"{context_length} tokens")


def check_index(index: Any, size: int, what: str) -> int:
    """`index` as an int in `[0, size)`; negative values count from the end."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer) and not (
        hasattr(index, "shape") and index.shape == () and np.issubdtype(index.dtype, np.integer)
    ):
        raise TypeError(f"{what} index must be an integer; got {index!r}")
    i = int(index)
    if not -size <= i < size:
        raise ValueError(f"{what} index {i} is out of range for {size} {what}s")
    return i % size


def check_finite(x: Any, name: str, axes: tuple[str, ...] | None = None) -> None:
    """A `NonFiniteError` naming the first NaN or infinity of `x` (when concrete)."""
    if not is_concrete(x):
        return
    if isinstance(x, int | float):
        if not math.isfinite(x):
            raise NonFiniteError(f"{name} must be finite; got {x}")
        return
    host = np.asarray(x)
    if not np.issubdtype(host.dtype, np.inexact):
        return
    if host.ndim == 0:  # np.argwhere finds nothing in a 0-d array
        if not np.isfinite(host):
            raise NonFiniteError(f"{name} must be finite; got {host}")
        return
    bad = np.argwhere(~np.isfinite(host))
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        raise NonFiniteError(
            f"{name} holds {host[index]} at {_where(index, axes)} ({len(bad)} non-finite "
            f"value(s) of {host.size}); interventions must be finite"
        )


@jax.jit
def _nonfinite_counts(arrays: dict[str, Array]) -> dict[str, Array]:
    return {p: jnp.sum(~jnp.isfinite(a)) for p, a in arrays.items()}


def check_finite_leaves(arrays: Mapping[str, Any], source: str) -> None:
    """A `NonFiniteError` naming the first weight leaf (by path) holding NaN or infinity.

    One compiled reduction over all leaves, one transfer of the counts; sharded leaves are
    reduced where they live.
    """
    floating = {p: a for p, a in arrays.items()
                if is_concrete(a) and jnp.issubdtype(a.dtype, jnp.inexact)}
    if not floating:
        return
    counts = jax.device_get(_nonfinite_counts(floating))
    bad = [(p, int(n)) for p, n in counts.items() if n]
    if bad:
        path, n = bad[0]
        size = int(np.prod(arrays[path].shape))
        more = f" (and {len(bad) - 1} more leaves)" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{source}: weight {path} holds {n} NaN/inf value(s) of {size}{more}; the file is "
            f"corrupted or was saved from a diverged run (pass check_finite=False to load it "
            f"anyway)"
        )
