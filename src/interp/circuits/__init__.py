"""Circuits found automatically: the component graph of a model, circuits run exactly
(every edge outside them patched), edge and node attribution (EAP, EAP-IG, AtP, AtP*), ACDC,
composition scores, and how faithful, minimal and complete a circuit is.

`interp.circuits` may import `interp` and `interp.features`; nothing below imports it."""

from .acdc import ACDCResult, acdc, kl_from_clean
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

__all__ = ["ACDCResult", "CircuitEvaluation", "ComponentGraph", "EdgeScores", "FaithfulnessCurve",
           "NodeScores", "Receiver", "Sender", "SenderOutputs", "acdc", "circuit_metrics",
           "component_graph", "composition_scores", "edge_attribution", "edge_patching",
           "evaluate_circuit", "faithfulness_curve", "kl_from_clean", "node_attribution",
           "node_patching", "patch_outputs", "ranked_edges", "sender_outputs", "spearman"]
