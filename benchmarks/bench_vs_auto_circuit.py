"""Edge attribution patching (EAP): ours (`interp.circuits.edge_attribution(method="eap")`)
against auto-circuit 1.0.1's (TransformerLens-backed, PyTorch), on the same GPT-2-shaped model
and the same task, on this machine.

    AUTO_CIRCUIT_PYTHON=ac/bin/python python benchmarks/bench_vs_auto_circuit.py \\
        [--layers 12] [--heads 12] [--embed 768] [--batch 8] [--seq 32]

The model: transformers' `GPT2LMHeadModel` (GPT-2 small's shape by default, 50,257 tokens) with
random weights (torch seed 0), saved to a temporary folder that both sides load. The task:
random clean and corrupted prompts of `--seq` tokens (numpy seed 0), and the metric the mean
log-prob of each prompt's answer token at the last position. Both score every edge of the same
graph (auto-circuit's node names map one to one onto ours: `Resid Start` = `input`, `A3.4` =
`a3.h4`, `MLP 3` = `m3` (as a destination `m3<in>`), `A3.4.K` = `a3.kv4<k>`, `Resid End` =
`logits`). Prints each side's time (cold: the first call; warm: the second), their ratio, the
rank agreement of the scores (Spearman, on |score| and signed) and their largest difference
(auto-circuit's mask is 1 where an edge is patched, ours 0, so its scores are ours negated).
auto-circuit runs in its own environment (`benchmarks/auto_circuit_eap.py`, which says how to
make it). Results in `results/vs_auto_circuit.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).parent / "results" / "vs_auto_circuit.json"


def ours_name(name: str, receiver: bool = False) -> str:
    """An auto-circuit node name as ours (`receiver`: as an edge's destination, where `MLP 3`
    is the MLP's input)."""
    if name == "Resid Start":
        return "input"
    if name == "Resid End":
        return "logits"
    m = re.fullmatch(r"MLP (\d+)", name)
    if m:
        return f"m{m[1]}<in>" if receiver else f"m{m[1]}"
    m = re.fullmatch(r"A(\d+)\.(\d+)(?:\.([QKV]))?", name)
    if m is None:
        raise ValueError(f"an auto-circuit node name we do not know: {name!r}")
    layer, head, letter = m.groups()
    if letter is None:
        return f"a{layer}.h{head}"
    return f"a{layer}.h{head}<q>" if letter == "Q" else f"a{layer}.kv{head}<{letter.lower()}>"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--embed", type=int, default=768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    python = os.environ.get("AUTO_CIRCUIT_PYTHON")
    if not python:
        sys.exit("set AUTO_CIRCUIT_PYTHON to a python with auto-circuit 1.0.1 and "
                 "TransformerLens 2 (see benchmarks/auto_circuit_eap.py)")

    import torch
    import transformers

    from gemma_eqx.formats.hf import from_hf
    from interp import circuits
    from interp.patching import Metric
    from interp.study.circuit import copied_logprob

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_head=args.heads,
                                     n_embd=args.embed, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    rng = np.random.default_rng(0)
    clean, corrupted = rng.integers(0, config.vocab_size, (2, args.batch, args.seq))
    answers = rng.integers(0, config.vocab_size, args.batch)
    model = from_hf(hf)
    metric = Metric((args.seq - 1,), copied_logprob, jnp.asarray(answers[:, None], jnp.int32),
                    "log-prob of the answer", data_are_token_ids=True)
    out: dict = {"layers": args.layers, "heads": args.heads, "embed": args.embed,
                 "batch": args.batch, "seq": args.seq}
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        ours = circuits.edge_attribution(model, clean, corrupted, metric, method="eap")
        seconds.append(time.perf_counter() - start)
    out.update(ours_seconds_cold=seconds[0], ours_seconds_warm=seconds[1],
               edges=ours.graph.num_edges)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        np.savez(Path(folder) / "task.npz", clean=clean, corrupted=corrupted, answers=answers)
        reference = Path(folder) / "auto_circuit.json"
        subprocess.run([python, str(Path(__file__).parent / "auto_circuit_eap.py"), folder,
                        str(reference)], check=True)
        theirs = json.loads(reference.read_text())
    index = {name: i for i, name in enumerate(ours.graph.edge_names())}
    matched = np.full(ours.graph.num_edges, np.nan)
    for src, dest, score in theirs["edges"]:
        matched[index[f"{ours_name(src)}->{ours_name(dest, receiver=True)}"]] = score
    out.update(auto_circuit_seconds_cold=theirs["seconds_cold"],
               auto_circuit_seconds_warm=theirs["seconds_warm"],
               auto_circuit_edges=len(theirs["edges"]),
               hf_vs_tl_logits=theirs["hf_vs_tl_logits"], torch_threads=theirs["threads"],
               edges_matched=int(np.isfinite(matched).sum()),
               spearman_abs=circuits.spearman(np.abs(ours.scores), np.abs(matched)),
               spearman_signed=circuits.spearman(ours.scores, matched),
               spearman_signed_negated=circuits.spearman(ours.scores, -matched),
               # auto-circuit's mask is 1 where an edge is patched, ours 0: its gradient is
               # ours negated.
               max_difference_from_negated=float(np.nanmax(np.abs(ours.scores + matched))),
               max_score=float(np.abs(ours.scores).max()))
    out["speedup_warm"] = out["auto_circuit_seconds_warm"] / out["ours_seconds_warm"]
    out["speedup_cold"] = out["auto_circuit_seconds_cold"] / out["ours_seconds_cold"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1) + "\n")
    print(f"GPT-2 shape {args.layers}x{args.heads}x{args.embed}, {ours.graph.num_edges} edges "
          f"({out['edges_matched']} matched to auto-circuit's {out['auto_circuit_edges']}); "
          f"batch {args.batch} x {args.seq} tokens")
    print(f"ours: {seconds[1]:.2f} s warm ({seconds[0]:.1f} s cold); auto-circuit: "
          f"{out['auto_circuit_seconds_warm']:.2f} s warm ({out['auto_circuit_seconds_cold']:.1f}"
          f" s cold): {out['speedup_warm']:.1f}x warm, {out['speedup_cold']:.1f}x cold")
    print(f"Spearman of |score| {out['spearman_abs']:.4f}; signed {out['spearman_signed']:.4f}"
          f" (negated {out['spearman_signed_negated']:.4f}); ours minus auto-circuit's negated: "
          f"at most {out['max_difference_from_negated']:.1e} (scores up to "
          f"{out['max_score']:.2e}); HF vs TL logits {out['hf_vs_tl_logits']:.1e}")


if __name__ == "__main__":
    main()
