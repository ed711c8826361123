"""Cost of the activation sites on Gemma 3 270M (float32, batch 1, BOS + 20 digits twice),
as ratios against baselines measured in the same run:

- capturing every site on every layer, and the attention patterns alone, against a plain
  jitted forward (`interp.run`);
- a 72-head activation-patching sweep of `head_out` (chunk sizes 4, 8, 18) against a naive loop
  of 72 forwards each patched with `interp.patch(..., layers=[l], heads=[h])`, which compiles
  one program per head: it is timed on `--naive-heads` heads and scaled to 72;
- the same sweep of `v_per_head` (the values each query head reads: the GQA per-head copy).

Each sweep runs twice: the first run compiles, the second is timed. The cores may be shared, so
every long step is also expressed in plain forwards timed right next to it, and its ratio to the
naive loop uses those. Three to six minutes on 2 shared cores (about 3 at load average 4).

    python benchmarks/bench_sites.py [--repeats 3] [--chunks 4 8 18] [--naive-heads 2]
                                     [--json benchmarks/results/sites.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import once, table

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations (and their seconds) through `jax.monitoring`."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event: str, duration: float, **_: Any) -> None:
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def mark(self) -> tuple[int, float]:
        return self.count, self.seconds

    def since(self, mark: tuple[int, float]) -> tuple[int, float]:
        return self.count - mark[0], self.seconds - mark[1]


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each `fn()`, the functions taking turns in every repeat (so a
    change of machine load during the run hits all of them alike)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def jit_entries(fn: Any) -> int | None:
    """Compiled entries of an `eqx.filter_jit` function (private API: None if it moved)."""
    size = getattr(getattr(fn, "_cached", None), "_cache_size", None)
    return size() if callable(size) else None


def site_bytes(cache: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in cache.arrays.items():
        site = key.split(".")[-1]
        out[site] = out.get(site, 0) + int(value.nbytes)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of each forward-sized step (median, interleaved)")
    parser.add_argument("--sweep-repeats", type=int, default=1,
                        help="timed runs of each sweep after its first (compiling) run")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 18],
                        help="chunk sizes of the head_out sweep")
    parser.add_argument("--v-chunk", type=int, default=8, help="chunk size of the v_per_head "
                        "sweep (also timed for head_out if not among --chunks)")
    parser.add_argument("--naive-heads", type=int, default=2,
                        help="heads of the naive loop timed (each compiles; 71 = all)")
    parser.add_argument("--period", type=int, default=20)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "sites.json"))
    args = parser.parse_args()
    start_all = time.perf_counter()
    load_start = os.getloadavg()

    import interp
    from gemma_eqx import from_pretrained
    from interp import analyses, patching

    compiles = CompileCounter()
    (model, tokenizer), load_s = once(from_pretrained)
    cfg = model.config
    n_layers, n_heads = cfg.num_layers, cfg.num_heads
    p = args.period
    a = analyses.repeated_digits(tokenizer, 0, batch=1, period=p)
    b = analyses.repeated_digits(tokenizer, 1, batch=1, period=p)
    clean = a  # BOS + A + A
    corrupted = jnp.concatenate([a[:, :1], b[:, 1:p + 1], a[:, p + 1:]], axis=1)  # BOS + B + A
    seq = clean.shape[1]
    # Positions p+1 .. 2p-1 (A's second copy) predicting tokens p+2 .. 2p.
    metric = patching.mean_logprob(np.asarray(clean[0, p + 2:]), range(p + 1, 2 * p))

    # ------------------------------------------------------------- forward-sized steps
    forward = jax.jit(lambda m, t: m(t))
    steps: dict[str, Callable[[], Any]] = {
        "plain forward (interp.run)": lambda: interp.run(model, clean),
        "jitted model call": lambda: forward(model, clean),
        "capture: every site, every layer": lambda: interp.capture(model, clean),
        "attention patterns only": lambda: interp.attention_patterns(model, clean),
        f"evaluate (logits at the metric's {len(metric.positions)} positions)":
            lambda: patching.evaluate(model, corrupted, metric),
    }
    first = {name: once(fn)[1] for name, fn in steps.items()}
    steady = interleaved(steps, args.repeats)
    base_name = "plain forward (interp.run)"
    base = steady[base_name]
    logits, cache = interp.capture(model, clean)
    per_site = site_bytes(cache)
    cache_bytes = sum(per_site.values())
    patterns_bytes = int(interp.attention_patterns(model, clean).nbytes)
    logits_bytes = int(logits.nbytes)

    # ----------------------------------------------------- naive loop of patched forwards
    # Seconds of a plain forward taken next to each long measurement: this machine's speed
    # can change within a run (shared cores), so the long steps are also given in these.
    plain = lambda: once(steps[base_name])[1]  # noqa: E731
    grid = [(la, h) for la in range(n_layers) for h in range(n_heads)]
    k = max(1, min(args.naive_heads, len(grid) - 1))
    sample = [grid[i] for i in np.linspace(1, len(grid) - 1, k).round().astype(int)]

    def naive(la: int, h: int) -> Any:
        patched = interp.patch(model, cache, "head_out", layers=[la], heads=[h])
        return patching.evaluate(patched, corrupted, metric)

    _, warm_s = once(lambda: naive(*grid[0]))
    naive_base = [plain()]
    entries_before, mark = jit_entries(patching._metric_of), compiles.mark()
    naive_first, naive_values = [], {}
    for la, h in sample:
        value, seconds = once(lambda la=la, h=h: naive(la, h))
        naive_first.append(seconds)
        naive_values[la, h] = float(np.asarray(value)[0])
    naive_compiles, naive_compile_s = compiles.since(mark)
    entries_after = jit_entries(patching._metric_of)
    naive_base.append(plain())
    naive_cached = [once(lambda la=la, h=h: naive(la, h))[1] for la, h in sample]
    naive_base.append(plain())
    naive_fwd = statistics.median(naive_base)
    # The loop after its warm-up: the warm-up head runs compiled, every other head compiles.
    naive_loop = statistics.median(naive_cached) + (len(grid) - 1) * statistics.mean(naive_first)
    naive_loop_compiled = len(grid) * statistics.median(naive_cached)

    # ------------------------------------------------------------------------ sweeps
    def sweep(site: str, chunk: int) -> Callable[[], Any]:
        return lambda: patching.activation_patching(
            model, corrupted, clean, site, metric, per="layer_head", chunk=chunk)

    configs = [("head_out", c) for c in dict.fromkeys([*args.chunks, args.v_chunk])]
    configs.append(("v_per_head", args.v_chunk))
    # First (compiling) runs, then the timed runs taking turns, each between plain forwards.
    first_runs = {}
    for config in configs:
        mark = compiles.mark()
        result, seconds = once(sweep(*config))
        first_runs[config] = (result, seconds, *compiles.since(mark))
    timed: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    local: dict[tuple[str, int], list[float]] = {c: [plain()] for c in configs}
    results = {}
    for _ in range(max(1, args.sweep_repeats)):
        for config in configs:
            results[config], seconds = once(sweep(*config))
            timed[config].append(seconds)
            local[config].append(plain())
    sweeps = []
    for config in configs:
        first_result, first_s, xla, xla_s = first_runs[config]
        steady_s = statistics.median(timed[config])
        fwd = statistics.median(local[config])
        sweeps.append({
            "site": config[0], "chunk": config[1], "first_s": first_s, "steady_s": steady_s,
            "steady_runs_s": timed[config], "local_forward_s": fwd,
            "compile_overhead_s": first_s - steady_s,
            "compilations": first_result.compilations,
            "compilations_second_run": results[config].compilations,
            "xla_compiles_first_run": xla, "xla_compile_s_first_run": xla_s,
            "ratio_vs_naive": (steady_s / fwd) / (naive_loop / naive_fwd),
            "forwards_per_head": steady_s / fwd / len(grid),
            "values": results[config].values, "normalized": results[config].normalized,
            "target": results[config].target, "source": results[config].source,
        })
    head_at_v_chunk = next(s for s in sweeps if s["site"] == "head_out"
                           and s["chunk"] == args.v_chunk)

    # Sanity: every head_out sweep agrees with the others and with the naive patched forwards.
    ref = sweeps[0]["values"]
    sweep_spread = max(float(np.max(np.abs(s["values"] - ref)))
                       for s in sweeps if s["site"] == "head_out")
    naive_diff = max(abs(ref[la, h] - v) for (la, h), v in naive_values.items())

    total_s = time.perf_counter() - start_all
    load_end = os.getloadavg()

    # ------------------------------------------------------------------------ report
    print(f"Gemma 3 270M ({cfg.num_layers} layers x {cfg.num_heads} heads, {cfg.num_kv_heads} "
          f"KV head), float32, batch 1 x {seq} tokens; {os.cpu_count()} cores, jax "
          f"{jax.__version__} on {jax.devices()[0].platform}; load average "
          f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end; model load {load_s:.1f} s")
    rows = [(name, f"{first[name]:.2f} s", f"{steady[name]:.3f} s", f"{steady[name] / base:.2f}x")
            for name in steps]
    print(table(rows, ("step", "first call (compile)", f"steady (median of {args.repeats})",
                       "vs plain forward")))
    print(f"\ncapture cache: {mb(cache_bytes)} in {len(cache.arrays)} arrays "
          f"({mb(cache_bytes - per_site.get('logits', 0))} without the logits); "
          f"attention patterns: {mb(patterns_bytes)}; logits: {mb(logits_bytes)}")
    print("  by site: " + ", ".join(f"{s} {mb(n)}" for s, n in per_site.items()))

    rows = [
        (f"naive loop: {len(grid)} x interp.patch + evaluate", "", f"{naive_loop:.1f} s",
         f"{naive_fwd:.2f} s", "1.00x", f"{naive_loop / naive_fwd / len(grid):.2f}",
         f"XLA {naive_compiles} for {k} heads ({naive_compile_s:.1f} s)"),
        ("  same loop if nothing recompiled", "", f"{naive_loop_compiled:.1f} s",
         f"{naive_fwd:.2f} s", f"{naive_loop_compiled / naive_loop:.3f}x",
         f"{naive_loop_compiled / naive_fwd / len(grid):.2f}", "0"),
    ]
    for s in sweeps:
        rows.append((f"activation_patching {s['site']}, chunk {s['chunk']}",
                     f"{s['first_s']:.1f} s (+{s['compile_overhead_s']:.1f})",
                     f"{s['steady_s']:.1f} s", f"{s['local_forward_s']:.2f} s",
                     f"{s['ratio_vs_naive']:.3f}x", f"{s['forwards_per_head']:.2f}",
                     f"{s['compilations']} (then {s['compilations_second_run']}); XLA "
                     f"{s['xla_compiles_first_run']} ({s['xla_compile_s_first_run']:.1f} s)"))
    print()
    print(table(rows, (f"{len(grid)}-head sweep", "first run (+compile)", "steady",
                       "plain fwd then", "vs naive loop", "plain fwds per head",
                       "compilations, first run")))
    print(f"\nnaive loop: warm-up {warm_s:.1f} s; {k} more heads timed {sample}: "
          f"{statistics.mean(naive_first):.2f} s each when new, "
          f"{statistics.median(naive_cached):.2f} s when compiled; XLA compiled "
          f"{naive_compiles} programs ({naive_compile_s:.1f} s) for those {k} heads; "
          f"evaluate's jit cache {entries_before} -> {entries_after} entries")
    v_vs_head = sweeps[-1]["forwards_per_head"] / head_at_v_chunk["forwards_per_head"]
    print(f"v_per_head vs head_out sweep at chunk {args.v_chunk}: {v_vs_head:.2f}x "
          f"(in plain forwards)")
    print(f"checks: head_out sweeps agree to {sweep_spread:.1e}, and with the naive patched "
          f"forwards to {naive_diff:.1e}; metric clean {sweeps[0]['source']:.3f}, corrupted "
          f"{sweeps[0]['target']:.3f}")
    print("ratios of the long steps are in plain forwards timed next to them ('plain fwd then')")
    print(f"total run time {total_s:.0f} s")

    out = {
        "model": "gemma3-270m", "dtype": "float32", "tokens": list(clean.shape),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "processor": platform.processor(),
                    "jax": jax.__version__, "platform": jax.devices()[0].platform,
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "args": vars(args), "model_load_s": load_s, "total_s": total_s,
        "baseline_forward_s": base,
        "steps": {name: {"first_s": first[name], "steady_s": steady[name],
                         "ratio": steady[name] / base} for name in steps},
        "capture_cache_bytes": cache_bytes, "capture_cache_bytes_by_site": per_site,
        "attention_patterns_bytes": patterns_bytes, "logits_bytes": logits_bytes,
        "naive_loop": {
            "heads": len(grid), "estimated_s": naive_loop,
            "estimated_if_compiled_s": naive_loop_compiled,
            "local_forward_s": naive_fwd, "warmup_s": warm_s, "heads_timed": sample,
            "first_s": naive_first, "cached_s": naive_cached, "xla_compiles": naive_compiles,
            "xla_compile_s": naive_compile_s, "jit_entries_before": entries_before,
            "jit_entries_after": entries_after,
        },
        "sweeps": [{key: (v.tolist() if isinstance(v, np.ndarray) else v)
                    for key, v in s.items()} for s in sweeps],
        "v_per_head_vs_head_out": v_vs_head,
        "checks": {"head_out_sweeps_max_diff": sweep_spread, "naive_vs_sweep_max_diff": naive_diff},
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
