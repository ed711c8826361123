"""Writes that are never seen half done: a temporary name beside the target, then a rename.

Temporary names are `.{pid}.partial.{name}` (they keep the target's suffix, so writers that
infer a format from it still work). A run killed mid-write leaves only such a file, which the
next writer of the same target removes with `remove_partials`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "StorageError", "is_partial", "locked_directory", "partial_path", "remove_partials",
    "replace_directory",
    "replace_file",
]


class StorageError(OSError):
    """A file or directory could not be read or written: the message says which and what to
    do, `errno` says why (ENOSPC: the disk is full, EROFS: read-only, EIO: corrupted, ...)."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code

    def __reduce__(self):
        return type(self), (self.errno, self.args[0])

    @classmethod
    def writing(cls, e: OSError, what: str, advice: str) -> StorageError:
        """`cannot write {what}: {reason}; {advice}` for an OSError met while writing."""
        full = e.errno == errno.ENOSPC or "No space left" in str(e)
        reason = "no space left on the device" if full else (e.strerror or str(e))
        return cls(e.errno, f"cannot write {what}: {reason}; {advice}")


def partial_path(target: Path) -> Path:
    """The temporary name this process writes `target` under."""
    return target.with_name(f".{os.getpid()}.partial.{target.name}")


def is_partial(name: str, target_name: str) -> bool:
    """Whether `name` is a temporary name of `target_name` (from any process)."""
    head, _, rest = name.partition(".partial.")
    return rest == target_name and head.startswith(".") and head[1:].isdigit()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_partials(target: Path) -> list[Path]:
    """Delete the temporary files or directories that killed runs left for `target` (those
    of processes still running are theirs to finish and are kept)."""
    found = [p for p in target.parent.glob(".*.partial." + glob.escape(target.name))
             if is_partial(p.name, target.name) and not _alive(int(p.name[1:].split(".")[0]))]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def locked_directory(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `directory` itself (no lock file is left in it); the OS
    releases it when the process ends, however it ends."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_file(target: str | os.PathLike) -> Iterator[Path]:
    """`with replace_file(path) as tmp:` write `tmp`; on success it replaces `path` in one
    rename, on any failure (an interrupt included) it is deleted and `path` is untouched."""
    target = Path(target)
    tmp = partial_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_directory(target: str | os.PathLike) -> Iterator[Path]:
    """`with replace_directory(path) as new:` write the directory `new` (a writer such as
    orbax creates it); on success it takes `path`'s place in one rename (a directory already
    there is moved aside first, then deleted), on any failure it is deleted. Everything is
    staged inside `partial_path(path)`, so a kill leaves only that, for `remove_partials`."""
    target = Path(target)
    box = partial_path(target)
    box.mkdir()
    try:
        yield box / "new"
        if target.exists():
            os.replace(target, box / "old")
        os.replace(box / "new", target)
    finally:
        shutil.rmtree(box, ignore_errors=True)
