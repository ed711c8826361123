"""A real multi-process JAX cluster on this machine: 2 processes x 4 simulated CPU devices,
joined over localhost with gloo collectives (`gemma_eqx.core.multihost`), against one process."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemma_eqx.core import multihost

# Several JAX processes per test: the integration tier, not the quick loop.
pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
TIMEOUT = 300  # seconds for a whole cluster run; a hang fails the test, not CI


def cluster_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "GEMMA_EQX_NO_COMPILE_CACHE": "1"}


def run_cluster(args: list[str], processes: int = 2, devices: int = 4, env=None, **kw):
    result = multihost.launch([sys.executable, *args], processes, devices_per_process=devices,
                              timeout=TIMEOUT, env={**cluster_env(), **(env or {})}, **kw)
    assert not result.timed_out, f"the cluster did not finish in {TIMEOUT} s"
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Kaggle-layout checkpoint of a small Gemma 3; a smaller embedding makes greedy decoding
    vary (see `factories.varied_model`)."""
    from factories import random_arrays
    from gemma_eqx.formats.kaggle import save_checkpoint
    from gemma_eqx.model.weights import model_from_arrays
    from multihost_checks import config

    arrays = random_arrays(config(), seed=1)
    arrays["embedder.embedding"] *= 0.3
    path = tmp_path_factory.mktemp("kaggle") / "checkpoint"
    save_checkpoint(model_from_arrays(config(), arrays), path, dtype=None)
    return path


def test_two_processes_compute_what_one_does(checkpoint, tmp_path):
    together, alone_dir = tmp_path / "together", tmp_path / "alone"
    for out, processes, devices in ((together, 2, 4), (alone_dir, 1, 8)):
        out.mkdir()
        result = run_cluster([str(HERE / "multihost_checks.py"), str(checkpoint), str(out)],
                             processes=processes, devices=devices)
        assert result.ok, result.describe()
    parts = [json.loads((together / f"process-{i}.json").read_text()) for i in range(2)]
    alone = json.loads((alone_dir / "process-0.json").read_text())
    assert alone["processes"] == 1 and alone["devices"] == 8
    for part in parts:
        assert part["processes"] == 2 and part["devices"] == 8
        assert part["wrong_sharding"] == [] == alone["wrong_sharding"]
    # Each process holds only its shards, which are the single process's shards there.
    for path, shards in alone["held"].items():
        mine = [s for part in parts for s in part["held"][path]]
        assert sorted(s[0] for s in mine) == sorted(s[0] for s in shards), path
        for index, total in mine:
            expected = next(t for i, t in shards if i == index)
            assert total == pytest.approx(expected, rel=1e-6, abs=1e-6), path
    split = alone["held"]["embedder.embedding"]
    assert len(parts[0]["held"]["embedder.embedding"]) == len(split) // 2 == 4
    worst = {}
    for key in ("logits", "patterns", "knockout_logprob", "attribution", "patching"):
        for part in parts:
            a, b = np.asarray(part[key]), np.asarray(alone[key])
            assert a.shape == b.shape, key
            worst[key] = max(worst.get(key, 0.0), float(np.abs(a - b).max()))
    print("largest difference, two processes against one:", worst)
    assert worst["logits"] < 1e-4 and worst["patterns"] < 1e-5
    assert max(worst["knockout_logprob"], worst["attribution"], worst["patching"]) < 1e-4
    for part in parts:
        assert part["generated"] == alone["generated"]
    assert len(set(np.asarray(alone["generated"]).ravel().tolist())) > 2  # not one token


@pytest.fixture(scope="module")
def digits_gguf(tmp_path_factory):
    """A tiny Gemma 3 GGUF whose vocabulary has the ten digits (the study needs them)."""
    from factories import gguf_arrays, gguf_config, write_tiny_gguf

    config = gguf_config("gemma3").replace(vocab_size=320)  # the vocabulary splits 8 ways
    path = tmp_path_factory.mktemp("gguf") / "digits.gguf"
    return write_tiny_gguf(path, config, gguf_arrays(config), arch="gemma3", digits=True)


STUDY = ["induction", "--strings", "2", "--top", "3", "--residual-stride", "3"]


def _numbers_agree(ours, theirs, path=""):
    """Largest difference between two report.json trees (strings and ints must be equal)."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), path
        return max((_numbers_agree(ours[k], theirs[k], f"{path}.{k}") for k in ours),
                   default=0.0)
    if isinstance(ours, list):
        assert len(ours) == len(theirs), path
        return max((_numbers_agree(a, b, f"{path}[{i}]")
                    for i, (a, b) in enumerate(zip(ours, theirs, strict=True))), default=0.0)
    if isinstance(ours, float) or isinstance(theirs, float):
        return abs(float(ours) - float(theirs))
    assert ours == theirs, (path, ours, theirs)
    return 0.0


def test_the_study_runs_across_processes_into_one_report(digits_gguf, tmp_path):
    """`gemma-eqx induction` on 2 processes: a cold conversion cache built by one process,
    one report written by process 0, equal to the report of one process."""
    cache, logs, out = tmp_path / "cache", tmp_path / "logs", tmp_path / "together"
    result = run_cluster(["-m", "gemma_eqx.cli", *STUDY, "--model", str(digits_gguf),
                          "--out", str(out)], log_dir=logs,
                         env={"GEMMA_EQX_CACHE": str(cache), "GEMMA_EQX_LOG_LEVEL": "INFO"})
    text = [(logs / f"process-{i}.log").read_text() for i in range(2)]
    assert result.ok, result.describe() + "\n" + text[0][-3000:] + text[1][-3000:]
    converted = [t.count("converting ") for t in text]
    assert sorted(converted) == [0, 1], converted  # one process converted, the other waited
    assert len(list((cache / "converted").iterdir())) == 1
    assert "Induction heads in" in text[0] and "Induction heads in" not in text[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "logs", "together"]


    # One process of 8 devices, from the cache the cluster built.
    alone = run_cluster(["-m", "gemma_eqx.cli", *STUDY, "--model", str(digits_gguf), "--out",
                         str(tmp_path / "alone")], processes=1, devices=8,
                        env={"GEMMA_EQX_CACHE": str(cache)})
    assert alone.ok, alone.describe()
    together, alone = (json.loads((tmp_path / d / "report.json").read_text())
                       for d in ("together", "alone"))
    for report in (together, alone):
        del report["timings"], report["compilation"]
    # Normalised patching divides by clean - corrupted (small on a random model): compare the
    # un-normalised metric, then everything else.
    scale = alone["patching"]["clean"] - alone["patching"]["corrupted"]
    patched = max(float(np.nanmax(np.abs(np.subtract(together["patching"][k],
                                                     alone["patching"][k]) * scale)))
                  for k in ("heads", "residual"))
    for report in (together, alone):
        del report["patching"]["heads"], report["patching"]["residual"]
    rest = _numbers_agree(together, alone)
    print(f"study, two processes against one: patching {patched:.2g}, everything else {rest:.2g}")
    assert patched < 1e-4 and rest < 1e-4


def test_a_process_that_dies_stops_the_others_with_a_message(tmp_path):
    """Process 1 exits in the middle of a sharded computation loop; process 0 must end within
    the heartbeat timeout (here 5 s) plus slack, saying which process stopped."""
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, sys, time\n"
        "from gemma_eqx.core import multihost\n"
        "multihost.initialize()\n"
        "import jax, jax.numpy as jnp\n"
        "from gemma_eqx.parallel.sharding import default_mesh\n"
        "x = jax.device_put(jnp.arange(64.0), jax.sharding.NamedSharding(default_mesh(),"
        " jax.sharding.PartitionSpec('model')))\n"
        "for step in range(600):\n"
        "    total = float(jnp.sum(x * step))  # a collective across both processes\n"
        "    if step == 5 and jax.process_index() == 1:\n"
        "        os._exit(7)\n"
        "    time.sleep(0.1)\n"
    )
    logs = tmp_path / "logs"
    start = time.monotonic()
    result = run_cluster([str(script)], log_dir=logs, grace_seconds=120,
                         env={"GEMMA_EQX_HEARTBEAT_SECONDS": "5"})
    elapsed = time.monotonic() - start
    assert result.returncodes[1] == 7 and result.first_failure == 1
    assert result.returncodes[0] != 0  # stopped by JAX, not by the launcher's grace period
    log = (logs / "process-0.log").read_text()
    assert "stopped sending heartbeats" in log and "another task died" in log, log[-2000:]
    assert elapsed < 60, elapsed
    assert result.describe().startswith("process 1 exited with status 7; then process 0")
    print(f"process 0 stopped {elapsed:.1f} s after the start; {result.describe()}")


def test_the_throughput_script_reports_global_figures_once(tmp_path):
    results, logs = tmp_path / "throughput.jsonl", tmp_path / "logs"
    result = run_cluster([str(HERE.parent / "benchmarks" / "bench_throughput.py"), "--mesh",
                          "data=2,model=4", "--batch", "8", "--seq", "16", "--repeats", "1",
                          "--modes", "prefill", "--results", str(results)], log_dir=logs)
    text = [(logs / f"process-{i}.log").read_text() for i in range(2)]
    assert result.ok, result.describe() + text[0][-3000:]
    assert "prefill  8x16" in text[0]
    assert "tokens/s" not in text[1] and "appended" not in text[1]  # process 0 reports
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["mode"], r["processes"], r["devices"], r["batch"]) for r in lines] == [
        ("prefill", 2, 8, 8)]  # global: the batch of 8 over both processes
    assert all(r["tokens_per_second"] > 0 for r in lines)


def test_the_launch_command_needs_a_command_and_reports_failures(capsys):
    from gemma_eqx.cli import main

    assert main(["launch", "--processes", "2", "--"]) == 2
    assert "give the command to run after --" in capsys.readouterr().err
    failed = multihost.LaunchResult((0, 3), 1, False)
    assert not failed.ok and failed.describe() == "process 1 exited with status 3"
    both = multihost.LaunchResult((-6, 7), multihost._first_failure([-6, 7]), False)
    assert both.describe() == "process 1 exited with status 7; then process 0 stopped"
    assert multihost.LaunchResult((0, 0), None, True).describe().endswith("time limit")
