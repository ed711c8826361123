"""Many processes, one computation: JAX's multi-process runtime with the settings this library
needs, results fetched from arrays that span processes, and a local launcher.

JAX runs one process per host; `initialize` joins them (from the launcher's environment, from
explicit arguments, or by JAX's own cluster detection on TPU slices and SLURM), and every
process then runs the same program over a mesh of all devices. Process 0 (`is_lead`) writes
files and prints. A process that dies stops the others within `heartbeat_seconds` (JAX's
coordination service notices the missing heartbeats and ends them with a message naming it).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import threading
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
BIND_ENV = "GEMMA_EQX_COORDINATOR_BIND"  # where process 0 listens: host[:port], or "all"
DEFAULT_HEARTBEAT_SECONDS = 10  # JAX's default is 100 s of hanging after a process dies


def requested() -> bool:
    """Whether the environment asks this process to join a cluster (the launcher sets it)."""
    return COORDINATOR_ENV in os.environ


def _split_address(address: str, what: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) as `(host, port)`, or a ValueError naming `what`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or host.count(":") and not (host[0] == "[" and host[-1] == "]") \
            or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{what} must be host:port with a port in 1..65535 (IPv6 hosts in "
                         f"brackets); got {address!r}")
    return host, int(port)


def _bind_address(text: str, port: int) -> str:
    """`all` (every interface), a host, or host:port, as the coordinator's bind address."""
    if text == "all":
        return f"[::]:{port}"
    host, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and (host.startswith("[") or ":" not in host):
        host, port = _split_address(text, BIND_ENV)
        return f"{host}:{port}"
    if not text or ":" in text and not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"{BIND_ENV} must be 'all', a host or host:port (IPv6 hosts in "
                         f"brackets); got {text!r}")
    return f"{text}:{port}"


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _env_int(name: str, minimum: int) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


@dataclass(frozen=True)
class ClusterSettings:
    """What `initialize` passes to JAX, checked: coordinator `host:port` (None: JAX detects
    the cluster), process count and id, heartbeat timeout and the coordinator's bind address
    (`host:port`; while the coordinator is unknown, the text asked for, if any)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    heartbeat_seconds: int
    bind_address: str | None


def cluster_settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_seconds: int | None = None,
    bind_address: str | None = None,
) -> ClusterSettings:
    """Arguments, else the `GEMMA_EQX_*` environment, validated before JAX sees them (JAX
    answers bad values with a C++ abort or a segfault). The coordinator listens where it was
    told to be reached (`host:port`): on loopback for the local launcher, on the given
    address in a real cluster; `bind_address` (or `GEMMA_EQX_COORDINATOR_BIND`) overrides
    that, `"all"` meaning every interface."""
    from_env = coordinator is None and COORDINATOR_ENV in os.environ
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV)
    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV, 1)
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV, 0)
    if heartbeat_seconds is None:
        heartbeat_seconds = _env_int(HEARTBEAT_ENV, 1) or DEFAULT_HEARTBEAT_SECONDS
    bind_address = bind_address or os.environ.get(BIND_ENV)
    for name, value, low in (("num_processes", num_processes, 1),
                             ("process_id", process_id, 0),
                             ("heartbeat_seconds", heartbeat_seconds, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if coordinator is None:  # JAX detects the cluster: the bind address is applied then
        return ClusterSettings(None, num_processes, process_id, heartbeat_seconds, bind_address)
    where = COORDINATOR_ENV if from_env else "coordinator"
    host, port = _split_address(coordinator, where)
    if num_processes is None or process_id is None:
        raise ValueError(f"{where} is set, so the process count and this process's id are "
                         f"needed too ({NUM_PROCESSES_ENV}, {PROCESS_ID_ENV})")
    if process_id >= num_processes:
        raise ValueError(f"process id {process_id} is out of range for {num_processes} "
                         f"processes ({PROCESS_ID_ENV} must be 0 .. {num_processes - 1})")
    bind = f"{host}:{port}" if bind_address is None else _bind_address(bind_address, port)
    return ClusterSettings(coordinator, num_processes, process_id, heartbeat_seconds, bind)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_seconds: int | None = None,
    initialization_seconds: int = 300,
    bind_address: str | None = None,
) -> None:
    """Join the multi-process cluster; call before any JAX computation, on every process.

    Arguments default to the launcher's environment (`GEMMA_EQX_COORDINATOR`,
    `..._NUM_PROCESSES`, `..._PROCESS_ID`); without them JAX detects the cluster itself (TPU
    slices, SLURM, ...). CPU processes exchange data over gloo. A process that stops sending
    heartbeats for `heartbeat_seconds` (default `GEMMA_EQX_HEARTBEAT_SECONDS` or 10) ends the
    others with a message naming it, instead of a hang.

    Process 0's coordinator service (unauthenticated) listens only on the address the others
    reach it by: loopback for `gemma-eqx launch`, the host of `GEMMA_EQX_COORDINATOR` (or of
    the address JAX detects) in a real cluster. `bind_address` (or
    `GEMMA_EQX_COORDINATOR_BIND`) says otherwise: a host, `host:port`, or `"all"` for every
    interface (JAX's own default). On loopback, the CPU collectives listen on loopback too."""
    settings = cluster_settings(coordinator, num_processes, process_id,
                                heartbeat_seconds=heartbeat_seconds, bind_address=bind_address)
    if settings.coordinator is None:
        settings = _detected(settings, initialization_seconds) or settings
    if settings.coordinator is None and settings.bind_address is not None:
        raise ValueError(f"{BIND_ENV} needs a coordinator address ({COORDINATOR_ENV}, or a "
                         f"cluster JAX detects)")
    import jax

    # Only the CPU client reads this; without it, CPU collectives across processes fail.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator, num_processes=settings.num_processes,
        process_id=settings.process_id, heartbeat_timeout_seconds=settings.heartbeat_seconds,
        initialization_timeout=initialization_seconds,
        coordinator_bind_address=settings.bind_address,
    )
    if settings.coordinator is not None and _is_loopback(settings.coordinator.rpartition(":")[0]):
        _loopback_collectives()


def _detected(settings: ClusterSettings, timeout: int) -> ClusterSettings | None:
    """The settings with the cluster JAX detects (TPU slice, SLURM, ...) filled in, so the
    coordinator binds to its detected address like any other; None where JAX's detection
    (an internal API) finds nothing or is not as expected: JAX then detects, and binds every
    interface, itself."""
    try:
        from jax._src import clusters

        address, count, index, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, settings.num_processes, settings.process_id, None, None, timeout)
    except Exception:  # noqa: BLE001 - no cluster here, or the internal API changed
        return None
    if address is None or count is None or index is None:
        return None
    return cluster_settings(address, count, index, heartbeat_seconds=settings.heartbeat_seconds,
                            bind_address=settings.bind_address)


def _loopback_collectives() -> None:
    """Make the CPU client's gloo collectives listen on 127.0.0.1 rather than on the address
    this host's name resolves to: every process of a loopback cluster is on this host. Uses
    JAX's backend registry (internal); where that is not as expected, gloo keeps its default."""
    import functools
    import logging

    try:
        from jax._src import distributed, xla_bridge
        from jax._src.lib import _jax

        registration = xla_bridge._backend_factories["cpu"]
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname="127.0.0.1")
        xla_bridge.register_backend_factory(
            "cpu", functools.partial(xla_bridge.make_cpu_client, collectives=collectives),
            priority=registration.priority, fail_quietly=registration.fail_quietly)
    except Exception as e:  # noqa: BLE001 - an internal API: keep JAX's default on any change
        logging.getLogger(__name__).warning(
            "CPU collectives keep gloo's default address (%s: %s)", type(e).__name__, e)


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
    exit, which failed first; `stopped_by` is the signal (SIGINT, SIGTERM, SIGHUP) that made
    the launcher stop every process."""

    returncodes: tuple[int, ...]
    first_failure: int | None  # process id of the first process that exited non-zero
    timed_out: bool
    stopped_by: int | None = None

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.stopped_by is None
                and all(code == 0 for code in self.returncodes))

    def describe(self) -> str:
        if self.ok:
            return f"all {len(self.returncodes)} processes finished"
        if self.stopped_by is not None:
            return (f"stopped by {signal.Signals(self.stopped_by).name}: every process of the "
                    f"run was stopped")
        if self.timed_out:
            return "stopped every process: the run exceeded its time limit"
        first = self.first_failure
        rest = [i for i, code in enumerate(self.returncodes) if code != 0 and i != first]
        then = f"; then {_plural(rest)} stopped" if rest else ""
        return f"process {first} exited with status {self.returncodes[first]}{then}"


def _plural(ids: list[int]) -> str:
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


# The launcher's children run in sessions of their own (a terminal's Ctrl-C reaches only
# the launcher); these signals to the launcher stop all of them.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _positive_seconds(value: Any, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number of seconds "
                         f"{'>= 0' if allow_zero else '> 0'}; got {value!r}")


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
    localhost port, listening on loopback only), each with `devices_per_process` simulated CPU
    devices if given; their output goes to this process's. Waits for all; once one fails, the
    others get `grace_seconds` to stop by themselves (JAX ends them after its heartbeat
    timeout) before they are terminated. `timeout` bounds the whole run. With `log_dir`, each
    process's output goes to `log_dir/process-N.log` instead.

    SIGINT, SIGTERM or SIGHUP to this process stops every child's process group (SIGTERM,
    then SIGKILL after 10 s) and returns with `stopped_by` set: no process of the run is left."""
    for name, value in (("processes", processes), ("devices_per_process", devices_per_process)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if timeout is not None:
        _positive_seconds(timeout, "timeout")
    _positive_seconds(grace_seconds, "grace_seconds", allow_zero=True)
    if not command or isinstance(command, str):
        raise ValueError(f"command must be a non-empty list of arguments; got {command!r}")
    base = {**os.environ, **(env or {})}
    base[COORDINATOR_ENV] = f"127.0.0.1:{free_port()}"
    base[NUM_PROCESSES_ENV] = str(processes)
    base.pop(BIND_ENV, None)  # a local cluster listens on loopback only
    if devices_per_process is not None:
        flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        base["XLA_FLAGS"] = " ".join(
            [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        base["JAX_PLATFORMS"] = base.get("JAX_PLATFORMS") or "cpu"
    stop: list[int] = []  # the signal received, set by the handler
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    children: list[subprocess.Popen] = []
    start, first_failure, failed_at, timed_out = time.monotonic(), None, None, False
    try:
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        for i in range(processes):
            if stop:
                break
            log = open(Path(log_dir) / f"process-{i}.log", "w") if log_dir is not None else None
            try:
                children.append(subprocess.Popen(
                    list(command), env={**base, PROCESS_ID_ENV: str(i)}, start_new_session=True,
                    stdout=log, stderr=subprocess.STDOUT if log else None))
            finally:
                if log is not None:
                    log.close()  # the child holds its own descriptor
        while not stop and any(c.poll() is None for c in children):
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
        _stop_all(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = tuple(c.returncode for c in children)
    if first_failure is None:
        first_failure = _first_failure(list(codes))
    return LaunchResult(codes, first_failure, timed_out, stop[0] if stop else None)


def _stop_all(children: list[subprocess.Popen]) -> None:
    """SIGTERM to every running child's process group, SIGKILL to those still there 10 s
    later; waits for all."""
    for c in children:
        if c.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for c in children:
        try:
            c.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGKILL)
            c.wait()
    for c in children:  # what a child left in its group (its own children)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.pid, signal.SIGKILL)


def _first_failure(codes: list[int | None]) -> int | None:
    """The process to blame among those seen failed at once: one that exited by itself
    (a positive status) before one ended by a signal, as JAX ends the others (SIGABRT)."""
    failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
    return min(failed, key=lambda i: (codes[i] < 0, i), default=None)
