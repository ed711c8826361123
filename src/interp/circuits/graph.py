"""The component graph of a transformer: who writes into the residual stream, who reads it,
and the edges between them.

Senders (nodes that write): `input` (the token embedding, scaled, plus learned positions where
a model has them), every attention head `a{layer}.h{head}` and every MLP `m{layer}`.
Receivers (inputs that read): each query head's query input `a{layer}.h{head}<q>`, each key
head's key and value inputs `a{layer}.kv{group}<k>` / `<v>`, each MLP's input `m{layer}<in>`
and the logits `logits`. Grouped-query attention, stated plainly: a key or value receiver
belongs to a key head, which every query head of its group reads (`heads // kv_heads` of
them); a model with as many key heads as query heads has one per head, a multi-query model
(Gemma 3 270M: 4 query heads, 1 key head) one per layer.

An edge is a sender and a receiver that it can reach through the residual stream: a sender
of layer `l` reaches every receiver of a later layer and the logits; a head also reaches the
MLP of its own layer (not in a parallel block, GPT-NeoX's, whose MLP reads the block's
input); `input` reaches everything. A circuit is a set of edges (`circuit_weights`).

A head's output is `head_out` (`mixed_values[h] @ w_o[h]`), before the post-attention norm
of Gemma 2 and 3: that norm acts on the sum of the layer's heads, so each receiver's input
holds its own post-norm of its own mix of the layer's heads (`interp.circuits.edges`). An
MLP's output is `mlp_out_normed` (after its post-norm).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from gemma_eqx.model.modules import Transformer


@dataclass(frozen=True)
class Sender:
    """A node that writes into the residual stream."""

    kind: str            # "input", "head" or "mlp"
    layer: int           # -1 for input
    index: int = 0       # the head (heads only)

    @property
    def name(self) -> str:
        return {"input": "input", "head": f"a{self.layer}.h{self.index}",
                "mlp": f"m{self.layer}"}[self.kind]


@dataclass(frozen=True)
class Receiver:
    """An input that reads the residual stream."""

    kind: str            # "q", "k", "v", "mlp" or "logits"
    layer: int           # the number of layers for logits
    index: int = 0       # the query head (q) or key head (k, v)

    @property
    def name(self) -> str:
        if self.kind == "q":
            return f"a{self.layer}.h{self.index}<q>"
        if self.kind in ("k", "v"):
            return f"a{self.layer}.kv{self.index}<{self.kind}>"
        return f"m{self.layer}<in>" if self.kind == "mlp" else "logits"


def reaches(sender: Sender, receiver: Receiver, parallel: bool) -> bool:
    """Whether `sender`'s output is part of `receiver`'s input stream."""
    if receiver.layer > sender.layer:
        return True
    return (receiver.layer == sender.layer and sender.kind == "head"
            and receiver.kind == "mlp" and not parallel)


@dataclass(frozen=True)
class ComponentGraph:
    """Senders, receivers and every edge between them of a model's architecture.

    `edges[i]` is `(sender index, receiver index)`; edges are ordered by receiver, then
    sender (the order of every score vector over edges)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    parallel: bool
    senders: tuple[Sender, ...] = field(repr=False)
    receivers: tuple[Receiver, ...] = field(repr=False)
    edges: tuple[tuple[int, int], ...] = field(repr=False)

    def __repr__(self) -> str:
        return (f"ComponentGraph({len(self.senders)} senders, {len(self.receivers)} "
                f"receivers, {len(self.edges)} edges; {self.num_layers} layers of "
                f"{self.num_heads} heads, {self.num_kv_heads} key heads)")

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    def sender_index(self, name: str) -> int:
        return _lookup({s.name: i for i, s in enumerate(self.senders)}, name, "sender")

    def receiver_index(self, name: str) -> int:
        return _lookup({r.name: i for i, r in enumerate(self.receivers)}, name, "receiver")

    def edge_name(self, edge: int) -> str:
        s, r = self.edges[edge]
        return f"{self.senders[s].name}->{self.receivers[r].name}"

    def edge_names(self) -> list[str]:
        return [self.edge_name(e) for e in range(self.num_edges)]

    def edge_index(self, sender: str, receiver: str) -> int:
        """The index of the edge `sender -> receiver`; an error that says why when the sender
        cannot reach the receiver."""
        s, r = self.sender_index(sender), self.receiver_index(receiver)
        index = self._edge_lookup.get((s, r))
        if index is None:
            raise ValueError(
                f"{sender} (layer {self.senders[s].layer}) cannot send to {receiver} (layer "
                f"{self.receivers[r].layer}): a sender reaches only receivers of later layers "
                f"and the logits (a head also its own layer's MLP"
                f"{', not in a parallel block' if self.parallel else ''})")
        return index

    @property
    def _edge_lookup(self) -> dict[tuple[int, int], int]:
        lookup = self.__dict__.get("_lookup")
        if lookup is None:
            lookup = {e: i for i, e in enumerate(self.edges)}
            object.__setattr__(self, "_lookup", lookup)
        return lookup

    def edges_of(self, names: Iterable[str | tuple[str, str]]) -> list[int]:
        """Edge indices from names `'a0.h1->a2.h0<q>'` or pairs `('a0.h1', 'a2.h0<q>')`."""
        out = []
        for name in names:
            if isinstance(name, str):
                if "->" not in name:
                    raise ValueError(f"an edge is named 'sender->receiver'; got {name!r}")
                name = tuple(name.split("->", 1))
            out.append(self.edge_index(*name))
        return out

    def circuit_weights(self, edges: Iterable[int | str | tuple[str, str]]) -> np.ndarray:
        """The weight vector `[edges]` of a circuit: 1 on its edges (the clean input), 0 on
        every other (the corrupted one). An empty circuit is refused."""
        edges = list(edges)
        indices = [e for e in edges if isinstance(e, (int, np.integer))]
        indices += self.edges_of(e for e in edges if not isinstance(e, (int, np.integer)))
        if not indices:
            raise ValueError("a circuit needs at least one edge; got none")
        bad = [i for i in indices if not 0 <= i < self.num_edges]
        if bad:
            raise ValueError(f"edge index {bad[0]} is out of range for a graph of "
                             f"{self.num_edges} edges")
        weights = np.zeros(self.num_edges, np.float32)
        weights[np.asarray(indices)] = 1
        return weights

    def sender_edges(self) -> list[np.ndarray]:
        """For each sender, the indices of its outgoing edges."""
        ids = np.asarray([s for s, _ in self.edges])
        return [np.flatnonzero(ids == s) for s in range(len(self.senders))]

    def receiver_edges(self) -> list[np.ndarray]:
        """For each receiver, the indices of its incoming edges."""
        ids = np.asarray([r for _, r in self.edges])
        return [np.flatnonzero(ids == r) for r in range(len(self.receivers))]

    def dense(self, values: np.ndarray) -> np.ndarray:
        """A vector over edges as a `[senders, receivers]` matrix (NaN where no edge)."""
        values = np.asarray(values)
        if values.shape[-1] != self.num_edges:
            raise ValueError(f"values over edges must end in an axis of {self.num_edges}; got "
                             f"shape {values.shape}")
        out = np.full((*values.shape[:-1], len(self.senders), len(self.receivers)), np.nan)
        s, r = np.asarray(self.edges).T
        out[..., s, r] = values
        return out


def _lookup(table: dict[str, int], name: str, what: str) -> int:
    if name not in table:
        examples = ", ".join(list(table)[:4])
        raise ValueError(f"no {what} named {name!r} in this graph (names like {examples}, ...)")
    return table[name]


def component_graph(model: Transformer) -> ComponentGraph:
    """The component graph of `model`'s architecture (see the module docstring)."""
    config = model.config
    layers, heads, kv = config.num_layers, config.num_heads, config.num_kv_heads
    parallel = bool(config.parallel_residual)
    senders = [Sender("input", -1)]
    receivers = []
    for layer in range(layers):
        senders += [Sender("head", layer, h) for h in range(heads)] + [Sender("mlp", layer)]
        receivers += [Receiver("q", layer, h) for h in range(heads)]
        receivers += [Receiver("k", layer, g) for g in range(kv)]
        receivers += [Receiver("v", layer, g) for g in range(kv)]
        receivers.append(Receiver("mlp", layer))
    receivers.append(Receiver("logits", layers))
    edges = tuple((s, r) for r, receiver in enumerate(receivers)
                  for s, sender in enumerate(senders) if reaches(sender, receiver, parallel))
    return ComponentGraph(layers, heads, kv, parallel, tuple(senders), tuple(receivers), edges)


__all__ = ["ComponentGraph", "Receiver", "Sender", "component_graph", "reaches"]
