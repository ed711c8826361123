"""Many variants of one forward pass in one program, each computed from the layer where it
departs from the unchanged ("base") run.

A sweep runs one input under many small changes: knock out each head, patch each head. A
variant that changes nothing below layer `l` equals the base run there, so the program runs
the base rows layer by layer and, entering layer `l`, appends a copy of the base stream for
each variant that starts at `l`. Layer `l` thus runs on the base rows plus every variant that
started at or below it, in one batch: the layers below a change run once, and each matmul
covers all active variants. Logits are projected only at the scored positions, a few row
groups at a time, so memory stays bounded.

Row layout inside the program: group 0 is the base run, group `j` is the `j`-th variant in
order of start layer; each group is the input's `batch` rows. Many variants are split into
programs of equal schedule (variants dealt round-robin by start, padded with no-op variants),
so a sweep compiles once however many variants it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.core.runtime import progress
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import Intervention, SiteHooks

# Interventions of one layer for the row groups given (variant index per group, -1 = base).
LayerInterventions = Callable[[int, np.ndarray], tuple[Intervention, ...]]

_compilations: list[int] = [0]
_READOUT_BYTES = 2**29  # logits held at once by the readout (float32)


def compilations() -> int:
    """How many staged programs this process has compiled (for tests and benchmarks)."""
    return _compilations[0]


def _tile(x: Array, times: int) -> Array:
    return jnp.tile(x, (times,) + (1,) * (x.ndim - 1))


def read_score(model, x, positions, padding_mask, at, score, records):
    """`score` of the logits at `at` ([batch, k] indices into seq) of the last block's output
    `x`. A score that can work from the final norm's output (`score.can_stream`) gets it
    instead of the logits, so the vocabulary is streamed (`Transformer.target_logprobs`)."""
    if getattr(score, "can_stream", False) and not model.hooks.wants("logits"):
        return score.stream_score(model, model.final_stream(x, positions, padding_mask, at,
                                                            records))
    return score(model.readout(x, positions, padding_mask, at, records))


def scored_forward(model, tokens, padding_mask, cols, score):
    """`score` at positions `cols` ([k]) of the model (with its interventions) on `tokens`,
    and what its interventions recorded. Token ids must be checked before."""
    positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)
    records: dict[str, Any] = {}
    x = model.embed(tokens, positions, padding_mask, records)
    for layer, block in enumerate(model.blocks):
        x, _ = block(x, positions, padding_mask, None, None, records, layer)
    at = jnp.broadcast_to(cols, (tokens.shape[0], cols.shape[0]))
    return read_score(model, x, positions, padding_mask, at, score, records), records


def _staged_body(model, tokens, padding_mask, joins, hooks, at, score, readout_groups):
    _compilations[0] += 1  # runs once per trace, i.e. once per compilation
    b = tokens.shape[0]
    positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)
    x = model.embed(tokens, positions, padding_mask, {})
    for layer, block in enumerate(model.blocks):
        if joins[layer]:
            x = jnp.concatenate([x, _tile(x[:b], joins[layer])])
        groups = x.shape[0] // b
        block = eqx.tree_at(lambda blk: blk.hooks, block,
                            SiteHooks(block.hooks.interventions + hooks[layer]))
        x, _ = block(x, _tile(positions, groups), _tile(padding_mask, groups), None, None, {},
                     layer)
    if joins[-1]:
        x = jnp.concatenate([x, _tile(x[:b], joins[-1])])
    x = x.reshape(-1, *tokens.shape, x.shape[-1])
    at = jnp.broadcast_to(at, (b, at.shape[0]))

    def read(stream):
        return read_score(model, stream, positions, padding_mask, at, score, {})

    return jax.lax.map(read, x, batch_size=readout_groups)


_staged = eqx.filter_jit(_staged_body)


def _schedules(starts: np.ndarray, n_layers: int, chunk: int) -> tuple[tuple[int, ...], list]:
    """How many variants join at each layer (the same in every program) and each program's
    variant per slot, in join order, padded with -1 (a no-op variant)."""
    order = np.argsort(starts, kind="stable")
    n_programs = -(-len(order) // chunk)
    dealt = [order[i::n_programs] for i in range(n_programs)]
    joins = np.zeros(n_layers + 1, int)
    for variants in dealt:
        joins = np.maximum(joins, np.bincount(starts[variants], minlength=n_layers + 1))
    programs = []
    for variants in dealt:
        slots = []
        for layer in range(n_layers + 1):
            here = variants[starts[variants] == layer].tolist()
            slots += here + [-1] * (int(joins[layer]) - len(here))
        programs.append(np.asarray(slots, int))
    return tuple(int(j) for j in joins), programs


def staged_scores(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    padding_mask: Bool[Array, "batch seq"],
    starts: Sequence[int] | Int[np.ndarray, " variants"],
    interventions: LayerInterventions,
    positions: Int[Array, " k"],
    score: Callable[[Float[Array, "batch k vocab"]], Any],
    *,
    chunk: int = 128,
) -> tuple[Any, Any]:
    """`score` of the logits at `positions` for the base run and for each variant.

    Variant `v` starts at layer `starts[v]` (`num_layers` = it changes only the readout, which
    this function does not do: it then equals the base run). `interventions(layer, groups)`
    gives the interventions added to that layer for row groups `groups` (variant indices, -1
    for the base run and padding); they must leave groups -1 unchanged. `score` maps logits
    `[batch, k, vocab]` to a pytree of `[batch]` arrays; an `eqx.Module` keeps its arrays as
    data. Returns `(base, per_variant)`: the pytree for the base run (`[batch]` leaves) and for
    the variants (`[variants, batch]` leaves). At most `chunk` variants run per program.
    """
    n_layers = len(model.blocks)
    starts = np.asarray(starts, int)
    if starts.ndim != 1 or not len(starts):
        raise ValueError("staged_scores needs at least one variant")
    if starts.min() < 0 or starts.max() > n_layers:
        raise ValueError(f"variant start layers must lie in [0, {n_layers}]; got "
                         f"{starts.min()}..{starts.max()}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1; got {chunk}")
    b = tokens.shape[0]
    k = int(positions.shape[0])
    per_group = b * k * model.config.vocab_size * 4
    joins, programs = _schedules(starts, n_layers, chunk)
    join_layer = np.repeat(np.arange(n_layers + 1), joins)
    results, base = [], None
    shown = progress(programs, f"{len(starts)} variants", unit="program") if len(programs) > 1 \
        else programs
    for slots in shown:
        groups = np.concatenate([[-1], slots])
        hooks = tuple(
            tuple(interventions(layer, groups[:1 + int((join_layer <= layer).sum())]))
            for layer in range(n_layers)
        )
        out = _staged(model, tokens, padding_mask, joins, hooks, positions, score,
                      max(1, _READOUT_BYTES // per_group))
        out = jax.tree_util.tree_map(np.asarray, out)
        if base is None:
            base = jax.tree_util.tree_map(lambda a: a[0], out)
        results.append((slots, jax.tree_util.tree_map(lambda a: a[1:], out)))

    def gather(*leaves):
        full = np.zeros((len(starts), *leaves[0].shape[1:]), leaves[0].dtype)
        for (slots, _), leaf in zip(results, leaves, strict=True):
            keep = slots >= 0
            full[slots[keep]] = leaf[keep]
        return full

    per_variant = jax.tree_util.tree_map(gather, *[r for _, r in results])
    return base, per_variant
