"""Dictionaries spliced into a model, and their features as sites.

`splice(model, dictionaries)` returns a new model (`eqx.tree_at`; weights shared, the original
untouched) in which each dictionary replaces the activation it writes by its reconstruction:

    SAE at site s:                 s <- decode(f) [+ error],        f = encode(s)
    transcoder a -> b:             b <- decode(f, a) [+ error],     f = encode(a)
    cross-layer transcoder:        b[l'] <- sum_{l<=l'} decode_l'(f[l]) [+ error[l']]

With the error term (`error=True`, the default) the error is what the dictionary misses on
the clean features, `b - decode(encode(a))`, so the model computes exactly what it did until
an intervention edits a feature. The features are the site `features@<site read>` of the
reader's layer (`gemma_eqx.model.sites.feature_site`): `interp.capture`, `patch`, `ablate`,
`scale`, `steer` and `apply_fn` act on it as on any site, their arrays are leaves (new values
do not recompile) and `jax.grad` reaches them.

A transcoder's input is read at its site and handed to the writer in the same forward pass
(through the pass's records, under a key that is removed once read); reader and writer of a
(non-cross-layer) transcoder are on one layer, the reader's site first in the block.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import (
    LAYER_SITES,
    Intervention,
    SiteContext,
    SiteHooks,
    feature_site,
)

from ..install import add_interventions, installed
from .dictionary import CrossLayerTranscoder, SparseDictionary

# Records keys of arrays handed from a reader to a writer within one forward pass.
_HANDOFF = "_handoff:"


def _with_error(x: Array, change: Array | None) -> Array:
    """`x` plus what editing the features changed in the reconstruction: the reconstruction
    of the edited features plus the error term (what the dictionary misses on the clean
    features), `decode(edited) + (x - decode(clean))`, as `x + (decode(edited) -
    decode(clean))` in one matmul. Bit for bit `x` while no feature is edited; with nothing
    bound to the feature site nothing is computed at all (`change` None)."""
    if change is None:
        return x
    return (x.astype(change.dtype) + change).astype(x.dtype)


class SplicedSAE(Intervention):
    """An SAE on `site` (the one it reads and writes)."""

    dictionary: SparseDictionary
    error: bool = eqx.field(static=True, default=True)

    nests = True

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, None]:
        d = self.dictionary
        features = d.encode(x)
        edited = hooks.apply(feature_site(self.site), features, context, records)
        if not self.error:
            return d.decode(edited, x).astype(x.dtype), None
        # An untouched feature array (no intervention, or one that only records) is the
        # same object: the spliced site is then exactly x, at no cost.
        return _with_error(x, None if edited is features else
                           d.decode_change(edited, features, x)), None

    def describe(self) -> str:
        return f"{self.dictionary.name} ({self.dictionary.width} latents) at {self.site}"


class HandOff(Intervention):
    """Passes its site's array on, unchanged, to the writer of a transcoder (`key`)."""

    key: str = eqx.field(static=True, default="")

    nests = True

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, None]:
        records[self.key] = x
        return x, None

    def describe(self) -> str:
        return f"hands {self.site} to a transcoder"


def _taken(records: dict[str, Any], key: str, who: str) -> Array:
    if key not in records:
        raise ValueError(f"{who}: its input was not read in this forward pass (the site it "
                         f"reads comes after the one it writes, or its reader was removed)")
    return records.pop(key)


class SplicedTranscoder(Intervention):
    """A transcoder writing `site`, reading the array its `HandOff` passed under `key`."""

    dictionary: SparseDictionary
    key: str = eqx.field(static=True, default="")
    error: bool = eqx.field(static=True, default=True)

    nests = True

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, None]:
        d = self.dictionary
        source = _taken(records, self.key, d.name)
        features = d.encode(source)
        edited = hooks.apply(feature_site(d.reads.site), features, context, records)
        if not self.error:
            return d.decode(edited, source).astype(x.dtype), None
        return _with_error(x, None if edited is features else
                           d.decode_change(edited, features, source)), None

    def describe(self) -> str:
        d = self.dictionary
        return f"{d.name} ({d.width} latents) from {d.reads.site} into {self.site}"


class CrossLayerEncoder(Intervention):
    """Layer `layer`'s encoder of a cross-layer transcoder: its features, edited by the
    feature site's interventions, go to every later layer's decoder (`key`)."""

    w_enc: Array
    b_enc: Array
    threshold: Array | None
    activation: str = eqx.field(static=True, default="jumprelu")
    k: int | None = eqx.field(static=True, default=None)
    key: str = eqx.field(static=True, default="")

    nests = True

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, None]:
        from .dictionary import activate

        xf = x.astype(jnp.promote_types(x.dtype, self.w_enc.dtype))
        pre = xf @ self.w_enc.astype(xf.dtype) + self.b_enc.astype(xf.dtype)
        features = activate(pre, self.activation, self.threshold, self.k)
        edited = hooks.apply(feature_site(self.site), features, context, records)
        records[f"{self.key}{context.layer}"] = (features, edited)
        return x, None


class CrossLayerDecoder(Intervention):
    """The output of a cross-layer transcoder into layer `layer`'s `site`: the features of
    layers `0..layer`, each through its decoder slice (`w_dec[l]` is `[latents, d_out]`)."""

    w_dec: tuple[Array, ...]
    b_dec: Array
    key: str = eqx.field(static=True, default="")
    last: bool = eqx.field(static=True, default=False)
    error: bool = eqx.field(static=True, default=True)

    nests = True

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, None]:
        layer = context.layer
        pairs = [records.get(f"{self.key}{source}") for source in range(layer + 1)]
        if any(p is None for p in pairs):
            raise ValueError(f"cross-layer transcoder: the features of layer "
                             f"{pairs.index(None)} were not computed before layer {layer}")
        if self.last:  # nothing later reads them
            for source in range(layer + 1):
                records.pop(f"{self.key}{source}")
        if not self.error:
            out = self.b_dec.astype(pairs[0][0].dtype)
            for w, (_, changed) in zip(self.w_dec, pairs, strict=True):
                out = out + changed @ w.astype(changed.dtype)
            return out.astype(x.dtype), None
        change = None  # the decoders are linear: only edited layers' features change anything
        for w, (features, changed) in zip(self.w_dec, pairs, strict=True):
            if changed is not features:
                part = (changed - features) @ w.astype(features.dtype)
                change = part if change is None else change + part
        return _with_error(x, change), None


def _site_width(model: Transformer, site: str) -> int:
    c = model.config
    return {"mixed_values_flat": c.num_heads * c.head_dim, "mlp_hidden": c.hidden_dim}.get(
        site, c.embed_dim)


def check_fits(model: Transformer, dictionary: SparseDictionary | CrossLayerTranscoder) -> None:
    """A `ValueError` naming what does not fit: a layer the model lacks, an input or output
    width other than the site's, a dictionary made for another model."""
    name, layers = dictionary.name, len(model.blocks)
    if isinstance(dictionary, CrossLayerTranscoder):
        points = [(dictionary.reads, None, dictionary.d_in), (dictionary.writes, None,
                                                              dictionary.d_out)]
        if dictionary.layers != layers:
            raise ValueError(f"{name}: a cross-layer transcoder of {dictionary.layers} layers "
                             f"does not fit {model.config.name} ({layers} layers)")
    else:
        points = [(dictionary.reads.site, dictionary.reads.layer, dictionary.d_in),
                  (dictionary.writes.site, dictionary.writes.layer, dictionary.d_out)]
    for site, layer, width in points:
        if layer is not None and layer >= layers:
            raise ValueError(f"{name}: reads or writes layer {layer}; {model.config.name} has "
                             f"{layers} layers")
        want = _site_width(model, site)
        if width != want:
            raise ValueError(f"{name}: width {width} at site {site}, which is {want} wide in "
                             f"{model.config.name}: the dictionary was made for another model")
    made_for = getattr(dictionary, "model_name", None)
    if made_for and not same_model_size(made_for, model.config.name):
        raise ValueError(f"{name}: made for {made_for}, not {model.config.name}")


def same_model_size(theirs: str, ours: str) -> bool:
    """False only when both names state a parameter count and they differ ("gemma-3-1b"
    against "gemma3-270m"): names are spelled too many ways to compare more."""
    import re

    size = lambda s: re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([mb])(?![a-z])", s.lower())  # noqa: E731
    a, b = size(theirs), size(ours)
    return not (a and b) or a[-1] == b[-1]


def splice(
    model: Transformer,
    dictionaries: SparseDictionary | CrossLayerTranscoder | Iterable[Any],
    *,
    error: bool = True,
) -> Transformer:
    """A model with each dictionary spliced in (see the module's docstring); `error=False`
    runs on the reconstructions alone."""
    if isinstance(dictionaries, SparseDictionary | CrossLayerTranscoder):
        dictionaries = [dictionaries]
    dictionaries = list(dictionaries)
    items: dict[int, list[Intervention]] = {}
    taken = {(layer, getattr(i, "site", None)) for layer, i in installed(model)
             if isinstance(i, SplicedSAE | SplicedTranscoder | CrossLayerDecoder)}
    n_before = sum(1 for _, i in installed(model) if isinstance(i, HandOff | CrossLayerEncoder))
    for index, d in enumerate(dictionaries):
        if not isinstance(d, SparseDictionary | CrossLayerTranscoder):
            raise TypeError(f"splice takes SparseDictionary or CrossLayerTranscoder modules; "
                            f"got {type(d).__name__}")
        check_fits(model, d)
        key = f"{_HANDOFF}{n_before + index}:"
        if isinstance(d, CrossLayerTranscoder):
            writes = [(layer, d.writes) for layer in range(d.layers)]
            _order(d.reads, d.writes, d.name)
            for layer in range(d.layers):
                threshold = None if d.threshold is None else d.threshold[layer]
                items.setdefault(layer, []).insert(0, CrossLayerEncoder(
                    d.reads, d.w_enc[layer], d.b_enc[layer], threshold, d.activation, d.k,
                    key))
                items[layer].append(CrossLayerDecoder(
                    d.writes, tuple(d.w_dec[source][:, layer - source]
                                    for source in range(layer + 1)),
                    d.b_dec[layer], key, layer == d.layers - 1, error))
        elif d.reads == d.writes:
            writes = [(d.writes.layer, d.writes.site)]
            items.setdefault(d.writes.layer, []).append(SplicedSAE(d.writes.site, d, error))
        else:
            if d.reads.layer != d.writes.layer:
                raise ValueError(f"{d.name}: a transcoder reads and writes one layer (a "
                                 f"cross-layer transcoder is a CrossLayerTranscoder); got "
                                 f"{d.reads} and {d.writes}")
            _order(d.reads.site, d.writes.site, d.name)
            writes = [(d.writes.layer, d.writes.site)]
            items.setdefault(d.reads.layer, []).insert(0, HandOff(d.reads.site, key + "0"))
            items[d.reads.layer].append(SplicedTranscoder(d.writes.site, d, key + "0", error))
        for point in writes:
            if point in taken:
                raise ValueError(f"{d.name}: another dictionary already writes "
                                 f"{point[1]} of layer {point[0]}; splice one per site")
            taken.add(point)
    return add_interventions(model, items)


def _order(reads: str, writes: str, name: str) -> None:
    if LAYER_SITES.index(reads) >= LAYER_SITES.index(writes):
        raise ValueError(f"{name}: reads {reads}, which the block computes after {writes}, "
                         f"the site it writes")


def spliced(model: Transformer) -> list[tuple[int, Intervention]]:
    """The dictionary interventions installed on `model`, with their layers."""
    kinds = (SplicedSAE, SplicedTranscoder, HandOff, CrossLayerEncoder, CrossLayerDecoder)
    return [(layer, i) for layer, i in installed(model) if isinstance(i, kinds)]


def feature_sites(model: Transformer) -> list[tuple[str, int]]:
    """`(feature site, layer)` of every dictionary spliced into `model`."""
    out = []
    for layer, i in spliced(model):
        if isinstance(i, SplicedSAE):
            out.append((feature_site(i.site), layer))
        elif isinstance(i, SplicedTranscoder):
            out.append((feature_site(i.dictionary.reads.site), layer))
        elif isinstance(i, CrossLayerEncoder):
            out.append((feature_site(i.site), layer))
    return out


def feature_gradients(
    model: Transformer,
    tokens: Any,
    metric: Any,
    sites: Sequence[tuple[str, int]] | None = None,
    padding_mask: Any = None,
) -> tuple[Array, dict[str, Array], dict[str, Array]]:
    """`(metric, {key: features}, {key: d metric / d features})` at every feature site of
    the spliced `model` (or at `sites`, `(feature site, layer)` pairs), keyed like records
    (`blocks.3.features@resid_post`). `tokens` `[batch, seq]` (numpy or jax); `metric` is an
    `interp.patching.Metric` (one number per batch row, summed here); the features are
    `[batch, seq, latents]`."""
    from ..capture import run_with_records
    from ..interventions import Add, Record

    sites = feature_sites(model) if sites is None else list(sites)
    if not sites:
        raise ValueError("no dictionary is spliced into the model: splice one first")
    tokens = jnp.asarray(tokens)
    at = jnp.broadcast_to(jnp.asarray(metric.positions, jnp.int32),
                          (tokens.shape[0], len(metric.positions)))
    recorded = add_interventions(model, {layer: Record(site) for site, layer in sites})
    _, records = run_with_records(recorded, tokens, padding_mask=padding_mask)
    keys = [f"blocks.{layer}.{site}" for site, layer in sites]
    handles = {key: jnp.zeros_like(records.arrays[key]) for key in keys}

    def value(handles):
        edited = add_interventions(model, {
            layer: Add(site, value=handles[key]) for (site, layer), key in
            zip(sites, keys, strict=True)})
        logits, _ = run_with_records(edited, tokens, padding_mask=padding_mask, logits_at=at)
        return metric(logits).sum()

    total, grads = jax.value_and_grad(value)(handles)
    return total, {k: records.arrays[k] for k in keys}, grads


__all__ = ["CrossLayerDecoder", "CrossLayerEncoder", "HandOff", "SplicedSAE",
           "SplicedTranscoder", "check_fits", "feature_gradients", "feature_sites",
           "same_model_size", "splice", "spliced"]
