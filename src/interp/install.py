"""Putting interventions on a model and taking them off: each function returns a *new* model
(`eqx.tree_at`; weights shared, the original untouched) whose layers' `SiteHooks` hold the
interventions in order, records last.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import equinox as eqx
import jax
import numpy as np

from gemma_eqx.core.checks import (
    check_finite,
    check_index,
    check_indices,
)
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import (
    Intervention,
    SiteHooks,
    SiteSpec,
    site_spec,
)

from .interventions import KnockOut, Layers, Record


def select_layers(model: Transformer, layers: Layers) -> list[int]:
    """Layer indices from None (all), a sequence of indices (negative ones count from the
    end) or a predicate `(layer_index, attention) -> bool`."""
    n = len(model.blocks)
    if layers is None:
        return list(range(n))
    if callable(layers):
        return [i for i, block in enumerate(model.blocks) if layers(i, block.attn)]
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence | jax.Array | np.ndarray):
        raise TypeError(
            f"layers must be a sequence of layer indices or a predicate (layer, attn) -> bool; "
            f"got {type(layers).__name__}"
        )
    return list(check_indices(layers, n, "layer"))


def _check_intervention(model: Transformer, intervention: Intervention) -> SiteSpec:
    if not isinstance(intervention, Intervention):
        raise TypeError(f"expected an Intervention; got {type(intervention).__name__}")
    spec = site_spec(intervention.site)
    heads = getattr(intervention, "heads", None)
    # A feature site's width is the dictionary's: its latents are checked when the site runs.
    if isinstance(heads, tuple) and spec.head_axis is not None and \
            spec.axes[spec.head_axis] != "latents":
        size = (model.config.num_kv_heads if spec.axes[spec.head_axis] == "kv_heads"
                else model.config.num_heads)
        for h in heads:
            check_index(h, size, "head")
    for name in ("value", "weight", "factor", "mask", "pattern"):
        leaf = getattr(intervention, name, None)
        if leaf is not None and hasattr(leaf, "dtype") or isinstance(leaf, float):
            check_finite(leaf, f"{intervention.describe()}: {name}")
    return spec


def _ordered(existing: tuple[Intervention, ...], new: Intervention) -> tuple[Intervention, ...]:
    """`existing` with `new` added: a `Record` or `KnockOut` replaces one of its kind at the
    same site; records stay last."""
    replaces = isinstance(new, (Record, KnockOut))
    kept = [i for i in existing
            if not (replaces and type(i) is type(new) and i.site == new.site)]
    if isinstance(new, Record):
        return (*kept, new)
    first_record = next((k for k, i in enumerate(kept) if i.records and i.site == new.site),
                        len(kept))
    return (*kept[:first_record], new, *kept[first_record:])


def _hooks_at(model: Transformer, layer: int | None) -> SiteHooks:
    return model.hooks if layer is None else model.blocks[layer].hooks


def set_interventions(
    model: Transformer, hooks: Mapping[int | None, tuple[Intervention, ...]]
) -> Transformer:
    """A model whose layer `i` (None: the model's own sites) holds exactly `hooks[i]`."""
    keys = list(hooks)
    for k in keys:
        if k is not None:
            check_index(k, len(model.blocks), "layer")
    if not keys:
        return model
    return eqx.tree_at(
        lambda m: [_hooks_at(m, k) for k in keys], model,
        [SiteHooks(tuple(hooks[k])) for k in keys],
    )


def add_interventions(
    model: Transformer, interventions: Mapping[int | None, Intervention | Iterable[Intervention]]
) -> Transformer:
    """A model with `interventions[i]` added on layer `i` (None: the model's own sites)."""
    new = {}
    for layer, items in interventions.items():
        items = [items] if isinstance(items, Intervention) else list(items)
        current = _hooks_at(model, layer).interventions
        for item in items:
            spec = _check_intervention(model, item)
            if spec.per_layer != (layer is not None):
                raise ValueError(
                    f"site {spec.name} is "
                    + ("on every layer: give a layer" if spec.per_layer
                       else "a site of the whole model: install it with layer None")
                )
            current = _ordered(current, item)
        new[layer] = current
    return set_interventions(model, new)


def intervene(
    model: Transformer, intervention: Intervention, *, layers: Layers = None
) -> Transformer:
    """A model with `intervention` installed on each of `layers` (all by default; ignored for
    the model's own sites `embed`, `final_norm_in`, `final_norm_out`, `logits`)."""
    spec = _check_intervention(model, intervention)
    if not spec.per_layer:
        return add_interventions(model, {None: intervention})
    return add_interventions(model, {i: intervention for i in select_layers(model, layers)})


def clear_interventions(model: Transformer, sites: Sequence[str] | None = None) -> Transformer:
    """The model without interventions (only those at `sites`, when given)."""
    names = None if sites is None else {site_spec(s).name for s in sites}
    keep = lambda hooks: tuple(  # noqa: E731
        i for i in hooks.interventions if names is not None and i.site not in names
    )
    return set_interventions(
        model, {None: keep(model.hooks), **{i: keep(b.hooks) for i, b in enumerate(model.blocks)}}
    )


def installed(model: Transformer) -> list[tuple[int | None, Intervention]]:
    """Every installed intervention with its layer (None for the model's own sites)."""
    out = [(None, i) for i in model.hooks.interventions]
    for layer, block in enumerate(model.blocks):
        out.extend((layer, i) for i in block.hooks.interventions)
    return out



__all__ = ["add_interventions", "clear_interventions", "installed", "intervene", "select_layers",
           "set_interventions"]
