"""Circuits found automatically: the component graph of a model, circuits run exactly
(every edge outside them patched), edge and node attribution (EAP, EAP-IG), ACDC, composition
scores, and how faithful a circuit is.

`interp.circuits` may import `interp` and `interp.features`; nothing below imports it."""

from .acdc import ACDCResult, acdc, kl_from_clean
from .composition import composition_scores
from .edges import SenderOutputs, circuit_metrics, patch_outputs, sender_outputs
from .evaluate import FaithfulnessCurve, faithfulness_curve, spearman
from .graph import ComponentGraph, Receiver, Sender, component_graph
from .scores import EdgeScores, edge_attribution, edge_patching, node_patching

__all__ = ["ACDCResult", "ComponentGraph", "EdgeScores", "FaithfulnessCurve", "Receiver",
           "Sender", "SenderOutputs", "acdc", "circuit_metrics", "component_graph",
           "composition_scores", "edge_attribution", "edge_patching", "faithfulness_curve",
           "kl_from_clean", "node_patching", "patch_outputs", "sender_outputs",
           "spearman"]
