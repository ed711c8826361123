"""What features do to the model's output: each latent's direct effect on the logits through
its decoder (per prompt and position, and as weights over the vocabulary), and ablation sweeps
of chosen latents scored like the study's knock-outs.

Direct effects follow `interp.patching.direct_logit_attribution`: the final norm's statistics
(and a post-norm between the site and the stream, Gemma 2 and 3) are frozen at their values on
the prompt, which makes the map from a site's contribution to the logits linear; a latent's
direct effect is then its activation times its decoder row read through that map. The path
through later layers is left out (that is what "direct" means).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from gemma_eqx.core.checks import check_index, check_indices
from gemma_eqx.core.multihost import to_host
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import Intervention, SiteContext, feature_site, site_key, site_spec

from ..analyses import KnockoutResult, _as_inputs, _check_eval_mask, _scored
from ..install import add_interventions
from ..interventions import Record
from ..staged import staged_scores
from .dictionary import SparseDictionary
from .splice import SplicedSAE, SplicedTranscoder, check_fits, spliced

# Sites whose value reaches the residual stream unchanged (a post-norm, where a block has one,
# comes before them), and those that reach it through a frozen post-norm.
_ON_STREAM = ("resid_pre", "resid_mid", "resid_post", "attn_out_normed", "mlp_out_normed")
_BEFORE_POST_NORM = {"attn_out": "post_attention_norm", "mixed_values_flat":
                     "post_attention_norm", "mlp_out": "post_ffw_norm"}


def _spliced_dictionary(model: Transformer, site: str, layer: int) -> SparseDictionary:
    """The SAE or transcoder spliced into `model` whose features are `site` of `layer`."""
    for at, i in spliced(model):
        if at != layer:
            continue
        if isinstance(i, SplicedSAE) and feature_site(i.site) == site:
            return i.dictionary
        if isinstance(i, SplicedTranscoder) and feature_site(i.dictionary.reads.site) == site:
            return i.dictionary
    raise ValueError(f"no SAE or transcoder with features {site} is spliced into layer {layer} "
                     f"(cross-layer transcoders write many layers: not supported here)")


def _writes_directly(d: SparseDictionary) -> None:
    where = d.writes.site
    if where not in _ON_STREAM and where not in _BEFORE_POST_NORM:
        raise ValueError(f"{d.name} writes {where}, which reaches the logits only through the "
                         f"MLP: it has no direct effect on them")


@dataclasses.dataclass(frozen=True)
class FeatureLogitAttribution:
    """Direct effect of each latent on the pre-soft-cap logit of the target token:
    `effects[b, k, latent] = activations[b, k, latent] * (decoder row through the frozen
    norms . unembedding of the target)`, and `site_total[b, k]`, the direct effect of the
    whole site the dictionary writes; `site_total - effects.sum(-1)` is what its other terms
    carry (decoder bias, skip term, error term)."""

    activations: np.ndarray  # [batch, k, latents]
    effects: np.ndarray  # [batch, k, latents]
    site_total: np.ndarray  # [batch, k]


@eqx.filter_jit
def _feature_dla(model, d, tokens, padding_mask, positions, targets, site, layer):
    writes = d.writes
    sites = {(site, layer), (writes.site, writes.layer)}
    post_norm = _BEFORE_POST_NORM.get(writes.site)
    block = model.blocks[writes.layer]
    norm = getattr(block, post_norm) if post_norm else None
    if norm is not None and writes.site == "mixed_values_flat":
        sites.add(("attn_out", writes.layer))
    by_layer: dict[int, list[Record]] = {}
    for s, la in sorted(sites):
        by_layer.setdefault(la, []).append(Record(s))
    recorded = add_interventions(model, by_layer)
    recorded = add_interventions(recorded, {None: Record("final_norm_in")})
    records = recorded.forward(tokens, padding_mask=padding_mask, check_ids=False).records
    at = lambda a: jnp.take(a, positions, axis=1).astype(jnp.float32)  # noqa: E731
    total = at(records["final_norm_in"])
    unembed = jnp.take(model.embedder.output_table, targets, axis=0).astype(jnp.float32)

    def direct(x):  # [b, k, embed] -> [b, k]
        return jnp.sum(model.final_norm.linear(x, total) * unembed, axis=-1)

    # The map is linear: its gradient is the stream direction each position's logit reads.
    reads_stream = jax.grad(lambda x: direct(x).sum())(jnp.zeros_like(total))  # [b, k, embed]
    factor = None
    if norm is not None:
        before = "attn_out" if writes.site == "mixed_values_flat" else writes.site
        factor = norm.factor(at(records[site_key(before, writes.layer)]))
    acts = at(records[site_key(site, layer)])  # [b, k, latents]
    written = at(records[site_key(writes.site, writes.layer)])
    if writes.site == "mixed_values_flat":
        w_o = block.attn.w_o.astype(jnp.float32)
        written = written @ w_o.reshape(-1, w_o.shape[-1])
    if factor is not None:
        written = written * factor
        reads_site = reads_stream * factor
    else:
        reads_site = reads_stream
    w_dec = d.w_dec.astype(jnp.float32)
    if writes.site == "mixed_values_flat":
        w_o = block.attn.w_o.astype(jnp.float32)
        reads_site = reads_site @ w_o.reshape(-1, w_o.shape[-1]).T  # [b, k, heads*head_dim]
    per_latent = jnp.einsum("bkd,ld->bkl", reads_site, w_dec)
    return acts, acts * per_latent, jnp.sum(written * reads_stream, axis=-1)


def feature_logit_attribution(
    model: Transformer,
    tokens: Any,
    targets: Any,
    positions: Sequence[int],
    *,
    site: str,
    layer: int,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> FeatureLogitAttribution:
    """Direct logit attribution of the features `site` (`features@<site read>`) of `layer` of
    the spliced `model`: for each row, position in `positions` and latent, its direct effect on
    the logit of `targets[b, k]` (see `FeatureLogitAttribution`). The dictionary must write a
    site on the stream's side of the MLP (not `mlp_in` or `mlp_hidden`)."""
    from ..patching import _readout_inputs

    d = _spliced_dictionary(model, site, layer)
    _writes_directly(d)
    tokens, padding_mask, pos, targets = _readout_inputs(model, tokens, targets, positions,
                                                         padding_mask)
    acts, effects, total = _feature_dla(model, d, tokens, padding_mask, pos, targets, site,
                                        layer)
    return FeatureLogitAttribution(to_host(acts), to_host(effects), to_host(total))


def logit_weights(model: Transformer, dictionary: SparseDictionary,
                  latents: Sequence[int]) -> Float[np.ndarray, "latents vocab"]:
    """Each latent's decoder row read straight through the final norm's gain (its statistics
    at unit scale, as TransformerLens folds it into the unembedding) and the unembedding:
    the tokens a latent raises and lowers wherever it fires, `[latents, vocab]`. Refused for a
    dictionary that writes through the MLP; before a post-norm its gain is folded in too."""
    check_fits(model, dictionary)
    _writes_directly(dictionary)
    latents = list(check_indices(latents, dictionary.width, "latent"))
    d = dictionary
    rows = d.w_dec[jnp.asarray(latents)].astype(jnp.float32)
    if d.writes.site == "mixed_values_flat":
        w_o = model.blocks[d.writes.layer].attn.w_o.astype(jnp.float32)
        rows = rows @ w_o.reshape(-1, w_o.shape[-1])
    # A stream of mean 0 and unit RMS and variance: an RMSNorm and a LayerNorm reduce to their
    # gains on it.
    unit = jnp.where(jnp.arange(rows.shape[-1]) % 2 == 0, 1.0, -1.0)
    post = _BEFORE_POST_NORM.get(d.writes.site)
    norm = getattr(model.blocks[d.writes.layer], post) if post else None
    if norm is not None:
        rows = norm.linear(rows, unit)
    rows = model.final_norm.linear(rows, unit)
    table = model.embedder.output_table.astype(jnp.float32)
    return to_host(rows @ table.T)


class _KeepLatents(Intervention):
    """Multiplies a feature site by `keep[group]` (`[groups, latents]`), the batch being
    `groups` row groups of equal size: one ablation per group in one program."""

    keep: Float[Array, "groups latents"]

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        groups = self.keep.shape[0]
        if x.shape[0] % groups or x.shape[-1] != self.keep.shape[-1]:
            raise ValueError(f"site {self.site}: {groups} groups of {self.keep.shape[-1]} "
                             f"latents do not fit an array of shape {tuple(x.shape)}")
        y = x.reshape(groups, -1, *x.shape[1:]) * self.keep[:, None, None, :].astype(x.dtype)
        return y.reshape(x.shape), None


def latent_ablation_sweep(
    model: Transformer,
    tokens: Any,
    eval_mask: Bool[Array | np.ndarray, "batch seq"],
    site: str,
    layer: int,
    latent_sets: Sequence[Sequence[int]],
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    chunk: int = 64,
) -> KnockoutResult:
    """`analyses.knockout_eval`'s scores (mean correct-token log-prob and accuracy over each
    row's `eval_mask` positions) with each set of latents of the feature `site` of `layer`
    zero-ablated at every position: fields `[sets, batch]`. An empty set scores the spliced
    model unchanged. The sets run together from `layer` on (`interp.staged`)."""
    spec = site_spec(site)
    if spec.head_axis is None or spec.axes[spec.head_axis] != "latents":
        raise ValueError(f"site {site!r} is not a feature site (features@<site>)")
    layer = check_index(layer, len(model.blocks), "layer")
    d = _spliced_dictionary(model, site, layer)
    sets = [list(check_indices(s, d.width, "latent")) for s in latent_sets]
    if not sets:
        raise ValueError("latent_ablation_sweep needs at least one set of latents")
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    eval_mask = _check_eval_mask(eval_mask, tokens, padding_mask)
    keep = np.ones((len(sets), d.width), np.float32)
    for i, chosen in enumerate(sets):
        keep[i, chosen] = 0

    def ablate(at: int, groups: np.ndarray) -> tuple[Intervention, ...]:
        if at != layer:
            return ()
        rows = np.where((groups >= 0)[:, None], keep[np.maximum(groups, 0)], 1.0)
        return (_KeepLatents(site, jnp.asarray(rows)),)

    cols, score = _scored(tokens, eval_mask)
    _, (lp, hits) = staged_scores(model, tokens, padding_mask, [layer] * len(sets), ablate,
                                  cols, score, chunk=chunk)
    count = to_host(score.weights.sum(-1))
    return KnockoutResult(jnp.asarray((lp / count).astype(np.float32)),
                          jnp.asarray((hits / count).astype(np.float32)),
                          jnp.asarray(np.broadcast_to(count, lp.shape)))


__all__ = ["FeatureLogitAttribution", "feature_logit_attribution", "latent_ablation_sweep",
           "logit_weights"]
