"""Input checks shared by the model, generation, loaders and `interp`: one helper per kind.

Every check runs on concrete values only (under `jax.jit` the values are tracers and the
checks that need values are skipped; shapes and dtypes are still checked, since they are
static). Each error names the argument, the shape or index, and what was expected.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

__all__ = [
    "NonFiniteError",
    "check_finite",
    "check_finite_leaves",
    "check_head_pairs",
    "check_index",
    "check_indices",
    "check_length",
    "check_model_file",
    "check_padding_mask",
    "check_rows",
    "check_token_ids",
    "check_tokens",
    "is_concrete",
    "is_index",
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


def is_index(x: Any) -> bool:
    """Whether `x` is one index under the library's one rule: a Python or numpy integer, or a
    0-d integer array. Bools and floats are not indices (`True` would mean 1, `4.9` 4)."""
    if isinstance(x, bool | np.bool_):
        return False
    if isinstance(x, int | np.integer):
        return True
    return (hasattr(x, "shape") and hasattr(x, "dtype") and tuple(x.shape) == ()
            and np.issubdtype(np.dtype(x.dtype), np.integer))


def _not_index(value: Any, what: str) -> TypeError:
    dtype = getattr(value, "dtype", None)
    if isinstance(value, bool | np.bool_) or dtype == np.bool_:
        kind = "a bool"
    else:
        kind = str(dtype) if dtype is not None else type(value).__name__
    return TypeError(f"{what} index must be an integer; got {value!r} ({kind})")


def check_index(index: Any, size: int | None, what: str) -> int:
    """`index` as an int in `[0, size)`; negative values count from the end (as in Python).
    The one rule for every index argument (layers, heads, positions, worlds): an integer
    (`is_index`), inside `[-size, size)`; `size=None` checks the type only."""
    if not is_index(index):
        raise _not_index(index, what)
    i = int(index)
    if size is None:
        return i
    if not -size <= i < size:
        raise ValueError(f"{what} index {i} is out of range for {size} {what}s")
    return i % size


def check_indices(
    values: Any, size: int | None, what: str, *, distinct: bool = True
) -> tuple[int, ...]:
    """A sequence of indices (list, tuple or 1-D integer array), each by `check_index`'s rule,
    as a tuple of ints (non-negative when `size` is given); duplicates are refused unless
    `distinct=False`."""
    if isinstance(values, str | bytes) or is_index(values) or isinstance(values, bool | float) \
            or not isinstance(values, Iterable) or getattr(values, "ndim", 1) != 1:
        raise TypeError(f"{what}s must be a sequence of integer indices; got {values!r}")
    out = tuple(check_index(v, size, what) for v in values)
    if distinct and len(set(out)) != len(out):
        raise ValueError(f"{what} indices {list(out)} contain duplicates")
    return out


def check_head_pairs(
    pairs: Any, num_layers: int, num_heads: int, what: str = "head"
) -> list[tuple[int, int]]:
    """`(layer, head)` pairs (longer tuples, such as `(layer, head, score)`, keep their first
    two entries), each index by `check_index`'s rule."""
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Iterable):
        raise TypeError(f"{what}s must be a sequence of (layer, head) pairs; got {pairs!r}")
    out = []
    for k, pair in enumerate(pairs):
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence | np.ndarray) \
                or len(pair) < 2:
            raise TypeError(f"{what} {k} must be a (layer, head) pair; got {pair!r}")
        out.append((check_index(pair[0], num_layers, "layer"),
                    check_index(pair[1], num_heads, "head")))
    return out


def check_rows(table: Any, what: str) -> None:
    """A row table stored in a model (a rewiring source, a linearisation point): a 1-D integer
    array whose values are rows `0 .. len - 1` of the batch it indexes (checked when
    concrete). Unlike index arguments, a table holds no negative values: -1 would read the
    last row of whatever batch runs."""
    dtype = getattr(table, "dtype", None)
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer) or dtype == np.bool_:
        raise TypeError(f"{what} must be an integer array of batch rows; got "
                        f"{dtype if dtype is not None else type(table).__name__}")
    if table.ndim != 1:
        raise ValueError(f"{what} must be 1-D [batch]; got shape {tuple(table.shape)}")
    if is_concrete(table):
        host = np.asarray(table)
        bad = np.flatnonzero((host < 0) | (host >= host.size))
        if bad.size:
            raise ValueError(f"{what} holds row {int(host[bad[0]])} at index {int(bad[0])}; "
                             f"its {host.size} entries must be rows 0..{host.size - 1}")


def check_token_ids(ids: Any, vocab_size: int, what: str) -> None:
    """Token ids used as targets (any shape): integers inside the vocabulary `[0, vocab)`
    (checked when concrete). Out-of-range ids would be clamped or wrapped by the gathers."""
    dtype = getattr(ids, "dtype", None)
    if dtype is None:
        ids = np.asarray(ids)
        dtype = ids.dtype
    if not np.issubdtype(np.dtype(dtype), np.integer) or dtype == np.bool_:
        raise TypeError(f"{what} must be integer token ids; got {dtype}")
    if is_concrete(ids):
        host = np.asarray(ids)
        bad = np.argwhere((host < 0) | (host >= vocab_size))
        if bad.size:
            where = "" if host.ndim == 0 else f" at {list(map(int, bad[0]))}"
            raise ValueError(f"{what} {int(host[tuple(bad[0])])}{where} is outside the "
                             f"vocabulary [0, {vocab_size})")


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


def _roots(directory: Path) -> list[Path]:
    """Where a model directory's files may live once symlinks are resolved: the directory,
    and for a Hugging Face Hub snapshot (`.../snapshots/<commit>`, whose files are links into
    the repo's `blobs`) that repo's `blobs` folder."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def check_model_file(directory: str | os.PathLike, name: Any, what: str) -> Path:
    """The file `name` of a model directory, refused by name unless it is a relative path to a
    regular file inside `directory` (symlinks resolved; a Hub snapshot's blobs count as
    inside). Nothing is opened: a FIFO would hang a reader, a path outside the directory
    would read another file. `what` names where the name came from."""
    directory = Path(directory)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{directory}: {what} must be a file name; got {name!r}")
    pure = PurePath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{directory}: {what} {name!r} points outside the model directory; "
                         f"only files inside it are read")
    path = directory / pure
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in _roots(directory)):
        raise ValueError(f"{directory}: {what} {name!r} is a link to {resolved}, outside the "
                         f"model directory; only files inside it are read (copy the file in)")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise ValueError(f"{directory}: {what} {name!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"{directory}: cannot read {what} {name!r} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{directory}: {what} {name!r} is not a regular file (a directory, "
                         f"FIFO, socket or device); refusing to read it")
    return path
