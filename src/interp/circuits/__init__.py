"""Circuits found automatically: the component graph of a model, circuits run exactly
(every edge outside them patched), edge and node attribution, ACDC, composition scores.

`interp.circuits` may import `interp` and `interp.features`; nothing below imports it."""

from .edges import SenderOutputs, circuit_metrics, patch_outputs, sender_outputs
from .graph import ComponentGraph, Receiver, Sender, component_graph

__all__ = ["ComponentGraph", "Receiver", "Sender", "SenderOutputs", "circuit_metrics",
           "component_graph", "patch_outputs", "sender_outputs"]
