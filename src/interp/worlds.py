"""Counterfactual "worlds" side by side on the batch axis, and rewiring between them.

A `Worlds` names `W` variants of one batch of `n` inputs; the model runs all `W * n` rows in one
call (row `w * n + i` is input `i` in world `w`). Rewiring makes a world read a site from
another world (`rewire`), `linearize` makes a sublayer answer with its first-order response
around another world's input (a JVP), and `knock_out_in` knocks heads out in some worlds only.
Everything is an ordinary intervention: the world tables are integer array leaves, so a new
wiring of the same shape does not recompile.

    worlds = Worlds(("ablated", "restored", "original"), batch=1)
    model = knock_out_in(model, worlds, heads=[(11, 2)], where=["ablated"])
    model = rewire(model, worlds, "v", {"restored": "ablated"})  # its values from "ablated"
    logits = interp.run(model, worlds.tokens(tokens))            # [3 * batch, seq, vocab]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from gemma_eqx.core.checks import check_head_pairs, check_indices, is_index
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import site_spec

from .install import add_interventions, select_layers
from .interventions import KnockOut, Layers, Linearized, Rewire

Head = tuple[int, int]
Tokens = Int[Array, "batch seq"] | Int[np.ndarray, "batch seq"]


@dataclass(frozen=True)
class Worlds:
    """`names` of the worlds, each a copy of a batch of `batch` inputs, stacked world-major."""

    names: tuple[str, ...]
    batch: int = 1

    def __post_init__(self):
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"world names must be non-empty and distinct; got {self.names}")
        if not is_index(self.batch) or self.batch < 1:
            raise ValueError(f"batch must be an integer >= 1; got {self.batch!r}")

    @property
    def rows(self) -> int:
        return len(self.names) * self.batch

    def index(self, name: str) -> int:
        if not isinstance(name, str) or name not in self.names:
            raise ValueError(f"unknown world {name!r}; the worlds are {', '.join(self.names)}")
        return self.names.index(name)

    def tokens(
        self, tokens: Tokens | Mapping[str, Tokens]
    ) -> Int[Array, "rows seq"]:
        """The model's input: the same `tokens` in every world, or per world a
        `{name: tokens}` mapping (every world given, all of one shape)."""
        if isinstance(tokens, Mapping):
            missing = [n for n in self.names if n not in tokens]
            extra = [n for n in tokens if n not in self.names]
            if missing or extra:
                raise ValueError(f"tokens per world: missing {missing}, unknown {extra}")
            parts = [np.asarray(tokens[n]) for n in self.names]
        else:
            parts = [np.asarray(tokens)] * len(self.names)
        for name, part in zip(self.names, parts, strict=True):
            if part.ndim != 2 or part.shape[0] != self.batch or part.shape != parts[0].shape:
                raise ValueError(f"tokens of world {name!r} must have shape [batch={self.batch},"
                                 f" seq] like the others; got {part.shape}")
        return jnp.asarray(np.concatenate(parts))

    def sources(self, taking: Mapping[str, str]) -> Int[Array, " rows"]:
        """Row table for `taking = {world: source world}` (worlds not named read themselves)."""
        table = list(range(len(self.names)))
        for to, source in taking.items():
            table[self.index(to)] = self.index(source)
        return jnp.asarray(np.asarray([table[w] * self.batch + i for w in range(len(self.names))
                                       for i in range(self.batch)], np.int32))

    def split(self, x: Array | np.ndarray) -> Array | np.ndarray:
        """`[rows, ...]` to `[worlds, batch, ...]`."""
        if x.shape[0] != self.rows:
            raise ValueError(f"expected {self.rows} rows ({len(self.names)} worlds x "
                             f"{self.batch}); got {x.shape[0]}")
        return x.reshape(len(self.names), self.batch, *x.shape[1:])


def rewire(
    model: Transformer,
    worlds: Worlds,
    site: str,
    taking: Mapping[str, str],
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    weight: Array | None = None,
) -> Transformer:
    """A model in which each world named in `taking` reads `site` (on `layers`, and only the
    chosen heads / positions, times the per-unit `weight` when given: see
    `interventions.Rewire`) from its source world. Per query head on grouped-query models:
    rewire `k_per_head` / `v_per_head`, not `k` / `v`."""
    spec = site_spec(site)
    item = Rewire(spec.name, source=worlds.sources(taking), weight=weight,
                  heads=None if heads is None else check_indices(heads, None, "head"),
                  positions=None if positions is None else check_indices(positions, None,
                                                                         "position"))
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    return add_interventions(model, {i: item for i in idx})


def linearize(
    model: Transformer,
    worlds: Worlds,
    sublayer: str,
    around: Mapping[str, str],
    at: Mapping[str, str] | None = None,
    *,
    layers: Layers = None,
) -> Transformer:
    """A model whose `sublayer` ("mlp" on `layers`, or "final_norm") answers, in world `w`,
    with its first-order response around world `around[w]`'s input, evaluated at world
    `at[w]`'s input (default: `w`'s own). Worlds not named in `around` get the exact sublayer
    (they are their own linearisation point)."""
    around_rows = worlds.sources(around)
    at_rows = worlds.sources(at or {})
    if sublayer == "final_norm":
        return eqx.tree_at(lambda m: m.final_norm, model,
                           Linearized(model.final_norm, around_rows, at_rows))
    if sublayer != "mlp":
        raise ValueError(f"sublayer must be 'mlp' or 'final_norm'; got {sublayer!r}")
    idx = select_layers(model, layers)
    return eqx.tree_at(lambda m: [m.blocks[i].mlp for i in idx], model,
                       [Linearized(model.blocks[i].mlp, around_rows, at_rows) for i in idx])


def knock_out_in(
    model: Transformer, worlds: Worlds, heads: Sequence[Head], where: Sequence[str]
) -> Transformer:
    """A model with `heads` (`(layer, head)` pairs) knocked out (attention sent to BOS) in the
    worlds named in `where` only (a per-row mask on every layer)."""
    layers, n = len(model.blocks), model.config.num_heads
    mask = np.ones((worlds.rows, layers, n), np.float32)
    pairs = check_head_pairs(heads, layers, n)
    if isinstance(where, str):
        raise TypeError(f"where must be a sequence of world names; got {where!r}")
    for name in where:
        w = worlds.index(name)
        for layer, head in pairs:
            mask[w * worlds.batch:(w + 1) * worlds.batch, layer, head] = 0
    return add_interventions(model, {i: KnockOut(jnp.asarray(mask[:, i])) for i in range(layers)})


__all__ = ["Worlds", "knock_out_in", "linearize", "rewire"]
