"""Edits that install interventions for the common questions: `patch` a site from another
input's capture, `ablate` it (zero, mean, resample), `scale` it, or `apply_fn` any function
to it, on chosen layers, heads and positions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import (
    site_key,
    site_spec,
)

from .capture import ActivationCache
from .install import add_interventions, select_layers
from .interventions import Add, Apply, Layers, Replace, Scale, Units, as_leaf, static_indices


def _source_array(cache: ActivationCache, model: Transformer, site: str, layer: int | None):
    cache.check_model(model)
    key = site_key(site, layer)
    if key not in cache.arrays:
        raise KeyError(f"{key} is not in the activation cache; capture it first")
    return cache.arrays[key]


def patch(
    model: Transformer,
    source: ActivationCache,
    site: str,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    weight: Units | None = None,
) -> Transformer:
    """A model that, at `site` of `layers`, takes the recorded values of `source` (another
    input's `capture`) on the selected heads / positions / per-unit `weight`. The input the
    patched model then runs must have the shape the source was recorded with.

    `heads` and `positions` are static (a new choice compiles a new program); to loop over
    heads or positions, vary the per-unit `weight` array instead, or use
    `patching.activation_patching`, which does so in batches."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    items = {}
    for layer in idx:
        value = _source_array(source, model, spec.name, layer)
        items[layer] = Replace(spec.name, value=value, weight=weight,
                               heads=static_indices(heads, "head"),
                               positions=static_indices(positions, "position"))
    return add_interventions(model, items)


def ablate(
    model: Transformer,
    site: str,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    how: str = "zero",
    reference: ActivationCache | None = None,
    key: PRNGKeyArray | None = None,
) -> Transformer:
    """A model with `site` ablated on the selected units: `how="zero"`, `"mean"` (the mean of
    `reference` over its batch, per position) or `"resample"` (row `i` takes row `perm[i]` of
    `reference`, a random permutation from `key`; the reference batch must equal the batch the
    model will run)."""
    spec = site_spec(site)
    h, p = static_indices(heads, "head"), static_indices(positions, "position")
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    if how == "zero":
        return add_interventions(model, {i: Scale(spec.name, factor=jnp.zeros(()), heads=h,
                                                  positions=p) for i in idx})
    if how not in ("mean", "resample"):
        raise ValueError(f"how must be 'zero', 'mean' or 'resample'; got {how!r}")
    if reference is None:
        raise ValueError(f"{how}-ablation needs a reference ActivationCache (from capture)")
    items = {}
    if how == "resample":
        if key is None:
            raise ValueError("resample-ablation needs a PRNG key")
        perm = jax.random.permutation(key, reference.input_shape[0])
    for i in idx:
        value = _source_array(reference, model, spec.name, i)
        if how == "mean":
            items[i] = Replace(spec.name, value=value.mean(axis=0, keepdims=True),
                               broadcast_batch=True, heads=h, positions=p)
        else:
            items[i] = Replace(spec.name, value=value[perm], heads=h, positions=p)
    return add_interventions(model, items)


def scale(
    model: Transformer,
    site: str,
    factor: float | Float[Array, ""] | Units,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Transformer:
    """A model with `site` multiplied by `factor` on the selected units (differentiable)."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    item = Scale(spec.name, factor=as_leaf(factor), heads=static_indices(heads, "head"),
                 positions=static_indices(positions, "position"))
    return add_interventions(model, {i: item for i in idx})


def steer(
    model: Transformer,
    site: str,
    direction: Float[Array, ...],
    *,
    coefficient: float | Float[Array, ""] = 1.0,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Transformer:
    """A model with `coefficient * direction` added at `site` on the selected units:
    `direction` has the site's trailing shape (a residual direction `[embed]`; on a feature
    site `features@...`, one value per latent, so a one-hot adds that latent's decoder row to
    the reconstruction)."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    item = Add(spec.name, value=as_leaf(coefficient) * jnp.asarray(direction),
               heads=static_indices(heads, "head"),
               positions=static_indices(positions, "position"))
    return add_interventions(model, {i: item for i in idx})


def apply_fn(
    model: Transformer,
    site: str,
    fn: Callable[..., Array],
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    with_context: bool = False,
) -> Transformer:
    """A model with `fn(x)` (or `fn(x, context)`) applied at `site` on the selected units."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    item = Apply(spec.name, fn=fn, with_context=with_context,
                 heads=static_indices(heads, "head"),
                 positions=static_indices(positions, "position"))
    return add_interventions(model, {i: item for i in idx})



__all__ = ["ablate", "apply_fn", "patch", "scale", "steer"]
