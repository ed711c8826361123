"""ACDC (Conmy et al. 2023): prune the component graph edge by edge, from the logits back,
keeping an edge only when removing it moves the output more than a threshold. Every step
is exact: the circuit so far is run with every removed edge carrying the corrupted input
(`interp.circuits.edges`).

The objective is minimised: by default the KL divergence of the circuit's next-token
distribution from the clean model's at the scored positions (averaged over them and the
batch); with a task `metric`, `|metric(circuit) - metric(clean)|`. An edge is removed when
the objective rises by less than `threshold`.

Receivers are visited in reverse order of the forward pass (the logits, then each layer from
the last: its MLP, then its value, key and query inputs), and each receiver's senders from the
latest. A receiver whose node no longer sends anything (every outgoing edge removed) has
nothing to test: its incoming edges are removed without a run, as ACDC's removal of
disconnected nodes does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gemma_eqx.core.runtime import progress
from gemma_eqx.model.modules import Transformer

from .edges import (
    ScalarMetric,
    _forward,
    _ids,
    as_scalar_metric,
    check_pair,
    patch_outputs,
    sender_outputs,
)
from .graph import ComponentGraph, component_graph


def _kl(logits, data):
    reference, = data
    p = jax.nn.log_softmax(reference, axis=-1)
    q = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.exp(p) * (p - q)).sum(-1).mean()


def kl_from_clean(model: Transformer, clean: Any, positions: Any) -> ScalarMetric:
    """KL(clean model || circuit) of the next-token distributions at `positions` (indices
    into seq), averaged over them and the batch."""
    from ..patching import _positions

    clean = jnp.asarray(clean)
    cols = tuple(int(p) for p in np.asarray(_positions(positions, clean.shape[1])))
    at = jnp.broadcast_to(jnp.asarray(cols), (clean.shape[0], len(cols)))
    reference = model.forward(clean, logits_at=at).logits.astype(jnp.float32)
    return ScalarMetric(_kl, cols, (reference,))


def _distance(logits, data):
    metric, target = data
    return jnp.abs(metric(logits) - target)


@eqx.filter_jit
def _objective(model, tokens, padding_mask, weights, patch, metric):
    return _forward(model, tokens, padding_mask, weights, patch, False, metric)[0]


@dataclass(frozen=True)
class ACDCResult:
    """The edges ACDC kept (`kept[i]` for `graph.edges[i]`), the objective along the way
    (`trajectory`: after each tested edge), how many runs it took and their time."""

    graph: ComponentGraph
    kept: np.ndarray
    threshold: float
    objective: str
    trajectory: list[float] = field(repr=False)
    runs: int
    seconds: float

    @property
    def edges(self) -> list[str]:
        return [self.graph.edge_name(int(e)) for e in np.flatnonzero(self.kept)]


def _receiver_order(graph: ComponentGraph) -> list[int]:
    order = {"logits": 0, "mlp": 1, "v": 2, "k": 3, "q": 4}
    return sorted(range(len(graph.receivers)),
                  key=lambda r: (-graph.receivers[r].layer, order[graph.receivers[r].kind],
                                 -graph.receivers[r].index))


def _senders_of(graph: ComponentGraph, receiver: int) -> list[int]:
    """The sender nodes a receiver belongs to (the query head; the key head's group; the
    MLP; none for the logits)."""
    heads_of, mlp_of, _ = _ids(graph)
    r = graph.receivers[receiver]
    if r.kind == "q":
        return [int(heads_of(r.layer)[r.index])]
    if r.kind in ("k", "v"):
        group = graph.num_heads // graph.num_kv_heads
        return [int(h) for h in heads_of(r.layer)[r.index * group:(r.index + 1) * group]]
    return [mlp_of(r.layer)] if r.kind == "mlp" else []


def acdc(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    *,
    threshold: float,
    positions: Any = None,
    metric: Any = None,
    start: Any = None,
    how: str = "corrupted",
    padding_mask: Any = None,
    verbose: bool = False,
) -> ACDCResult:
    """Prune the edges of `model`'s component graph on `clean` vs `corrupted` (module
    docstring). `positions` are the scored positions of the KL objective (or give a task
    `metric`); `start`: the edges to begin from (indices or names; default all of them: the
    others are removed from the outset)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0; got {threshold!r}")
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    graph = component_graph(model)
    if metric is None:
        if positions is None:
            raise ValueError("acdc needs the positions its KL objective scores, or a metric")
        objective, name = kl_from_clean(model, clean, positions), "KL from the clean model"
    else:
        scalar = as_scalar_metric(model, metric, clean)
        target, _ = sender_outputs(model, clean, metric=scalar, padding_mask=padding_mask)
        objective = ScalarMetric(_distance, scalar.positions, (scalar, target))
        name = "|metric - clean metric|"
    patch = patch_outputs(model, corrupted, clean, how, padding_mask, objective)
    kept = np.ones(graph.num_edges, bool) if start is None else \
        graph.circuit_weights(start).astype(bool)
    begin = time.perf_counter()

    def run(mask: np.ndarray) -> float:
        return float(_objective(model, clean, padding_mask, jnp.asarray(mask, jnp.float32),
                                patch, objective))

    current = run(kept)
    trajectory, runs = [current], 1
    incoming = graph.receiver_edges()
    outgoing = graph.sender_edges()
    order = _receiver_order(graph)
    for receiver in progress(order, "acdc", show=verbose, unit="receiver"):
        owners = _senders_of(graph, receiver)
        edges = [e for e in incoming[receiver][::-1] if kept[e]]
        if owners and not any(kept[outgoing[s]].any() for s in owners):
            kept[edges] = False  # the node sends nothing: its inputs cannot matter
            continue
        for e in edges:
            kept[e] = False
            value = run(kept)
            runs += 1
            if value - current < threshold:
                current = value
            else:
                kept[e] = True
            trajectory.append(current)
    return ACDCResult(graph, kept, float(threshold), name, trajectory, runs,
                      time.perf_counter() - begin)


__all__ = ["ACDCResult", "acdc", "kl_from_clean"]
