"""Circuits on the real Gemma 3 270M (`interp.circuits`): edge attribution against exact edge
patching on the induction task, their speed, the faithfulness of the circuits they rank, and
ACDC; and node attribution (AtP, AtP with the QK fix, AtP*) against exact node patching.

    python benchmarks/bench_circuits.py [--strings 4] [--steps 8] [--sample 300]
                                        [--acdc-start 120] [--threshold 0.02]
                                        [--parts edges,nodes,random]

The task: clean = BOS + A + A, corrupted = BOS + B + A (A, B random strings of 20 digits; numpy
seed 0), `--strings` of them in a batch; the metric is the mean log-probability of the second
copy of A (its first digit left out: copying cannot predict it). Timings are warm (each
program compiled by an untimed first call; compile times printed apart). Exact edge patching of
all 5,644 edges would take over an hour here, so it runs on `--sample` edges: the top half by
|EAP-IG| and as many drawn at random from the rest; its time per edge gives the full sweep's.
Spearman is reported on the whole sample and on its random part alone (unbiased for all
edges). ACDC (KL objective) starts from the top `--acdc-start` edges of EAP-IG. Nodes: every
receiver (127) and sender (91) patched exactly, against each estimate; AtP* estimates a
magnitude, so every method is also ranked by |score| against |exact|. Random: EAP and EAP-IG
(over weights and over inputs) against exact patching of 120 edges drawn at random.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from common import table

RESULTS = Path(__file__).parent / "results" / "circuits.json"


def task(tokenizer, strings: int, period: int = 20, seed: int = 0):
    from interp.analyses import digit_ids
    from interp.patching import Metric
    from interp.study.circuit import copied_logprob

    ids = np.asarray(digit_ids(tokenizer))
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 10, (2, strings, period))
    bos = np.full((strings, 1), tokenizer.bos_id)
    clean = np.concatenate([bos, ids[a], ids[a]], 1)
    corrupted = np.concatenate([bos, ids[b], ids[a]], 1)
    positions = tuple(range(period + 1, 2 * period))
    metric = Metric(positions, copied_logprob, jnp.asarray(clean[:, period + 2:]),
                    "mean log-prob of the copied digits")
    return clean, corrupted, metric


def nodes(model, clean, corrupted, metric, out: dict, timed) -> None:
    """AtP, AtP with the QK fix, and AtP* against exact node patching, for receivers (query,
    key, value, MLP inputs and the logits) and senders (input, heads, MLPs)."""
    from interp import circuits

    for kind in ("receivers", "senders"):
        circuits.node_patching(model, clean, corrupted, metric, nodes=kind)  # compiles
        exact = timed(f"exact_{kind}", lambda k=kind: circuits.node_patching(
            model, clean, corrupted, metric, nodes=k))
        for method in ("atp", "atp+qk", "atp*") if kind == "receivers" else ("atp", "atp*"):
            circuits.node_attribution(model, clean, corrupted, metric, nodes=kind,
                                      method=method)  # compiles
            est = timed(f"{method}_{kind}", lambda k=kind, m=method: circuits.node_attribution(
                model, clean, corrupted, metric, nodes=k, method=m))
            # AtP* estimates a magnitude: every method is ranked on |score| against |exact|.
            out[f"spearman_abs_{method}_{kind}"] = circuits.spearman(np.abs(est.scores),
                                                                     np.abs(exact))
            if method != "atp*":
                out[f"spearman_{method}_{kind}"] = circuits.spearman(est.scores, exact)
            top = set(np.argsort(-np.abs(exact))[:10])
            out[f"top10_overlap_{method}_{kind}"] = len(top & set(
                np.argsort(-np.abs(est.scores))[:10]))
        order = np.argsort(-np.abs(exact))[:8]
        names = [n.name for n in getattr(circuits.component_graph(model), kind)]
        out[f"exact_top_{kind}"] = [(names[i], float(exact[i])) for i in order]


def random_edges(model, clean, corrupted, metric, out: dict, count: int = 120) -> None:
    """EAP, EAP-IG over weights and over inputs (8 steps) against exact patching of `count`
    edges drawn at random (numpy seed 1): Spearman signed and of |score| (times include
    compiling)."""
    from interp import circuits

    graph = circuits.component_graph(model)
    sample = np.random.default_rng(1).choice(graph.num_edges, count, replace=False)
    exact = circuits.edge_patching(model, clean, corrupted, metric, edges=sample.tolist())
    rows = []
    for name, options in (("eap", dict(method="eap")), ("eap_ig_weights", dict(steps=8)),
                          ("eap_ig_inputs", dict(steps=8, over="inputs"))):
        start = time.perf_counter()
        scores = circuits.edge_attribution(model, clean, corrupted, metric, **options).scores
        seconds = time.perf_counter() - start
        signed = circuits.spearman(scores[sample], exact.scores[sample])
        magnitude = circuits.spearman(np.abs(scores[sample]), np.abs(exact.scores[sample]))
        out[f"random_{name}"] = {"seconds": seconds, "spearman": signed,
                                 "spearman_abs": magnitude}
        rows.append((name, f"{seconds:.1f}", f"{signed:.3f}", f"{magnitude:.3f}"))
    print(f"{count} random edges against exact patching:")
    print(table(rows, ("method", "seconds (with compiling)", "Spearman", "Spearman of |score|")))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strings", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sample", type=int, default=300)
    p.add_argument("--acdc-start", type=int, default=120)
    p.add_argument("--threshold", type=float, default=0.02)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--parts", default="edges,nodes,random",
                   help="edges (EAP, EAP-IG, exact, faithfulness, ACDC), nodes (AtP, AtP*), "
                   "random (every estimate against exact patching of 120 random edges); "
                   "results of parts not run are kept from the results file")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))

    from gemma_eqx import from_pretrained
    from interp import circuits

    model, tokenizer = from_pretrained()
    clean, corrupted, metric = task(tokenizer, args.strings)
    graph = circuits.component_graph(model)
    out: dict = json.loads(args.results.read_text()) if args.results.exists() else {}
    out.update({"graph": repr(graph), "strings": args.strings, "tokens": clean.shape[1]})

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        out[f"seconds_{name}"] = time.perf_counter() - start
        print(f"{name}: {out[f'seconds_{name}']:.1f} s", flush=True)
        return result

    if "nodes" in parts:
        nodes(model, clean, corrupted, metric, out, timed)
        print(table([(f"{m} ({k})", f"{out[f'seconds_{m}_{k}']:.1f}",
                      f"{out.get(f'spearman_{m}_{k}', float('nan')):.3f}",
                      f"{out[f'spearman_abs_{m}_{k}']:.3f}", str(out[f"top10_overlap_{m}_{k}"]))
                     for k in ("receivers", "senders")
                     for m in (("atp", "atp+qk", "atp*") if k == "receivers" else ("atp", "atp*"))],
                    ("method", "seconds", "Spearman", "Spearman of |score|", "top-10 shared")))
        print(f"exact node patching: receivers {out['seconds_exact_receivers']:.0f} s, senders "
              f"{out['seconds_exact_senders']:.0f} s")
    if "random" in parts:
        random_edges(model, clean, corrupted, metric, out)
    if "edges" not in parts:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=1) + "\n")
        return
    timed("eap_cold", lambda: circuits.edge_attribution(model, clean, corrupted, metric,
                                                        method="eap"))
    eap = timed("eap", lambda: circuits.edge_attribution(model, clean, corrupted, metric,
                                                         method="eap"))
    ig = timed("eap_ig", lambda: circuits.edge_attribution(model, clean, corrupted, metric,
                                                           steps=args.steps))
    out.update(clean=eap.clean, corrupted=eap.corrupted, eap_ig_sum=float(ig.scores.sum()))

    rng = np.random.default_rng(0)
    order = np.argsort(-np.abs(ig.scores))
    top = order[:args.sample // 2]
    rest = rng.choice(order[args.sample // 2:], args.sample - len(top), replace=False)
    sample = np.concatenate([top, rest])
    warm = circuits.edge_patching(model, clean, corrupted, metric, edges=sample[:6].tolist())
    del warm  # compiles the program the timed sweep reuses
    exact = timed("exact_sample", lambda: circuits.edge_patching(
        model, clean, corrupted, metric, edges=sample.tolist()))
    per_edge = out["seconds_exact_sample"] / len(sample)
    out["seconds_exact_all_edges_estimated"] = per_edge * graph.num_edges
    for name, scores in (("eap", eap), ("eap_ig", ig)):
        out[f"spearman_{name}_sample"] = circuits.spearman(scores.scores[sample],
                                                           exact.scores[sample])
        out[f"spearman_{name}_random"] = circuits.spearman(scores.scores[rest],
                                                           exact.scores[rest])
    out["speed_ratio_eap_ig_vs_exact"] = (out["seconds_exact_all_edges_estimated"]
                                          / out["seconds_eap_ig"])

    sizes = [10, 20, 50, 100, 200, 500, 1000, 2000, graph.num_edges]
    curve = timed("faithfulness", lambda: circuits.faithfulness_curve(
        model, clean, corrupted, metric, ig, sizes))
    out["faithfulness"] = dict(zip(map(str, sizes), curve.faithfulness.round(4).tolist(),
                                   strict=True))
    out["faithfulness_area"] = curve.area

    start = [int(e) for e in order[:args.acdc_start]]
    result = timed("acdc", lambda: circuits.acdc(model, clean, corrupted,
                                                 threshold=args.threshold,
                                                 positions=metric.positions, start=start))
    kept = result.kept.astype(np.float32)
    value = circuits.circuit_metrics(model, clean, corrupted, metric, kept[None])[0]
    out.update(acdc_runs=result.runs, acdc_kept=int(kept.sum()), acdc_edges=result.edges,
               acdc_faithfulness=float((value - curve.corrupted)
                                       / (curve.clean - curve.corrupted)),
               eap_ig_top=ig.top(15), eap_top=eap.top(15))

    print(table([
        ("EAP", f"{out['seconds_eap']:.1f}", f"{out['spearman_eap_sample']:.3f}",
         f"{out['spearman_eap_random']:.3f}"),
        (f"EAP-IG ({args.steps} steps)", f"{out['seconds_eap_ig']:.1f}",
         f"{out['spearman_eap_ig_sample']:.3f}", f"{out['spearman_eap_ig_random']:.3f}"),
        ("exact, all edges (from the sample)", f"{out['seconds_exact_all_edges_estimated']:.0f}",
         "1", "1"),
    ], ("method", "seconds", "Spearman (sample)", "Spearman (random part)")))
    print(f"EAP-IG is {out['speed_ratio_eap_ig_vs_exact']:.0f}x faster than exact patching of "
          f"all {graph.num_edges} edges")
    print("faithfulness of the top-n EAP-IG edges:", out["faithfulness"],
          f"area {curve.area:.3f}")
    print(f"ACDC from the top {args.acdc_start}: {out['acdc_kept']} edges kept, faithfulness "
          f"{out['acdc_faithfulness']:.3f}, {result.runs} runs, {out['seconds_acdc']:.0f} s")
    print("ACDC's circuit:", ", ".join(result.edges))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
