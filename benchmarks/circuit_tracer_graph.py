"""circuit-tracer 0.5.0's own pruning and graph file, on an attribution graph of ours.

    $CIRCUIT_TRACER_PYTHON benchmarks/circuit_tracer_graph.py GRAPH.npz OUT.json

Runs in circuit-tracer's virtual environment (never in the package's: `pip install torch==2.13.0
&& pip install circuit-tracer==0.5.0 -c constraints.txt` with torch pinned there). GRAPH.npz
holds an unpruned graph in circuit-tracer's node order (features, errors by layer then position,
tokens, logits), as `interp.circuits.attribution_graph` builds it: `adjacency [N, N]` (rows
targets), `features [F, 3]` (layer, position, feature), `activations [F]`, `tokens [S]`,
`logit_tokens [K]`, `logit_probabilities [K]`, `num_layers`, `prompt_pieces [S]`,
`logit_pieces [K]`, `slug`, `scan`, `prompt`, `node_threshold`, `edge_threshold`.

OUT.json gets `circuit_tracer.graph.prune_graph`'s node mask, edge mask (as [target, source]
pairs) and cumulative scores, and the graph file that `create_graph_files` would write (built
by its own `create_nodes`, `create_used_nodes_and_edges` and `build_model`; only the tokenizer
is replaced, by the pieces given, since a Hugging Face download cannot work here).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import torch
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.graph import Graph, prune_graph
from circuit_tracer.utils.create_graph_files import (
    build_model,
    create_nodes,
    create_used_nodes_and_edges,
)


def main(graph_path: str, out_path: str) -> None:
    data = np.load(graph_path)
    pieces = {int(t): str(p) for t, p in zip(data["tokens"], data["prompt_pieces"],
                                               strict=True)}
    # Graph.__init__ converts a TransformerLens or nnsight config; the functions used here read
    # only the fields set below.
    graph = Graph.__new__(Graph)
    graph.input_string = str(data["prompt"])
    graph.input_tokens = torch.tensor(data["tokens"], dtype=torch.long)
    graph.n_pos = len(data["tokens"])
    graph.active_features = torch.tensor(data["features"], dtype=torch.long)
    graph.selected_features = torch.arange(len(data["features"]))
    graph.activation_values = torch.tensor(data["activations"], dtype=torch.float32)
    graph.adjacency_matrix = torch.tensor(data["adjacency"], dtype=torch.float32)
    graph.logit_targets = [LogitTarget(token_str=str(p), vocab_idx=int(t)) for t, p in
                           zip(data["logit_tokens"], data["logit_pieces"], strict=True)]
    graph.logit_probabilities = torch.tensor(data["logit_probabilities"], dtype=torch.float32)
    graph.cfg = SimpleNamespace(n_layers=int(data["num_layers"]))
    graph.scan = str(data["scan"])
    node_threshold, edge_threshold = float(data["node_threshold"]), float(data["edge_threshold"])
    node_mask, edge_mask, cumulative = prune_graph(graph, node_threshold, edge_threshold)
    tokenizer = SimpleNamespace(decode=lambda t: pieces[int(t)])
    nodes = create_nodes(graph, node_mask, tokenizer, cumulative)
    used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, edge_mask)
    model = build_model(graph, used_nodes, used_edges, str(data["slug"]), str(data["scan"]),
                        node_threshold, tokenizer)
    out = {"node_mask": node_mask.tolist(), "edge_mask": edge_mask.nonzero().tolist(),
           "cumulative": cumulative.tolist(), "graph": json.loads(model.model_dump_json()),
           "circuit_tracer": __import__("circuit_tracer").__version__}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
