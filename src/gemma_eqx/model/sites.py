"""Named activation sites of a `Transformer` and the interventions that act on them.

A *site* is a named place in the forward pass where an intermediate array can be read,
replaced or transformed. Every `Block` (and the `Transformer` itself, for the sites outside the
blocks) holds a `SiteHooks`: a tuple of `Intervention` modules, each bound to one site by its
static `site` name. The model calls the hooks of a site only when some intervention is bound to
it, so a model without interventions computes exactly (and as fast as) the plain forward, and
the costly per-head decompositions (`head_out`, `k_per_head`, `v_per_head`) are materialised
only when an intervention asks for them.

Interventions are ordinary Equinox modules: their arrays are leaves of the model, so new
values do not recompile a jitted forward and gradients reach them. `interp.interventions`
builds them; this module only defines the vocabulary and the calling convention.

Sites on every layer, in the order the forward pass reaches them (TransformerLens names in
brackets):

    resid_pre     batch seq embed             stream entering the block [resid_pre]
    q             batch seq heads head_dim    queries after QK-norm and RoPE, before the
                                              query scale [rot_q]
    k             batch seq kv_heads head_dim keys after QK-norm and RoPE [rot_k]
    v             batch seq kv_heads head_dim values [v]
    k_per_head    batch key heads head_dim    the keys each *query* head reads (its group's
                                              key head, one copy per query head)
    v_per_head    batch key heads head_dim    the values each query head reads
    attn_logits   batch heads query key       scores after soft-cap and mask (masked keys
                                              hold a large negative number, and stay masked
                                              whatever an intervention does) [attn_scores]
    pattern       batch heads query key       weights after the softmax [pattern]
    mixed_values  batch seq heads head_dim    each head's pattern-weighted values [z]
    mixed_values_flat batch seq heads_x_head_dim  the same, heads side by side: the input of
                                              the output projection (Gemma Scope's
                                              `attn_out` hook point)
    head_out      batch seq heads embed       each head's output `mixed_values[h] @ w_o[h]`;
                                              sums over heads to attn_out (less the output
                                              bias of GPT-2 and NeoX, no head's) [result]
    attn_out      batch seq embed             attention output, before the post-attention
                                              norm of Gemma 2 and 3 [attn_out, where a
                                              model has no post-norm]
    attn_out_normed batch seq embed           attention output after the post-attention norm
                                              (Gemma 2, 3; attn_out elsewhere) [attn_out]
    resid_mid     batch seq embed             stream after attention (the MLP's input in
                                              a sequential block; a parallel one, NeoX's,
                                              feeds the MLP resid_pre) [resid_mid]
    mlp_in        batch seq embed             the MLP's input after its pre-norm (Gemma
                                              Scope's transcoder input) [ln2.hook_normalized]
    mlp_hidden    batch seq mlp               act(gate) * up, or act(x W_in + b_in) in a
                                              plain MLP (GPT-2, NeoX) [mlp.hook_post]
    mlp_out       batch seq embed             MLP output, before the post-MLP norm [mlp_out,
                                              where a model has no post-norm]
    mlp_out_normed batch seq embed            MLP output after the post-MLP norm (Gemma 2,
                                              3; mlp_out elsewhere): Gemma Scope's `mlp_out`
                                              and transcoder output [mlp_out]
    resid_post    batch seq embed             stream leaving the block [resid_post]

Sites of the whole model: `embed` (`batch seq embed`: the token embeddings, scaled in Gemma,
plus the learned positions in GPT-2: the stream entering block 0), `final_norm_in` and
`final_norm_out` (`batch seq embed`) and `logits` (`batch seq vocab`, after the final
soft-cap). With `logits_at`, these three have the selected
positions in place of `seq`. In generation with a cache, `k`, `v` are the new tokens' keys and
values and `k_per_head`, `v_per_head`, `attn_logits`, `pattern` span the whole cache (`key`).

A sparse dictionary spliced into a layer (`interp.features`) adds the site of its feature
activations, `features@<site it reads>` (`batch seq latents`), on that layer: every
intervention acts on it as on the model's own sites, its latents taking the place of heads
(`heads=` selects latents; per-unit weights are `[batch, seq, latents]`).

Every site has *units*: `[batch, seq]` for stream sites and `[batch, seq, heads]` for head sites
(`seq` is the query axis of `attn_logits` and `pattern`, the key axis of `k_per_head` and
`v_per_head`; `heads` is `kv_heads` on `k` and `v`). Mixing weights and scale factors of the
interventions are given per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .base import Module


@dataclass(frozen=True)
class SiteSpec:
    """Where a site lives and how its axes read: `axes` names each axis of the array,
    `seq_axis` and `head_axis` locate the unit axes (`head_axis` is None for stream sites)."""

    name: str
    axes: tuple[str, ...]
    seq_axis: int
    head_axis: int | None
    per_layer: bool
    doc: str

    @property
    def shape(self) -> str:
        return " ".join(self.axes)


def _spec(name: str, axes: str, per_layer: bool, doc: str) -> SiteSpec:
    names = tuple(axes.split())
    seq = next(i for i, a in enumerate(names) if a in ("seq", "query", "key"))
    # A feature site's latents are its units as a head site's heads are.
    head = next((i for i, a in enumerate(names) if a in ("heads", "kv_heads", "latents")), None)
    return SiteSpec(name, names, seq, head, per_layer, doc)


SITES: dict[str, SiteSpec] = {
    s.name: s
    for s in (
        _spec("embed", "batch seq embed", False,
              "token embeddings (scaled, Gemma; plus learned positions, GPT-2)"),
        _spec("resid_pre", "batch seq embed", True, "residual stream entering the block"),
        _spec("q", "batch seq heads head_dim", True, "queries after norm and rope"),
        _spec("k", "batch seq kv_heads head_dim", True, "keys after norm and rope"),
        _spec("v", "batch seq kv_heads head_dim", True, "values"),
        _spec("k_per_head", "batch key heads head_dim", True, "keys as read by each query head"),
        _spec("v_per_head", "batch key heads head_dim", True,
              "values as read by each query head"),
        _spec("attn_logits", "batch heads query key", True,
              "attention scores after soft-cap and mask"),
        _spec("pattern", "batch heads query key", True, "attention weights after the softmax"),
        _spec("mixed_values", "batch seq heads head_dim", True, "pattern-weighted values"),
        _spec("mixed_values_flat", "batch seq heads_x_head_dim", True,
              "pattern-weighted values, heads side by side: the output projection's input"),
        _spec("head_out", "batch seq heads embed", True, "each head's output"),
        _spec("attn_out", "batch seq embed", True, "attention output before the post-norm"),
        _spec("attn_out_normed", "batch seq embed", True,
              "attention output after the post-norm (attn_out without one)"),
        _spec("resid_mid", "batch seq embed", True,
              "residual stream after attention (a parallel block's MLP reads resid_pre)"),
        _spec("mlp_in", "batch seq embed", True, "the MLP's input after its pre-norm"),
        _spec("mlp_hidden", "batch seq mlp", True,
              "act(gate) * up, or act(x W_in + b_in) in a plain MLP"),
        _spec("mlp_out", "batch seq embed", True, "MLP output before the post-norm"),
        _spec("mlp_out_normed", "batch seq embed", True,
              "MLP output after the post-norm (mlp_out without one)"),
        _spec("resid_post", "batch seq embed", True, "residual stream leaving the block"),
        _spec("final_norm_in", "batch seq embed", False, "input of the final norm"),
        _spec("final_norm_out", "batch seq embed", False, "output of the final norm"),
        _spec("logits", "batch seq vocab", False, "logits after the final soft-cap"),
    )
}
LAYER_SITES = tuple(name for name, s in SITES.items() if s.per_layer)
MODEL_SITES = tuple(name for name, s in SITES.items() if not s.per_layer)


FEATURES_PREFIX = "features@"
# Where a dictionary may read and write: a layer's sites of one vector per token.
STREAM_SITES = tuple(n for n in LAYER_SITES if SITES[n].axes[:2] == ("batch", "seq")
                     and len(SITES[n].axes) == 3)


def feature_site(site: str) -> str:
    """The name of the feature activations of a dictionary that reads `site`."""
    if site not in STREAM_SITES:
        raise ValueError(f"a dictionary reads one vector per token: site {site!r} is not one of "
                         f"{', '.join(STREAM_SITES)}")
    return FEATURES_PREFIX + site


def site_spec(name: str) -> SiteSpec:
    """The spec of site `name` (a model site, or `features@<site>`); an unknown name is an
    error that lists the valid ones."""
    if isinstance(name, str) and name in SITES:
        return SITES[name]
    if isinstance(name, str) and name.startswith(FEATURES_PREFIX) and \
            name[len(FEATURES_PREFIX):] in STREAM_SITES:
        return _spec(name, "batch seq latents", True, "a spliced dictionary's feature "
                     "activations")
    raise ValueError(f"unknown site {name!r}; valid sites are: {', '.join(SITES)}, and "
                     f"{FEATURES_PREFIX}<site> where a dictionary is spliced")


def site_key(site: str, layer: int | None) -> str:
    """The key of a record: `'blocks.3.v'` for a layer site, `'logits'` for a model site."""
    return site if layer is None else f"blocks.{layer}.{site}"


class SiteContext(Module):
    """What an intervention may need besides the array: the positions of the current queries
    and keys, which of them are real tokens, and the layer (None for model sites)."""

    positions: Int[Array, "batch seq"]
    valid: Bool[Array, "batch seq"]
    key_positions: Int[Array, "batch key"]
    key_valid: Bool[Array, "batch key"]
    layer: int | None = eqx.field(static=True)


class Intervention(Module):
    """Acts on one site: returns the array the model goes on with and a record (or None).

    Subclasses keep their arrays as fields (data: new values do not recompile) and their
    choices as static fields. `records` is True for interventions that only observe."""

    site: str = eqx.field(static=True)

    records = False
    # True for an intervention that runs interventions of its own sites (a spliced dictionary
    # runs those on its features) or passes arrays to a later one (a transcoder's input):
    # it is called as `nested(x, context, hooks, records)`.
    nests = False

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, Any]:
        raise NotImplementedError

    def nested(self, x: Array, context: SiteContext, hooks: SiteHooks,
               records: dict[str, Any]) -> tuple[Array, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__} at {self.site}"


class SiteHooks(Module):
    """The interventions installed on one layer (or on the model's own sites), in order."""

    interventions: tuple[Intervention, ...] = ()

    def wants(self, site: str) -> bool:
        """Whether any intervention is bound to `site` (static: decides what is computed)."""
        return any(i.site == site for i in self.interventions)

    def apply(
        self, site: str, x: Array, context: SiteContext, records: dict[str, Any]
    ) -> Array:
        """`x` after every intervention bound to `site`, in order; records go into `records`
        under `site_key(site, context.layer)`."""
        key = site_key(site, context.layer)
        for intervention in self.interventions:
            if intervention.site != site:
                continue
            if intervention.nests:
                x, record = intervention.nested(x, context, self, records)
            else:
                x, record = intervention(x, context)
            if record is not None:
                if key in records:
                    raise ValueError(f"two interventions record site {key}; keep one")
                records[key] = record
        return x


def unit_weights(
    weights: Float[Array, "batch seq *heads"], x: Array, spec: SiteSpec
) -> Float[Array, ...]:
    """Per-unit weights laid out to multiply `x` of site `spec`: `[batch, seq]` for stream
    sites, `[batch, seq, heads]` for head sites, exactly (nothing is broadcast silently)."""
    b, s = x.shape[0], x.shape[spec.seq_axis]
    expected = (b, s) if spec.head_axis is None else (b, s, x.shape[spec.head_axis])
    if tuple(weights.shape) != expected:
        units = "batch seq" if spec.head_axis is None else f"batch seq {spec.axes[spec.head_axis]}"
        raise ValueError(
            f"per-unit weights for site {spec.name} must have shape [{units}] = {expected} for "
            f"this input; got {tuple(weights.shape)}"
        )
    w = weights.astype(x.dtype)
    if spec.head_axis is None:
        return w.reshape(w.shape + (1,) * (x.ndim - 2))
    # Move (seq, heads) to the site's own axis order, then add size-1 axes for the rest.
    order = sorted([(spec.seq_axis, 1), (spec.head_axis, 2)])
    w = jnp.transpose(w, (0, *(o for _, o in order)))
    shape = [1] * x.ndim
    shape[0], shape[spec.seq_axis], shape[spec.head_axis] = b, s, x.shape[spec.head_axis]
    return w.reshape(shape)


def check_site_array(value: Any, x: Array, spec: SiteSpec, layer: int | None, what: str) -> None:
    """A clear error when `value` (a patch, a recorded array) is not the shape of the site."""
    if tuple(value.shape) != tuple(x.shape):
        where = "" if layer is None else f" of layer {layer}"
        raise ValueError(
            f"{what} for site {spec.name}{where} must have shape [{spec.shape}] = "
            f"{tuple(x.shape)}; got {tuple(value.shape)}"
        )


__all__ = [
    "FEATURES_PREFIX", "LAYER_SITES", "MODEL_SITES", "SITES", "STREAM_SITES", "Intervention",
    "SiteContext", "SiteHooks", "SiteSpec", "check_site_array", "feature_site", "site_key",
    "site_spec", "unit_weights",
]
