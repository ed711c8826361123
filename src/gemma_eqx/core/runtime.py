"""Process-level settings of XLA and counting what it compiles.

Nothing here runs on import: the command-line tools and benchmarks call these, and a user's
own script may (see README, Performance).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# XLA's CPU scheduler runs independent operations concurrently; on a few cores they then
# fight over the threads each matmul wants (measured on 2 cores: the 270M's forward at 41
# tokens 0.27 s with it, 0.19 s without).
CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def tune_cpu_flags() -> bool:
    """Add `CPU_FLAGS` to `XLA_FLAGS` unless the user set them. Takes effect only before JAX
    starts its backend (the first computation); returns whether the flags are now in force."""
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f for f in CPU_FLAGS if f.split("=")[0] not in flags]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    import jax._src.xla_bridge as xb

    return not xb.backends_are_initialized() or not missing


def progress(iterable: Iterable[T], description: str, *, show: bool | None = None,
             unit: str = "it", total: int | None = None) -> Iterable[T]:
    """`iterable` with a tqdm bar on stderr, shown when stderr is a terminal (`show` decides
    otherwise), so logs and pipes stay clean; in a multi-process cluster, on process 0 only."""
    from tqdm.auto import tqdm

    from .multihost import is_lead

    visible = (sys.stderr.isatty() if show is None else show) and is_lead()
    return tqdm(iterable, desc=description, unit=unit, total=total, disable=not visible,
                leave=False)


def enable_compilation_cache(path: Path) -> None:
    """Keep XLA's compiled programs in `path`, so a later process skips their compilation."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration")
_HIT = "/jax/compilation_cache/cache_hits"


@dataclass
class CompileStats:
    """Programs compiled (or loaded from the persistent cache) and the seconds spent tracing,
    lowering and compiling them."""

    programs: int = 0
    cache_hits: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {"programs": self.programs, "cache_hits": self.cache_hits,
                "seconds": round(self.seconds, 3)}


@dataclass
class CompileLog:
    """Counts compilations per named step: `with log.step("knockout"): ...`. Listens to JAX's
    own monitoring events, so every jit in the process counts."""

    steps: dict[str, CompileStats] = field(default_factory=dict)
    _current: CompileStats | None = None

    def __post_init__(self):
        import jax

        def on_duration(name: str, seconds: float, **_) -> None:
            if self._current is None:
                return
            if name == _COMPILE:
                self._current.programs += 1
                self._current.seconds += seconds
            elif name in _TRACE:
                self._current.seconds += seconds

        def on_event(name: str, **_) -> None:
            if self._current is not None and name == _HIT:
                self._current.cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        self._listeners = (on_duration, on_event)

    def start(self, name: str) -> None:
        self._current = self.steps.setdefault(name, CompileStats())

    def close(self) -> None:
        import jax

        self._current = None
        if self._listeners is None:
            return
        on_duration, on_event = self._listeners
        self._listeners = None
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)

    def as_dict(self) -> dict[str, dict[str, int | float]]:
        return {name: stats.as_dict() for name, stats in self.steps.items()}
