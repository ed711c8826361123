"""An attribution graph on the real Gemma 3 270M (`interp.circuits.attribution_graph`): the
MLP of `--layer` replaced by a transcoder (every other MLP an error node per position), on the
study's repeated digits (BOS + A + A, A `--period` digits), pruned as circuit-tracer prunes
(nodes 0.8, edges 0.98 of the logits' influence), written as circuit-tracer's graph JSON (what
Neuronpedia's graph viewer opens) and drawn.

    python benchmarks/bench_attribution_graph.py --transcoder DIR [--layer 6] [--period 8]

`DIR` is a transcoder folder in Gemma Scope 2's layout reading `mlp_in` and writing
`mlp_out_normed` of the layer (the README's `gemma-eqx features train` run makes one at layer
6). Prints the graph's size, its time (cold: the first call compiles the backward pass), how
exactly its edges reproduce the model's values, and the most influential features; writes
`results/attribution_graph.json` (the summary), `results/graph-induction.json` and
`results/graph-induction.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transcoder", required=True, type=Path)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--period", type=int, default=8)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from gemma_eqx import from_pretrained
    from interp import circuits
    from interp.features import load_dictionary
    from interp.study import digit_task

    model, tokenizer = from_pretrained()
    transcoder = load_dictionary(args.transcoder)
    task = digit_task(model, tokenizer, period=args.period, strings=1, seed=0)
    tokens = task.tokens[0]
    pieces = list(task.token_pieces)
    out: dict = {"transcoder": str(args.transcoder), "layer": args.layer,
                 "tokens": len(tokens)}
    for name in ("cold", "warm"):
        start = time.perf_counter()
        graph = circuits.attribution_graph(model, tokens, {args.layer: transcoder})
        out[f"seconds_{name}"] = time.perf_counter() - start
    rows = np.flatnonzero(~np.isnan(graph.values))
    error = graph.adjacency[rows].sum(1) + graph.constants[rows] - graph.values[rows]
    pruned = circuits.prune(graph)
    logit_pieces = [tokenizer.id_to_piece(int(t)) for t in graph.logit_tokens]
    data = circuits.graph_json(pruned, slug="gemma3-270m-induction", scan="gemma-eqx-270m-l6",
                               prompt="".join(pieces), prompt_tokens=pieces,
                               logit_pieces=logit_pieces)
    args.results.mkdir(parents=True, exist_ok=True)
    circuits.write_graph_json(data, args.results / "graph-induction.json")
    circuits.draw_graph(pruned, args.results / "graph-induction.png", prompt_tokens=pieces,
                        logit_pieces=logit_pieces, title=f"transcoder at layer {args.layer}")
    f = len(graph.features)
    kept = np.flatnonzero(pruned.node_mask[:f])
    top = kept[np.argsort(pruned.cumulative[kept])][:10]
    errors_kept = int(pruned.node_mask[f:f + graph.num_layers * graph.positions].sum())
    out.update(
        active_features=f, nodes=len(graph.adjacency), logit_targets=logit_pieces,
        logit_probabilities=graph.logit_probabilities.round(4).tolist(),
        max_reconstruction_error=float(np.abs(error).max()),
        value_scale=float(np.abs(graph.values[rows]).max()),
        kept_features=len(kept), kept_errors=errors_kept,
        kept_edges=int(pruned.edge_mask.sum()), json_nodes=len(data["nodes"]),
        json_links=len(data["links"]),
        top_features=[(int(graph.features[i][1]), pieces[int(graph.features[i][1])],
                       int(graph.features[i][2]), round(float(graph.activations[i]), 3))
                      for i in top])
    (args.results / "attribution_graph.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(tokens)} tokens, {f} active features at layer {args.layer}, "
          f"{len(graph.adjacency)} nodes; {out['seconds_cold']:.1f} s cold, "
          f"{out['seconds_warm']:.1f} s warm")
    print(f"edges + constants reproduce the model's values to {out['max_reconstruction_error']:.2e}"
          f" (values up to {out['value_scale']:.1f})")
    print(f"pruned: {len(kept)} features, {errors_kept} error nodes, {out['kept_edges']} edges; "
          f"the JSON holds {len(data['nodes'])} nodes and {len(data['links'])} links")
    print("logit targets:", ", ".join(f"{p!r} {q:.3f}" for p, q in zip(
        logit_pieces, graph.logit_probabilities, strict=True)))
    print("most influential features (position, token, feature, activation):", out["top_features"])


if __name__ == "__main__":
    main()
