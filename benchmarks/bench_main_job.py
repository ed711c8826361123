"""The main job, `gemma-eqx induction` on the embedded Gemma 3 270M, timed as a user runs it.

    python benchmarks/bench_main_job.py [--runs 2] [--results FILE]

Each run is a fresh `gemma-eqx induction` process. The first starts from an empty compilation
cache (a new directory: "cold"); the later ones find the programs it stored ("warm"). The
converted model is made first if the cache has none (timed as "conversion": what the very first
run on a machine pays once). For each run it prints the wall time, each phase of the study from
`report.json` (`timings`: capture, scores, knockout, attribution, search, paths,
counterfactual, patching), the compile seconds, and what was written (report, XLA cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _run(out: Path, env: dict[str, str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gemma_eqx.cli", "induction", "--out",
                           str(out)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"gemma-eqx induction failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    compile_seconds = sum(step["seconds"] for step in report["compilation"].values())
    return {"seconds": round(seconds, 1), "phases": report["timings"],
            "compile_seconds": round(compile_seconds, 1),
            "report_bytes": _size(out), "report_files": sorted(p.name for p in out.iterdir())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="one cold run, then warm ones")
    p.add_argument("--results", type=Path, default=None, metavar="FILE",
                   help="also write the figures as JSON to FILE")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    from gemma_eqx.formats.pretrained import cache_dir

    env = {k: v for k, v in os.environ.items() if k != "GEMMA_EQX_NO_COMPILE_CACHE"}
    figures: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                     "cpus": os.cpu_count()}
    converted = cache_dir() / "converted"
    if not converted.exists() or not any(converted.iterdir()):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from gemma_eqx import from_pretrained; "
                        "from_pretrained()"], env=env, check=True)
        figures["conversion_seconds"] = round(time.perf_counter() - start, 1)
    with tempfile.TemporaryDirectory() as tmp:
        xla = Path(tmp) / "xla"
        env["GEMMA_EQX_COMPILE_CACHE"] = str(xla)
        runs = []
        for i in range(args.runs):
            run = _run(Path(tmp) / f"report-{i}", env)
            run["kind"] = "cold" if i == 0 else "warm"
            run["xla_cache_bytes"] = _size(xla)
            runs.append(run)
            print(f"{run['kind']:>4}: {run['seconds']:6.1f} s  (compilation "
                  f"{run['compile_seconds']:.1f} s; " + ", ".join(
                      f"{k} {v:.1f}" for k, v in run["phases"].items()) + ")", flush=True)
    figures["runs"] = runs
    figures["cache"] = {name: _size(cache_dir() / name) for name in ("gguf", "converted")}
    last = runs[-1]
    print(f"written: report {last['report_bytes'] / 1e6:.1f} MB in {len(last['report_files'])} "
          f"files ({', '.join(last['report_files'])}); XLA cache "
          f"{last['xla_cache_bytes'] / 1e6:.1f} MB; converted model "
          f"{figures['cache']['converted'] / 1e6:.1f} MB, GGUF "
          f"{figures['cache']['gguf'] / 1e6:.1f} MB")
    if args.results is not None:
        args.results.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
