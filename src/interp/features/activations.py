"""Activations to train dictionaries on: streamed from the model (`stream_activations`), or
cached on disk so that several dictionaries train on one pass of the model.

The format (`gemma-eqx-activations/1`), one folder:

- `meta.json`: `format`, `model` (its config name), `points` (`[site, layer]` pairs),
  `d` (the width of each point), `split`, `length` (tokens per window), `sequences` (windows
  per forward pass), `rows_per_batch` (`sequences x (length - 1)`: the BOS is left out),
  `batches` (forward passes the cache holds when complete), `batches_written`, `complete`,
  `windows_sha256` (of the split's token ids);
- one `<site>.<layer>.npy` per point: float32 `[batches x rows_per_batch, d]`, rows in the
  order `stream_activations` yields them (window by window, token by token).

`write_activation_cache` fills it from the model, resumably: `meta.json` is replaced (one
rename) only after the rows it counts are flushed, so a killed run loses at most the batches
since the last flush and a rerun with the same arguments carries on from there. One writer at
a time (an OS lock on the folder). `open_activation_cache` checks every field and every
file's shape before a row is read; `CachedActivations.stream` yields the rows batch by batch
exactly as the model did, so `fit` trains from a cache to the same parameters as from the
model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from .dictionary import HookPoint

FORMAT = "gemma-eqx-activations/1"
META = "meta.json"


@eqx.filter_jit
def _activations(recorded: Any, tokens: Int[Array, "batch seq"], last: int
                 ) -> dict[str, Array]:
    """What `recorded`'s Records hold after block `last`: the blocks above it never run."""
    padding = jnp.ones(tokens.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    records: dict[str, Any] = {}
    x = recorded.embed(tokens, positions, padding, records)
    for i, block in enumerate(recorded.blocks[:last + 1]):
        x, _ = block(x, positions, padding, None, None, records, i)
    return records


def stream_activations(model: Any, windows: Any, points: Sequence[Any], *, sequences: int = 8,
                       split: str = "train", skip: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
    """For each batch of `sequences` token windows of `windows` (`interp.corpus.TokenWindows`),
    the activations at each hook point in `points`, `[rows, d]` float32, one row per token
    after the BOS (which is left out: its activations are outliers no dictionary should
    spend latents on). The forward stops after the last layer the points need; the first
    `skip` batches are passed over without running it (a resumed run)."""
    from ..capture import ActivationCache
    from ..install import add_interventions
    from ..interventions import Record

    per_layer: dict[int, list[Any]] = {}
    for point in points:
        per_layer.setdefault(point.layer, []).append(Record(point.site))
    recorded = add_interventions(model, per_layer)
    last = max(point.layer for point in points)
    for batch in itertools.islice(windows.batches(sequences, split), skip, None):
        records = _activations(recorded, jnp.asarray(batch), last)
        cache = ActivationCache(records, model.config, tuple(batch.shape))
        yield tuple(np.asarray(cache[p.site, p.layer][:, 1:], np.float32).reshape(
            -1, cache[p.site, p.layer].shape[-1]) for p in points)


def point_file(point: HookPoint) -> str:
    return f"{point.site}.{point.layer}.npy"


def windows_digest(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, np.int32).tobytes()).hexdigest()


@contextlib.contextmanager
def _writer_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ValueError(f"activation cache {folder} is being written by another "
                                 f"process; wait for it or use another folder") from None
            raise
        yield
    finally:
        os.close(fd)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    from gemma_eqx.core.atomic import replace_file

    with replace_file(folder / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


@dataclass(frozen=True)
class CachedActivations:
    """An opened activation cache: `arrays[point]` is a read-only memory map
    `[rows, d]`."""

    folder: Path
    meta: dict[str, Any]
    points: tuple[HookPoint, ...]
    arrays: dict[HookPoint, np.ndarray]

    @property
    def rows(self) -> int:
        return int(self.meta["batches"]) * int(self.meta["rows_per_batch"])

    @property
    def key(self) -> str:
        """What a training checkpoint records of its data: the model, points, windows and
        batching (not the folder, which may move)."""
        fields = {k: self.meta[k] for k in ("model", "points", "split", "length", "sequences",
                                             "batches", "windows_sha256")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def check_points(self, points: Sequence[HookPoint]) -> None:
        """Refuse, naming them, points this cache does not hold."""
        missing = [str(p) for p in points if p not in self.arrays]
        if missing:
            raise ValueError(f"activation cache {self.folder} holds "
                             f"{', '.join(map(str, self.points))}, not {', '.join(missing)}")

    def stream(self, points: Sequence[HookPoint], skip: int = 0
               ) -> Iterator[tuple[np.ndarray, ...]]:
        """The rows of `points`, one forward pass's worth at a time, as
        `stream_activations` yielded them; the first `skip` batches passed over."""
        self.check_points(points)  # now, not at the first row
        return self._rows(points, skip)

    def _rows(self, points: Sequence[HookPoint], skip: int) -> Iterator[tuple[np.ndarray, ...]]:
        size = int(self.meta["rows_per_batch"])
        for batch in range(skip, int(self.meta["batches"])):
            yield tuple(np.array(self.arrays[p][batch * size:(batch + 1) * size])
                        for p in points)


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    def bad(why: str) -> None:
        raise ValueError(f"activation cache {path}: {why}")

    if not isinstance(meta, dict):
        bad("must hold a JSON object")
    if meta.get("format") != FORMAT:
        bad(f"field 'format' is {meta.get('format')!r}, not {FORMAT!r}")
    for field in ("length", "sequences", "rows_per_batch", "batches"):
        value = meta.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(f"field '{field}' must be a positive integer; got {value!r}")
    written = meta.get("batches_written")
    if isinstance(written, bool) or not isinstance(written, int) or not \
            0 <= written <= meta["batches"]:
        bad(f"field 'batches_written' must be an integer in [0, {meta['batches']}]; got "
            f"{written!r}")
    if meta["rows_per_batch"] != meta["sequences"] * (meta["length"] - 1):
        bad(f"field 'rows_per_batch' ({meta['rows_per_batch']}) is not sequences x (length "
            f"- 1) = {meta['sequences'] * (meta['length'] - 1)}")
    points, widths = meta.get("points"), meta.get("d")
    if not isinstance(points, list) or not points or not isinstance(widths, list) or \
            len(widths) != len(points):
        bad("fields 'points' and 'd' must be lists of the same, non-zero length")
    for point, d in zip(points, widths, strict=True):
        if not (isinstance(point, list) and len(point) == 2):
            bad(f"a point must be [site, layer]; got {point!r}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            bad(f"field 'd' holds {d!r}, not a positive width")
    for field in ("model", "split", "windows_sha256"):
        if not isinstance(meta.get(field), str):
            bad(f"field '{field}' must be a string")
    if not isinstance(meta.get("complete"), bool):
        bad("field 'complete' must be true or false")
    return meta


def open_activation_cache(folder: str | os.PathLike, *, partial: bool = False
                          ) -> CachedActivations:
    """The cache in `folder`, every field of `meta.json` and every array's shape and dtype
    checked first. An unfinished cache is refused (rerun the writer to finish it) unless
    `partial`."""
    folder = Path(folder)
    path = folder / META
    try:
        meta = _check_meta(json.loads(path.read_text()), path)
    except FileNotFoundError:
        raise ValueError(f"{folder} is not an activation cache (no {META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"activation cache {path}: not a readable JSON file ({e})") from None
    if not meta["complete"] and not partial:
        raise ValueError(f"activation cache {folder} is unfinished ({meta['batches_written']} "
                         f"of {meta['batches']} batches): rerun the command that writes it")
    try:
        points = tuple(HookPoint(site, layer) for site, layer in meta["points"])
    except ValueError as e:
        raise ValueError(f"activation cache {path}: field 'points': {e}") from None
    arrays = {}
    rows = meta["batches"] * meta["rows_per_batch"]
    for point, d in zip(points, meta["d"], strict=True):
        file = folder / point_file(point)
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"activation cache {file}: not a readable .npy file ({e})") from None
        if array.dtype != np.float32 or array.shape != (rows, d):
            raise ValueError(f"activation cache {file}: holds {array.dtype} {array.shape}; "
                             f"{META} says float32 ({rows}, {d})")
        arrays[point] = array
    return CachedActivations(folder, meta, points, arrays)


def write_activation_cache(model: Any, windows: Any, points: Sequence[HookPoint],
                           folder: str | os.PathLike, *, rows: int | None = None,
                           sequences: int = 8, split: str = "train", flush_every: int = 32,
                           show_progress: bool | None = None) -> CachedActivations:
    """Run `model` on `windows`' `split` (`interp.corpus.TokenWindows`) and store the
    activations at `points` in `folder` (the module docstring's format): enough forward passes
    of `sequences` windows for `rows` rows (default: the whole split). A folder holding an
    unfinished cache with the same arguments is carried on; one made with other arguments,
    or holding files this writer did not make, is refused before any work."""
    from gemma_eqx.core.runtime import progress

    folder = Path(folder)
    points = list(dict.fromkeys(points))
    if not points:
        raise ValueError("an activation cache needs at least one hook point")
    for point in points:
        if not 0 <= point.layer < len(model.blocks):
            raise ValueError(f"hook point {point}: the model has layers 0..."
                             f"{len(model.blocks) - 1}")
    split_windows = windows.train if split == "train" else windows.held_out
    length = int(split_windows.shape[1])
    per_batch = sequences * (length - 1)
    available = len(split_windows) // sequences
    batches = available if rows is None else -(-rows // per_batch)
    if batches < 1 or batches > available:
        raise ValueError(f"{rows} rows need {batches} forward passes of {sequences} windows; "
                         f"the {split} split has {available}")
    meta = {"format": FORMAT, "model": str(model.config.name),
            "points": [[p.site, p.layer] for p in points], "d": None, "split": split,
            "length": length, "sequences": sequences, "rows_per_batch": per_batch,
            "batches": batches, "batches_written": 0, "complete": False,
            "windows_sha256": windows_digest(split_windows)}
    folder.mkdir(parents=True, exist_ok=True)
    with _writer_lock(folder):
        start = 0
        if (folder / META).is_file():
            old = open_activation_cache(folder, partial=True).meta
            changed = [k for k in meta if k not in ("batches_written", "complete", "d")
                       and old[k] != meta[k]]
            if changed:
                raise ValueError(f"activation cache {folder} was made with other arguments "
                                 f"({', '.join(changed)}); use another folder")
            if old["complete"]:
                return open_activation_cache(folder)
            start, meta["d"] = old["batches_written"], old["d"]
        else:
            names = {point_file(p) for p in points}
            foreign = [p.name for p in folder.iterdir() if p.name not in names]
            if foreign:
                raise ValueError(f"{folder} holds files that are not an activation cache "
                                 f"({', '.join(sorted(foreign)[:3])}); use an empty folder")
        stream = stream_activations(model, windows, points, sequences=sequences, split=split,
                                    skip=start)
        first = None
        if start:
            arrays = [np.load(folder / point_file(p), mmap_mode="r+") for p in points]
        else:  # the widths are those of the first batch
            first = next(stream)
            meta["d"] = [int(a.shape[-1]) for a in first]
            arrays = [np.lib.format.open_memmap(folder / point_file(p), mode="w+",
                                                dtype=np.float32, shape=(batches * per_batch, d))
                      for p, d in zip(points, meta["d"], strict=True)]
            _write_meta(folder, meta)
        done = start
        try:
            for batch in progress(range(start, batches), "caching activations", unit="batch",
                                  show=show_progress, total=batches - start):
                got = first if first is not None else next(stream)
                first = None
                for array, rows_now in zip(arrays, got, strict=True):
                    array[batch * per_batch:(batch + 1) * per_batch] = rows_now
                done = batch + 1
                if done % flush_every == 0 or done == batches:
                    for array in arrays:
                        array.flush()
                    _write_meta(folder, {**meta, "batches_written": done,
                                         "complete": done == batches})
        except BaseException:
            for array in arrays:  # what was written is kept for the rerun to carry on from
                array.flush()
            _write_meta(folder, {**meta, "batches_written": done, "complete": False})
            raise
        del arrays
    return open_activation_cache(folder)


__all__ = ["FORMAT", "CachedActivations", "open_activation_cache", "stream_activations",
           "write_activation_cache"]
