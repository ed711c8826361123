"""Scores of edges and nodes: exact patching, one edge (or node) at a time, and its
gradient-based estimates.

Every score estimates the same number: how much `metric` changes when the edge (node) is
patched, `metric(edge patched) - metric(clean)`. The estimates, on the edge weights of
`interp.circuits.edges` (1: clean, 0: patched):

- `eap` (edge attribution patching, Syed et al. 2023): the first-order Taylor term,
  `-d metric / d w_e` at `w = 1`, i.e. `(patch_s - out_s) . d metric / d input_r` through
  the receiver's post-norm. One forward and one backward for every edge at once.
- `eap-ig` (Hanna et al. 2024): the gradient averaged over `steps` points between corrupted
  and clean (midpoints `(i + 1/2) / steps`), either along the edge weights
  (`over="weights"`: every edge from patched to clean together; the scores then sum to
  `metric(corrupted) - metric(clean)` as `steps` grows) or along the input embedding
  (`over="inputs"`: the embedding interpolated, the gradient times the clean-corrupted
  difference of each sender's output).
- `atp` for nodes (Nanda 2022; Kramár et al. 2024): a node's gradient is the sum of its
  outgoing edges' (every edge of a sender patched at once is the sender patched), so node
  scores come from the same pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gemma_eqx.model.modules import Transformer

from .edges import (
    SenderOutputs,
    _broadcast,
    _forward,
    as_scalar_metric,
    check_pair,
    circuit_metrics,
    sender_outputs,
)
from .graph import ComponentGraph, component_graph

METHODS = ("exact", "eap", "eap-ig")


@dataclass(frozen=True)
class EdgeScores:
    """A score per edge of `graph` (`scores[i]` for `graph.edges[i]`): the estimated change of
    the metric when that edge alone is patched. `clean` is the metric with no edge patched,
    `corrupted` the metric of the corrupted run (in `edge_patching` with `how="mean"`: of every
    sender at its mean); `seconds` what computing the scores took."""

    graph: ComponentGraph
    scores: np.ndarray
    method: str
    clean: float
    corrupted: float
    seconds: float

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The `n` edges of largest |score|, with their scores."""
        order = np.argsort(-np.abs(self.scores), kind="stable")[:n]
        return [(self.graph.edge_name(int(i)), float(self.scores[i])) for i in order]

    def node_scores(self) -> np.ndarray:
        """A score per sender: the sum of its outgoing edges' (exact for gradient methods,
        where a sender's gradient is that sum; an estimate for exact edge scores)."""
        return np.asarray([self.scores[e].sum() for e in self.graph.sender_edges()])


def _gradient(model, tokens, padding_mask, weights, patch, delta, metric, embedding):
    def value(w):
        return _forward(model, tokens, padding_mask, w, patch, delta, metric,
                        embedding=embedding)[0]
    return jax.grad(value)(weights)


_gradient_jit = eqx.filter_jit(_gradient)


def _difference(a: SenderOutputs, b: SenderOutputs) -> SenderOutputs:
    return jax.tree.map(lambda x, y: x - y, a, b)


def edge_attribution(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    method: str = "eap-ig",
    steps: int = 8,
    over: str = "weights",
    how: str = "corrupted",
    padding_mask: Any = None,
) -> EdgeScores:
    """A score for every edge of `model`'s component graph (see the module docstring):
    `method` "eap" or "eap-ig" (`steps` points, `over` "weights" or "inputs"); `how` what a
    patched edge carries ("corrupted", or "mean" over the corrupted batch)."""
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig' ('exact' is edge_patching); got "
                         f"{method!r}")
    if over not in ("weights", "inputs"):
        raise ValueError(f"over must be 'weights' or 'inputs'; got {over!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if how not in ("corrupted", "mean"):
        raise ValueError(f"how must be 'corrupted' or 'mean'; got {how!r}")
    if over == "inputs" and how != "corrupted":
        raise ValueError("EAP-IG over inputs interpolates between the clean and the corrupted "
                         "input: how must be 'corrupted'")
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    scalar = as_scalar_metric(model, metric, clean)
    graph = component_graph(model)
    start = time.perf_counter()
    clean_value, clean_outputs = sender_outputs(model, clean, metric=scalar,
                                                padding_mask=padding_mask)
    corrupt_value, patch = sender_outputs(model, corrupted, metric=scalar,
                                          padding_mask=padding_mask)
    if how == "mean":
        patch = _broadcast(patch.mean(), clean.shape[0])
    e = graph.num_edges
    if method == "eap":
        grads = _gradient_jit(model, clean, padding_mask, jnp.ones((e,)), patch, False, scalar,
                              None)
    elif over == "weights":
        # One compiled gradient, called at each point: any number of steps, one program.
        grads = sum(_gradient_jit(model, clean, padding_mask,
                                  jnp.full((e,), (i + 0.5) / steps, jnp.float32),
                                  patch, False, scalar, None) for i in range(steps)) / steps
    else:
        difference = _difference(clean_outputs, patch)
        grads = sum(_gradient_jit(model, clean, padding_mask, jnp.ones((e,)), difference, True,
                                  scalar, patch.input + (i + 0.5) / steps * difference.input)
                    for i in range(steps)) / steps
    scores = -np.asarray(grads, np.float64)
    seconds = time.perf_counter() - start
    name = method if method == "eap" else f"eap-ig ({over}, {steps} steps)"
    return EdgeScores(graph, scores, name, float(clean_value), float(corrupt_value), seconds)


def edge_patching(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    edges: Any = None,
    how: str = "corrupted",
    padding_mask: Any = None,
    chunk: int = 8,
) -> EdgeScores:
    """The exact score of each edge: `metric` with that edge alone patched, minus the clean
    metric (`edges`: indices or names to score, default all; the others are NaN)."""
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    scalar = as_scalar_metric(model, metric, clean)
    graph = component_graph(model)
    start = time.perf_counter()
    if edges is None:
        chosen = np.arange(graph.num_edges)
    else:
        chosen = np.flatnonzero(graph.circuit_weights(edges))
    weights = np.ones((len(chosen) + 2, graph.num_edges), np.float32)
    weights[np.arange(len(chosen)), chosen] = 0
    weights[-1] = 0  # every edge patched: the corrupted run, as this program computes it
    values = circuit_metrics(model, clean, corrupted, scalar, weights, how=how,
                             padding_mask=padding_mask, chunk=chunk)
    clean_value, corrupt_value = float(values[-2]), float(values[-1])
    scores = np.full(graph.num_edges, np.nan)
    scores[chosen] = values[:-2] - clean_value
    return EdgeScores(graph, scores, "exact", clean_value, corrupt_value,
                      time.perf_counter() - start)


def node_patching(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    how: str = "corrupted",
    padding_mask: Any = None,
    chunk: int = 8,
) -> np.ndarray:
    """The exact score of each sender (node): `metric` with every edge out of it patched (the
    node's output replaced in every receiver's input), minus the clean metric; `[senders]`,
    in `component_graph(model).senders` order. AtP's estimate of the same numbers is
    `edge_attribution(..., method="eap").node_scores()`."""
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    scalar = as_scalar_metric(model, metric, clean)
    graph = component_graph(model)
    outgoing = graph.sender_edges()
    weights = np.ones((len(outgoing) + 1, graph.num_edges), np.float32)
    for s, edges in enumerate(outgoing):
        weights[s, edges] = 0
    values = circuit_metrics(model, clean, corrupted, scalar, weights, how=how,
                             padding_mask=padding_mask, chunk=chunk)
    return np.asarray(values[:-1] - values[-1], np.float64)


__all__ = ["METHODS", "EdgeScores", "edge_attribution", "edge_patching", "node_patching"]
