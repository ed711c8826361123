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
- `atp` for nodes (Nanda 2022): a node's gradient is the sum of its edges' (every edge out of
  a sender patched at once is the sender patched; every edge into a receiver, the receiver's
  input taken from the corrupted run), so node scores come from the same pass.
- `atp*` for nodes (Kramár et al. 2024), AtP with two fixes:
  - the QK fix: a query or key receiver's effect goes through its heads' attention weights,
    which saturate; their patched weights are computed exactly (the model's attention with
    the corrupted run's queries, or keys, and the clean rest), and only their effect from
    there on is linear, `sum (A_patched - A) * d metric / d A`;
  - GradDrop: AtP recomputed with the gradient through each layer's outputs dropped in turn,
    `sum over layers l of |AtP with layer l dropped| / (layers - 1)`, so that an effect
    cancelled along one path still shows. It estimates a magnitude (scores >= 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import SiteHooks

from ..capture import capture
from ..interventions import Record, Replace
from .edges import (
    Probe,
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


def _node_edges(graph: ComponentGraph, nodes: str) -> tuple[list[str], list[np.ndarray]]:
    if nodes == "senders":
        return [n.name for n in graph.senders], graph.sender_edges()
    if nodes == "receivers":
        return [n.name for n in graph.receivers], graph.receiver_edges()
    raise ValueError(f"nodes must be 'senders' or 'receivers'; got {nodes!r}")


def node_patching(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    nodes: str = "senders",
    how: str = "corrupted",
    padding_mask: Any = None,
    chunk: int = 8,
) -> np.ndarray:
    """The exact score of each node: `metric` with every edge out of it patched (a sender:
    its output replaced in every receiver's input) or into it (a receiver: its input taken
    whole from the corrupted run), minus the clean metric; `[nodes]`, in the order of
    `component_graph(model).senders` (or `.receivers`). AtP's and AtP*'s estimates of the same
    numbers: `node_attribution`."""
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    scalar = as_scalar_metric(model, metric, clean)
    graph = component_graph(model)
    _, groups = _node_edges(graph, nodes)
    weights = np.ones((len(groups) + 1, graph.num_edges), np.float32)
    for s, edges in enumerate(groups):
        weights[s, edges] = 0
    values = circuit_metrics(model, clean, corrupted, scalar, weights, how=how,
                             padding_mask=padding_mask, chunk=chunk)
    return np.asarray(values[:-1] - values[-1], np.float64)


@dataclass(frozen=True)
class NodeScores:
    """A score per node (`names[i]`: a sender or a receiver of `graph`), estimating what
    `node_patching` computes exactly; `method` "atp", "atp+qk" (QK fix only) or "atp*" (QK fix
    and GradDrop: magnitudes, >= 0)."""

    graph: ComponentGraph
    names: tuple[str, ...]
    scores: np.ndarray
    method: str
    seconds: float

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The `n` nodes of largest |score|, with their scores."""
        order = np.argsort(-np.abs(self.scores), kind="stable")[:n]
        return [(self.names[int(i)], float(self.scores[i])) for i in order]


def _node_gradients(model, tokens, padding_mask, weights, patch, metric, probe):
    def value(w, pattern):
        p = Probe(pattern, probe.keep)
        return _forward(model, tokens, padding_mask, w, patch, False, metric, probe=p)[0]
    return jax.grad(value, argnums=(0, 1))(weights, probe.pattern)


_node_gradients_jit = eqx.filter_jit(_node_gradients)


def _patterns(model: Transformer, clean: Array, corrupted: Array, padding_mask: Array
              ) -> tuple[Array, Array, Array]:
    """Per layer, the attention weights `[layers, batch, heads, query, key]` of the clean
    run, with every head's query taken from the corrupted run, and with every key head's keys
    taken from it (the rest clean): the model's own attention on the recorded q, k, v (a
    head's weights depend on its own query and its group's keys only, so patching all heads
    at once gives each head's own patched weights)."""
    positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)
    dtype = model.activation_dtype
    sites = ["q", "k", "v"]
    _, ours = capture(model, clean, sites=sites, padding_mask=padding_mask)
    _, theirs = capture(model, corrupted, sites=sites, padding_mask=padding_mask)
    x = jnp.zeros((*clean.shape, model.config.embed_dim), dtype)

    def pattern(layer: int, q: Array, k: Array, v: Array) -> Array:
        records: dict[str, Any] = {}
        hooks = SiteHooks((Replace("q", value=q), Replace("k", value=k), Replace("v", value=v),
                           Record("pattern")))
        # The projections of `x` are replaced (and never computed).
        model.blocks[layer].attn(x, positions, padding_mask, hooks=hooks, records=records,
                                 layer=layer)
        return records[f"blocks.{layer}.pattern"].astype(jnp.float32)

    base, by_query, by_key = [], [], []
    for layer in range(len(model.blocks)):
        q, k, v = (ours[site, layer] for site in sites)
        q_other, k_other = theirs["q", layer], theirs["k", layer]
        base.append(pattern(layer, q, k, v))
        by_query.append(pattern(layer, q_other, k, v))
        by_key.append(pattern(layer, q, k_other, v))
    return jnp.stack(base), jnp.stack(by_query), jnp.stack(by_key)


NODE_METHODS = ("atp", "atp+qk", "atp*")


def node_attribution(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    *,
    nodes: str = "receivers",
    method: str = "atp*",
    padding_mask: Any = None,
) -> NodeScores:
    """A score per node (`nodes` "receivers" or "senders" of the component graph), estimating
    `node_patching`'s exact scores (module docstring): `method` "atp", "atp+qk" (the QK fix on
    query and key receivers) or "atp*" (the QK fix and GradDrop: one gradient pass more per
    layer). Senders have no QK fix (their effect on later attention weights stays linear, as
    in the paper)."""
    if method not in NODE_METHODS:
        raise ValueError(f"method must be one of {', '.join(NODE_METHODS)}; got {method!r}")
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    scalar = as_scalar_metric(model, metric, clean)
    graph = component_graph(model)
    names, groups = _node_edges(graph, nodes)
    start = time.perf_counter()
    _, patch = sender_outputs(model, corrupted, metric=scalar, padding_mask=padding_mask)
    layers, heads = graph.num_layers, graph.num_heads
    qk_fix = method != "atp" and nodes == "receivers"
    if qk_fix:
        base, by_query, by_key = (np.asarray(a, np.float64) for a in
                                  _patterns(model, clean, corrupted, padding_mask))
    zeros = jnp.zeros((layers, clean.shape[0], heads, clean.shape[1], clean.shape[1]),
                      jnp.float32)
    group = heads // graph.num_kv_heads
    drops = [None, *range(layers)] if method == "atp*" else [None]
    estimates = []
    for drop in drops:
        keep = np.ones(len(graph.senders), np.float32)
        if drop is not None:
            keep[[i for i, s in enumerate(graph.senders) if s.layer == drop]] = 0
        grad_w, grad_pattern = _node_gradients_jit(
            model, clean, padding_mask, jnp.ones((graph.num_edges,)), patch, scalar,
            Probe(zeros, jnp.asarray(keep)))
        edge = -np.asarray(grad_w, np.float64)
        node = np.asarray([edge[g].sum() for g in groups])
        if qk_fix:
            g = np.asarray(grad_pattern, np.float64)
            by_head_q = ((by_query - base) * g).sum((1, 3, 4))          # [layers, heads]
            by_head_k = ((by_key - base) * g).sum((1, 3, 4))
            by_group_k = by_head_k.reshape(layers, -1, group).sum(-1)   # [layers, kv heads]
            for r, receiver in enumerate(graph.receivers):
                if receiver.kind == "q":
                    node[r] = by_head_q[receiver.layer, receiver.index]
                elif receiver.kind == "k":
                    node[r] = by_group_k[receiver.layer, receiver.index]
        if drop is not None and nodes == "senders":
            # The layer dropped is the node's own: its gradient is that layer's output's.
            node[keep[:len(node)] == 0] = 0
        estimates.append(node)
    if method == "atp*":
        scores = np.abs(np.stack(estimates[1:])).sum(0) / max(layers - 1, 1)
    else:
        scores = estimates[0]
    return NodeScores(graph, tuple(names), scores, method, time.perf_counter() - start)


__all__ = ["METHODS", "NODE_METHODS", "EdgeScores", "NodeScores", "edge_attribution",
           "edge_patching", "node_attribution", "node_patching"]
