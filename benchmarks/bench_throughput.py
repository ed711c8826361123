"""Throughput of a Gemma preset on all devices of this host (or of every host, under
`jax.distributed`): prefill, decode and train steps on a device mesh, with model FLOPs
utilisation, the decode bandwidth roofline, memory per device and compile time.

    python benchmarks/bench_throughput.py --preset gemma-7b --mesh data=1,model=8 --batch 8
    python benchmarks/bench_throughput.py --preset gemma3-27b --dry-run --devices 8 \\
        --device-kind v5e --mesh model=8          # a plan for a machine you do not have

Weights are random, created on the devices in their shardings (or restored with
`--checkpoint`). Peaks come from the table in `gemma_eqx.parallel.throughput` (override with
`--peak-tflops` / `--bandwidth-gbs`); on a CPU they are measured on the spot. Each mode
appends one JSON line to `--results` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None,
                   help="a preset of gemma_eqx.PRESETS (default gemma3-270m; with "
                        "--checkpoint, detected from the checkpoint unless given)")
    p.add_argument("--checkpoint", type=Path, help="restore this Kaggle checkpoint instead of "
                   "random weights")
    p.add_argument("--mesh", default="model=-1",
                   help="mesh axes data=N,model=M over all devices (-1: the rest)")
    p.add_argument("--modes", default="prefill,decode,train", help="comma-separated")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (global)")
    p.add_argument("--seq", type=int, default=512,
                   help="prompt / training length; decode's context before its new tokens")
    p.add_argument("--decode-steps", type=int, default=32, help="tokens each decode run adds")
    p.add_argument("--dtype", default=None,
                   help="parameters and activations (default: bfloat16, float32 on a CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (median)")
    p.add_argument("--scan", action="store_true",
                   help="prefill and train on a scanned layer stack (one compiled period of "
                        "the attention pattern; the same numbers)")
    p.add_argument("--remat", action="store_true",
                   help="with --scan: training recomputes each period's activations")
    p.add_argument("--dry-run", action="store_true",
                   help="compile on abstract inputs only and predict step times at the peak")
    p.add_argument("--devices", type=int, default=None,
                   help="--dry-run: simulate this many CPU devices")
    p.add_argument("--device-kind", default=None,
                   help="peaks of this kind (v4, v5e, v5p, v6e, a100, h100, h200) instead of "
                        "the detected one")
    p.add_argument("--peak-tflops", type=float, help="override the peak (per device)")
    p.add_argument("--bandwidth-gbs", type=float, help="override the bandwidth (per device)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host JAX cluster first (gemma_eqx.core.multihost.initialize: "
                   "the cluster is detected on TPU slices; `gemma-eqx launch` runs it locally)")
    p.add_argument("--results", type=Path, default=None, metavar="FILE",
                   help="append one JSON line per mode to FILE once every mode has run "
                   "(e.g. benchmarks/results/throughput.jsonl; default: print only)")
    return p.parse_args(argv)


class Refused(ValueError):
    """An option that cannot work: one line, exit 2, nothing run or written."""


def check_args(args: argparse.Namespace) -> list[str]:
    """Every option that needs no JAX, checked before any work; returns the modes."""
    import math

    from gemma_eqx.parallel.throughput import DEVICE_KINDS, MODES, device_peak

    if args.devices is not None and not args.dry_run:
        raise Refused("--devices simulates CPU devices for --dry-run only")
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in MODES:
            raise Refused(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise Refused(f"--modes names a mode twice: {args.modes!r}")
    for option, value, least in (("--batch", args.batch, 1), ("--seq", args.seq, 1),
                                 ("--repeats", args.repeats, 1),
                                 ("--decode-steps", args.decode_steps,
                                  1 if "decode" in modes else 0),
                                 ("--devices", args.devices, 1)):
        if value is not None and value < least:
            raise Refused(f"{option} must be >= {least}; got {value}")
    for option, value in (("--peak-tflops", args.peak_tflops),
                          ("--bandwidth-gbs", args.bandwidth_gbs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise Refused(f"{option} must be a positive number; got {value}")
    if args.device_kind is not None and device_peak(args.device_kind) is None:
        raise Refused(f"--device-kind {args.device_kind!r} is not a known device; choose "
                      f"from {', '.join(DEVICE_KINDS)}")
    if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
        raise Refused(f"--dtype {args.dtype!r} is not a floating dtype JAX computes in; use "
                      f"float32, bfloat16 or float16")
    if args.remat and not args.scan:
        raise Refused("--remat recomputes a scanned stack's periods: add --scan")
    if args.checkpoint is not None and args.dry_run:
        raise Refused("--dry-run plans from the preset; leave out --checkpoint")
    if args.preset is not None:
        from gemma_eqx.core.config import get_preset

        try:
            get_preset(args.preset)
        except ValueError as e:
            raise Refused(str(e)) from None
    if args.results is not None and args.results.is_dir():
        raise Refused(f"--results {args.results} is a directory; give a file")
    return modes


def main(argv=None) -> None:
    args = _args(argv)
    try:
        run(args, check_args(args))
    except (Refused, ValueError, OSError) as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")


def run(args: argparse.Namespace, modes: list[str]) -> None:
    if args.devices:
        # Before JAX starts: a plan for N devices compiles for N simulated CPU devices.
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    from gemma_eqx.core.runtime import tune_cpu_flags

    tune_cpu_flags()
    import jax
    import jax.numpy as jnp

    from gemma_eqx.core import multihost
    from gemma_eqx.core.config import get_preset
    from gemma_eqx.parallel import throughput as tp

    if args.distributed or multihost.requested():  # `gemma-eqx launch` sets the environment
        multihost.initialize()
    mesh = tp.parse_mesh(args.mesh)
    platform_name = jax.devices()[0].platform
    dtype = jnp.dtype(args.dtype or ("float32" if platform_name == "cpu" and not args.dry_run
                                     else "bfloat16"))
    model = None
    if args.checkpoint:
        from gemma_eqx.formats.kaggle import load_checkpoint

        model = load_checkpoint(args.checkpoint, preset=args.preset or "auto", mesh=mesh,
                                dtype=dtype, activation_dtype=dtype)
        config = model.config
    else:
        config = get_preset(args.preset or "gemma3-270m")
    kind = args.device_kind or jax.devices()[0].device_kind
    peak = tp.device_peak(kind)
    if peak is None:
        if args.dry_run:
            raise Refused(f"--dry-run needs the peaks of a device kind (--device-kind, one of "
                          f"{', '.join(tp.DEVICE_KINDS)}); {kind!r} is not in the table")
        peak = tp.measure_host_peak(dtype)
        # The simulated devices of one CPU share its cores: the peak is the host's.
        peak = tp.DevicePeak(peak.name, peak.flops / mesh.size, peak.bandwidth / mesh.size,
                             peak.memory // mesh.size)
    if args.peak_tflops or args.bandwidth_gbs:
        peak = tp.DevicePeak(peak.name + " (overridden)",
                             args.peak_tflops * 1e12 if args.peak_tflops else peak.flops,
                             args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else peak.bandwidth,
                             peak.memory)
    setup = tp.Setup(config, mesh, args.batch, args.seq, dtype, args.decode_steps,
                     scan=args.scan, remat=args.remat)
    setup.check()  # batch over the data axis, the context: before any compilation
    lead = jax.process_index() == 0
    if lead:
        print(f"{config.name} on {mesh.size} x {kind} (mesh {dict(mesh.shape)}), {dtype.name}; "
              f"peak {peak.flops / 1e12:.3g} TFLOP/s, {peak.bandwidth / 1e9:.3g} GB/s per "
              f"device ({peak.name}){'; dry run: predicted at the peak' if args.dry_run else ''}",
              flush=True)
    rows = []
    for mode in modes:
        if args.dry_run:
            figures = tp.plan(setup, mode, peak)
        else:
            figures, _ = tp.measure(setup, mode, peak, model=model, repeats=args.repeats)
        rows.append(figures)
    if not lead:
        return
    print(_table(rows))
    for f in rows:
        if f.memory_per_device > peak.memory:
            print(f"{f.mode}: {f.memory_per_device / 2**30:.1f} GiB per device does not fit "
                  f"{peak.name}'s {peak.memory / 2**30:.0f} GiB; use more devices on the "
                  f"model axis, a data axis, or a smaller batch or sequence")
    if args.results is None:
        return
    degenerate = [f.mode for f in rows if not (math.isfinite(f.step_seconds)
                                              and f.step_seconds > 0
                                              and math.isfinite(f.tokens_per_second))]
    if degenerate:
        raise ValueError(f"mode {degenerate[0]} measured no positive finite step time; "
                         f"nothing was appended to {args.results}")
    _append(args.results, [{
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
        "processes": jax.process_count(), "device_kind": kind, "jax": jax.__version__,
        **f.as_dict()} for f in rows])
    print(f"appended {len(rows)} line(s) to {args.results}")


def _append(path: Path, records: list[dict]) -> None:
    """One JSON line per record, appended in one write under a lock (concurrent runs
    interleave whole runs)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))


def _table(rows) -> str:
    sys.path.insert(0, str(HERE))
    from common import table

    def gib(n):
        return f"{n / 2**30:.2f}"

    body = []
    for f in rows:
        shape = (f"{f.batch}x{f.seq}+{f.decode_steps}" if f.mode == "decode"
                 else f"{f.batch}x{f.seq}")
        body.append((
            f.mode, shape, f"{f.step_seconds * 1e3:.1f}", f"{f.tokens_per_second:,.0f}",
            f"{f.tokens_per_second / f.batch:,.1f}" if f.mode == "decode" else "",
            f"{100 * f.mfu:.1f}%",
            "" if f.bandwidth_fraction is None else f"{100 * f.bandwidth_fraction:.0f}%",
            gib(f.memory_per_device), f"{f.compile_seconds:.1f}",
            f"{f.flops_per_step / 1e12:.3g}",
            # XLA counts a loop's body once: decode's steps run in one loop (and a scanned
            # stack's layers: no comparison).
            "" if f.xla_flops is None or f.scanned else
            f"{f.xla_flops * (f.decode_steps or 1) / f.flops_per_step:.3f}",
            "" if f.loss is None else f"{f.loss:.3f}"))
    return table(body, ("mode", "batch x seq", "step ms", "tokens/s", "per seq", "MFU",
                        "of BW roofline", "GiB/device", "compile s", "TFLOP/step",
                        "XLA/ours FLOPs", "loss"))


if __name__ == "__main__":
    main()
