"""Many processes, one computation: JAX's multi-process runtime with the settings this library
needs, results fetched from arrays that span processes, and a local launcher.

JAX runs one process per host; `initialize` joins them (from the launcher's environment, from
explicit arguments, or by JAX's own cluster detection on TPU slices and SLURM), and every
process then runs the same program over a mesh of all devices. Process 0 (`is_lead`) writes
files and prints. A process that dies stops the others within `heartbeat_seconds` (JAX's
coordination service notices the missing heartbeats and ends them with a message naming it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COORDINATOR_ENV = "GEMMA_EQX_COORDINATOR"  # host:port of process 0
NUM_PROCESSES_ENV = "GEMMA_EQX_NUM_PROCESSES"
PROCESS_ID_ENV = "GEMMA_EQX_PROCESS_ID"
HEARTBEAT_ENV = "GEMMA_EQX_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 10  # JAX's default is 100 s of hanging after a process dies


def requested() -> bool:
    """Whether the environment asks this process to join a cluster (the launcher sets it)."""
    return COORDINATOR_ENV in os.environ


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_seconds: int | None = None,
    initialization_seconds: int = 300,
) -> None:
    """Join the multi-process cluster; call before any JAX computation, on every process.

    Arguments default to the launcher's environment (`GEMMA_EQX_COORDINATOR`,
    `..._NUM_PROCESSES`, `..._PROCESS_ID`); without them JAX detects the cluster itself (TPU
    slices, SLURM, ...). CPU processes exchange data over gloo. A process that stops sending
    heartbeats for `heartbeat_seconds` (default `GEMMA_EQX_HEARTBEAT_SECONDS` or 10) ends the
    others with a message naming it, instead of a hang."""
    import jax

    coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
    if num_processes is None and NUM_PROCESSES_ENV in os.environ:
        num_processes = int(os.environ[NUM_PROCESSES_ENV])
    if process_id is None and PROCESS_ID_ENV in os.environ:
        process_id = int(os.environ[PROCESS_ID_ENV])
    if heartbeat_seconds is None:
        heartbeat_seconds = int(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS))
    # Only the CPU client reads this; without it, CPU collectives across processes fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_seconds,
        initialization_timeout=initialization_seconds,
    )


def is_lead() -> bool:
    """True on the process that writes files and prints (process 0; the only one alone)."""
    import jax

    return jax.process_index() == 0


def to_host(x: Any, dtype: Any = None) -> np.ndarray:
    """`x` as a numpy array (of `dtype` if given) on every process, also when it spans devices
    of other processes (gathered from all of them: every process must call this together)."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype)


def free_port() -> int:
    """A TCP port nobody listens on now (for the coordinator on localhost)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LaunchResult:
    """What each process did: exit codes (negative: killed by that signal) and, in order of
    exit, which failed first."""

    returncodes: tuple[int, ...]
    first_failure: int | None  # process id of the first process that exited non-zero
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(code == 0 for code in self.returncodes)

    def describe(self) -> str:
        if self.ok:
            return f"all {len(self.returncodes)} processes finished"
        if self.timed_out:
            return "stopped every process: the run exceeded its time limit"
        first = self.first_failure
        rest = [i for i, code in enumerate(self.returncodes) if code != 0 and i != first]
        then = f"; then {_plural(rest)} stopped" if rest else ""
        return f"process {first} exited with status {self.returncodes[first]}{then}"


def _plural(ids: list[int]) -> str:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def launch(
    command: Sequence[str],
    processes: int,
    *,
    devices_per_process: int | None = None,
    timeout: float | int | None = None,
    env: dict[str, str] | None = None,
    grace_seconds: float | int = 30.0,
    log_dir: str | os.PathLike | None = None,
) -> LaunchResult:
    """Run `command` as `processes` local processes of one JAX cluster (coordinator on a free
    localhost port), each with `devices_per_process` simulated CPU devices if given; their
    output goes to this process's. Waits for all; once one fails, the others get
    `grace_seconds` to stop by themselves (JAX ends them after its heartbeat timeout) before
    they are terminated. `timeout` bounds the whole run. With `log_dir`, each process's
    output goes to `log_dir/process-N.log` instead."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1; got {processes}")
    base = {**os.environ, **(env or {})}
    base[COORDINATOR_ENV] = f"127.0.0.1:{free_port()}"
    base[NUM_PROCESSES_ENV] = str(processes)
    if devices_per_process is not None:
        flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        base["XLA_FLAGS"] = " ".join(
            [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        base["JAX_PLATFORMS"] = base.get("JAX_PLATFORMS") or "cpu"
    logs = []
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        logs = [open(Path(log_dir) / f"process-{i}.log", "w") for i in range(processes)]
    children = [
        subprocess.Popen(list(command), env={**base, PROCESS_ID_ENV: str(i)},
                         start_new_session=True, stdout=logs[i] if logs else None,
                         stderr=subprocess.STDOUT if logs else None)
        for i in range(processes)
    ]
    for f in logs:
        f.close()  # the children hold their own descriptors
    start, first_failure, failed_at, timed_out = time.monotonic(), None, None, False
    try:
        while any(c.poll() is None for c in children):
            now = time.monotonic()
            if first_failure is None:
                first_failure = _first_failure([c.returncode for c in children])
                failed_at = now if first_failure is not None else None
            if timeout is not None and now - start > timeout:
                timed_out = True
                break
            if failed_at is not None and now - failed_at > grace_seconds:
                break
            time.sleep(0.1)
    finally:
        for c in children:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGTERM)
        for c in children:
            try:
                c.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(c.pid, signal.SIGKILL)
                c.wait()
    codes = tuple(c.returncode for c in children)
    if first_failure is None:
        first_failure = _first_failure(list(codes))
    return LaunchResult(codes, first_failure, timed_out)


def _first_failure(codes: list[int | None]) -> int | None:
    """The process to blame among those seen failed at once: one that exited by itself
    (a positive status) before one ended by a signal, as JAX ends the others (SIGABRT)."""
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    return min(failed, key=lambda i: (codes[i] < 0, i), default=None)
