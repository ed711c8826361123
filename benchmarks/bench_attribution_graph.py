"""An attribution graph on the real Gemma 3 270M (`interp.circuits.attribution_graph`): the MLP of
`--layer` replaced by a transcoder (every other MLP an error node per position), on the study's
repeated digits (experiment 9's graph: BOS + A + A, A 8 digits), pruned as circuit-tracer prunes
(nodes 0.8, edges 0.98 of the logits' influence), written as circuit-tracer's graph JSON (what
Neuronpedia's graph viewer opens) and drawn.

    python benchmarks/bench_attribution_graph.py --transcoder DIR [--layer 6]

`DIR` is a transcoder folder in Gemma Scope 2's layout reading `mlp_in` and writing
`mlp_out_normed` of the layer (the README's `gemma-eqx features train` run makes one at layer
6). Prints the graph's size, its time (cold: the first call compiles the backward pass), how
exactly its edges reproduce the model's values, and the most influential features; writes
`results/attribution_graph.json` (the summary), `results/graph-induction.json` and
`results/graph-induction.png`. With CIRCUIT_TRACER_PYTHON (the python of circuit-tracer 0.5.0's
own environment, `benchmarks/circuit_tracer_graph.py`) it also prunes the same graph with
circuit-tracer's `prune_graph` and prints how many nodes and edges the two keep differently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoder", required=True, type=Path)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from gemma_eqx import from_pretrained
    from interp import circuits
    from interp.features import load_dictionary
    from interp.study import digit_task
    from interp.study.circuit import GRAPH_PERIOD, graph_summary

    model, tokenizer = from_pretrained()
    transcoder = load_dictionary(args.transcoder)
    if transcoder.reads.layer != args.layer:
        sys.exit(f"{args.transcoder} is a transcoder of layer {transcoder.reads.layer}, not "
                 f"{args.layer}")
    # Experiment 9's graph: BOS + the first string's first GRAPH_PERIOD digits twice.
    task = digit_task(model, tokenizer, period=GRAPH_PERIOD, strings=1, seed=0)
    seconds = []
    for _ in range(2):  # cold, warm
        start = time.perf_counter()
        summary = graph_summary(model, tokenizer, task, transcoder)
        seconds.append(time.perf_counter() - start)
    pruned, pieces = summary.pruned, list(summary.prompt)
    args.results.mkdir(parents=True, exist_ok=True)
    circuits.write_graph_json(summary.file, args.results / "graph-induction.json")
    circuits.draw_graph(pruned, args.results / "graph-induction.png", prompt_tokens=pieces,
                        logit_pieces=list(summary.logit_targets),
                        title=f"transcoder at layer {args.layer}")
    graph = pruned.graph
    rows = np.flatnonzero(~np.isnan(graph.values))
    out = {"transcoder": str(args.transcoder), "layer": args.layer, "tokens": len(pieces),
           "seconds_cold": seconds[0], "seconds_warm": seconds[1],
           "active_features": summary.active_features, "nodes": len(graph.adjacency),
           "logit_targets": list(summary.logit_targets),
           "logit_probabilities": [round(q, 4) for q in summary.logit_probabilities],
           "max_reconstruction_error": summary.reconstruction_error,
           "value_scale": float(np.abs(graph.values[rows]).max()),
           "kept_features": summary.kept_features, "kept_errors": summary.kept_errors,
           "kept_edges": summary.kept_edges, "json_nodes": len(summary.file["nodes"]),
           "json_links": len(summary.file["links"]),
           "top_features": [[p, piece, f, round(a, 3)]
                            for p, piece, f, a in summary.top_features]}
    if os.environ.get("CIRCUIT_TRACER_PYTHON"):
        out["circuit_tracer"] = _against_circuit_tracer(pruned, pieces, summary)
    (args.results / "attribution_graph.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{out['tokens']} tokens, {out['active_features']} active features at layer "
          f"{args.layer}, {out['nodes']} nodes; {seconds[0]:.1f} s cold, {seconds[1]:.1f} s warm")
    print(f"edges + constants reproduce the model's values to "
          f"{out['max_reconstruction_error']:.2e} (values up to {out['value_scale']:.1f})")
    print(f"pruned: {out['kept_features']} features, {out['kept_errors']} error nodes, "
          f"{out['kept_edges']} edges; the JSON holds {out['json_nodes']} nodes and "
          f"{out['json_links']} links")
    print("logit targets:", ", ".join(f"{p!r} {q:.3f}" for p, q in zip(
        summary.logit_targets, summary.logit_probabilities, strict=True)))
    print("most influential features (position, token, feature, activation):",
          out["top_features"])
    if "circuit_tracer" in out:
        print("against circuit-tracer 0.5.0's prune_graph:", out["circuit_tracer"])


def _against_circuit_tracer(pruned, pieces, summary) -> dict:
    """Nodes and edges kept differently by circuit-tracer's own pruning of the same graph (in
    float32, as it computes), and the largest difference of cumulative influence."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "data"))
    from make_circuit_tracer_reference import circuit_tracer, graph_arrays

    graph = pruned.graph
    theirs = json.loads(circuit_tracer(graph_arrays(
        graph, slug="induction", scan="transcoder", prompt="".join(pieces),
        prompt_pieces=pieces, logit_pieces=list(summary.logit_targets)),
        os.environ["CIRCUIT_TRACER_PYTHON"]))
    edges = np.zeros_like(pruned.edge_mask)
    if theirs["edge_mask"]:
        edges[tuple(np.asarray(theirs["edge_mask"]).T)] = True
    return {"nodes_differing": int((pruned.node_mask != np.asarray(theirs["node_mask"])).sum()),
            "edges_differing": int((pruned.edge_mask != edges).sum()),
            "nodes_kept": int(pruned.node_mask.sum()), "edges_kept": int(pruned.edge_mask.sum()),
            "max_cumulative_difference": float(np.abs(
                pruned.cumulative - np.asarray(theirs["cumulative"])).max())}


if __name__ == "__main__":
    main()
