"""Circuits found automatically: the component graph of a model, circuits run exactly
(every edge outside them patched), edge and node attribution (EAP, EAP-IG, AtP, AtP*), ACDC,
composition scores, how faithful, minimal and complete a circuit is, and attribution graphs
over transcoders (circuit-tracer's).

`interp.circuits` may import `interp` and `interp.features`; nothing below imports it."""

from .acdc import ACDCResult, acdc, kl_from_clean
from .attribution_graph import (
    AttributionGraph,
    PrunedGraph,
    attribution_graph,
    draw_graph,
    graph_json,
    prune,
    write_graph_json,
)
from .composition import composition_scores
from .edges import SenderOutputs, circuit_metrics, patch_outputs, sender_outputs
from .evaluate import (
    CircuitEvaluation,
    FaithfulnessCurve,
    evaluate_circuit,
    faithfulness_curve,
    ranked_edges,
    spearman,
)
from .graph import ComponentGraph, Receiver, Sender, component_graph
from .scores import (
    EdgeScores,
    NodeScores,
    edge_attribution,
    edge_patching,
    node_attribution,
    node_patching,
)

__all__ = [
    "ACDCResult", "AttributionGraph", "CircuitEvaluation", "ComponentGraph", "EdgeScores",
    "FaithfulnessCurve", "NodeScores", "PrunedGraph", "Receiver", "Sender", "SenderOutputs",
    "acdc", "attribution_graph", "circuit_metrics", "component_graph", "composition_scores",
    "draw_graph", "edge_attribution", "edge_patching", "evaluate_circuit", "faithfulness_curve",
    "graph_json", "kl_from_clean", "node_attribution", "node_patching", "patch_outputs",
    "prune", "ranked_edges", "sender_outputs", "spearman", "write_graph_json",
]
