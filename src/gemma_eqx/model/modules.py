"""The Gemma model family as Equinox modules.

Weights keep the parameter dtype they were created or loaded with; every computation runs in
the activation dtype of the transformer (weights are cast on use), so bf16 weights can be run
with float32 activations for analysis.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, DTypeLike, Float, Int, PRNGKeyArray

from ..core.checks import check_length, check_padding_mask, check_tokens, is_concrete
from ..core.config import GemmaConfig
from .base import Module
from .sites import SiteContext, SiteHooks

# Large negative instead of -inf, so a row with every key masked (a pad query) stays finite.
_MASKED_LOGIT = -2.3819763e38


def _at_least_f32(x: Array) -> Array:
    """`x` in float32, or kept in float64: precision-sensitive steps never run below float32
    and never throw away the extra bits of a float64 model."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _normal(key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int, dtype: DTypeLike) -> Array:
    return (jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5).astype(dtype)


class RMSNorm(Module):
    """`x * rsqrt(mean(x^2) + eps) * (offset + scale)` over the last axis: Gemma stores the
    scale raw (offset 1), Llama and Qwen the multiplier itself (offset 0)."""

    scale: Float[Array, " dim"]
    eps: float = eqx.field(static=True, default=1e-6)
    offset: float = eqx.field(static=True, default=1.0)

    def factor(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        """What `x` is multiplied by: `rsqrt(mean(x^2) + eps) * (offset + scale)`, in at least
        float32 (frozen, it makes the norm linear: direct logit attribution)."""
        x32 = _at_least_f32(x)
        r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return r * (self.offset + self.scale.astype(x32.dtype))

    def linear(
        self, part: Float[Array, "*batch dim"], total: Float[Array, "*#batch dim"]
    ) -> Float[Array, "*batch dim"]:
        """The norm's response to `part` of its input `total`, its statistics frozen at
        `total`: the parts' responses add up to the output minus `constant()`."""
        return _at_least_f32(part) * self.factor(total)

    def constant(self) -> Float[Array, " dim"] | float:
        """What the norm adds whatever its input (nothing: an RMSNorm has no bias)."""
        return 0.0

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = _at_least_f32(x)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (self.offset + self.scale.astype(x32.dtype))).astype(x.dtype)


class LayerNorm(Module):
    """`(x - mean(x)) * rsqrt(var(x) + eps) * scale + bias` over the last axis (GPT-2, NeoX)."""

    scale: Float[Array, " dim"]
    bias: Float[Array, " dim"]
    eps: float = eqx.field(static=True, default=1e-5)

    def _rsqrt(self, x32: Array) -> Array:
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        return jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)

    def linear(
        self, part: Float[Array, "*batch dim"], total: Float[Array, "*#batch dim"]
    ) -> Float[Array, "*batch dim"]:
        """As `RMSNorm.linear`: `part` centred, scaled by the frozen statistics of `total`."""
        part32 = _at_least_f32(part)
        centred = part32 - jnp.mean(part32, axis=-1, keepdims=True)
        return centred * self._rsqrt(_at_least_f32(total)) * self.scale.astype(part32.dtype)

    def constant(self) -> Float[Array, " dim"]:
        return self.bias

    def __call__(self, x: Float[Array, "*batch dim"]) -> Float[Array, "*batch dim"]:
        x32 = _at_least_f32(x)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        out = centred * self._rsqrt(x32) * self.scale.astype(x32.dtype)
        return (out + self.bias.astype(x32.dtype)).astype(x.dtype)


Norm = RMSNorm | LayerNorm


def _norm(config: GemmaConfig, size: int, dtype: DTypeLike) -> Norm:
    """A norm of `config`'s kind, initialised to the identity (an RMSNorm's zero scale under
    offset 1, or a unit one under offset 0; a LayerNorm's unit scale and zero bias)."""
    if config.norm_kind == "layer":
        return LayerNorm(jnp.ones((size,), dtype), jnp.zeros((size,), dtype), config.norm_eps)
    return RMSNorm(jnp.full((size,), 1.0 - config.norm_offset, dtype), config.norm_eps,
                   float(config.norm_offset))


class Embedder(Module):
    """Token embedding on the way in (Gemma scales it by sqrt(embed)), and the unembedding on
    the way out: the same table when tied, else `unembedding`."""

    embedding: Float[Array, "vocab embed"]
    unembedding: Float[Array, "vocab embed"] | None = None
    scale_inputs: bool = eqx.field(static=True, default=True)
    positions: Float[Array, "context embed"] | None = None  # learned positions (GPT-2)

    @property
    def output_table(self) -> Float[Array, "vocab embed"]:
        """The `[vocab, embed]` matrix the logits are read with."""
        return self.embedding if self.unembedding is None else self.unembedding

    def encode(
        self,
        tokens: Int[Array, "batch seq"],
        dtype: DTypeLike,
        positions: Int[Array, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq embed"]:
        """The embedded tokens, plus the learned embedding of their `positions` (if any)."""
        embedded = self.embedding[tokens].astype(dtype)
        if self.positions is not None:
            if positions is None:
                raise ValueError("a model with learned positions needs the positions")
            embedded = embedded + self.positions[positions].astype(dtype)
        if not self.scale_inputs:
            return embedded
        # As in the official code: sqrt(D) is rounded to the parameter dtype first.
        normalizer = jnp.asarray(math.sqrt(self.embedding.shape[1]), self.embedding.dtype)
        return embedded * normalizer.astype(dtype)

    def decode(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq vocab"]:
        return jnp.einsum("bsd,vd->bsv", x, self.output_table.astype(x.dtype))


# `Transformer.target_logprobs` streams the vocabulary only when the logits would be larger.
_STREAM_ABOVE_BYTES = 2**28

# Up to this many rows (batch x seq: decoding), `project` multiplies by each matrix of a stack
# in one batched matmul: XLA's CPU dot otherwise copies each `w[i]` out of the stack (or
# transposes the stack) first, which costs as much as the product for one row. Measured on 2
# cores for Gemma 3 270M: a decode step 66 -> 57 ms; a 41-token forward gained nothing.
_FEW_ROWS = 16


def project(
    x: Float[Array, "batch seq embed"], w: Float[Array, "k embed out"]
) -> Float[Array, "batch seq k out"]:
    """`x @ w[i]` for every matrix `w[i]` of the stack (in `x`'s dtype)."""
    b, s, d = x.shape
    w = w.astype(x.dtype)
    if b * s > _FEW_ROWS:
        return jnp.einsum("bsd,kdh->bskh", x, w)
    rows = jnp.broadcast_to(x.reshape(1, b * s, d), (w.shape[0], b * s, d))
    out = jax.lax.dot_general(rows, w, (((2,), (1,)), ((0,), (0,))))  # [k, rows, out]
    return jnp.moveaxis(out, 0, 1).reshape(b, s, w.shape[0], w.shape[2])


def llama3_frequencies(
    inverse: Float[np.ndarray, " half"], factor: float, low: float, high: float, original: int
) -> Float[np.ndarray, " half"]:
    """Llama 3.1's rescaled rotary frequencies: wavelengths longer than `original / low` are
    stretched by `factor`, shorter than `original / high` kept, those between interpolated."""
    wavelength = 2 * math.pi / inverse
    scaled = np.where(wavelength > original / low, inverse / factor, inverse)
    smooth = (original / wavelength - low) / (high - low)
    between = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return np.where(middle, between, scaled)


def apply_rope(
    x: Float[Array, "batch seq heads head_dim"],
    positions: Int[Array, "batch seq"],
    base: float,
    scale: float = 1.0,
    llama3: tuple[float, float, float, int] | None = None,
) -> Float[Array, "batch seq heads head_dim"]:
    """Rotary embedding, split-half: the first half of each head rotates against the second.
    Positions are divided by `scale` (linear scaling); `llama3` rescales the frequencies
    (`llama3_frequencies`)."""
    half = x.shape[-1] // 2
    x32 = _at_least_f32(x)
    if llama3 is None:
        timescale = base ** (2 * jnp.arange(half, dtype=x32.dtype) / x.shape[-1])
    else:  # computed in float64 on the host, as transformers computes them once
        inverse = 1.0 / base ** (2 * np.arange(half, dtype=np.float64) / x.shape[-1])
        timescale = jnp.asarray(1.0 / llama3_frequencies(inverse, *llama3), x32.dtype)
    angles = positions.astype(x32.dtype)[..., None, None] / scale / timescale
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class LayerCache(Module):
    """Keys and values of one attention layer for generation, with their positions.

    A `ring` cache (a sliding-window layer's) keeps only the last `cache` positions of each row:
    the token at position `p` goes to slot `p % cache`, so its memory grows with the window,
    not the context. A ring at least as long as the window attends like a full cache."""

    keys: Float[Array, "batch cache kv_heads head_dim"]
    values: Float[Array, "batch cache kv_heads head_dim"]
    positions: Int[Array, "batch cache"]
    valid: Bool[Array, "batch cache"]
    ring: bool = eqx.field(static=True, default=False)


def _through_ring(
    cache: LayerCache,
    keys: Float[Array, "batch seq kv_heads head_dim"],
    values: Float[Array, "batch seq kv_heads head_dim"],
    positions: Int[Array, "batch seq"],
    valid: Bool[Array, "batch seq"],
) -> tuple[Array, Array, Array, Array, LayerCache]:
    """Keys, values, positions and validity to attend over (what the ring held, then the new
    tokens: a chunk longer than the ring still sees all of itself), and the ring with each new
    real token at slot `position % size` (the last `size` positions of each row; padding is
    not written, so it never pushes a real token out of the window)."""
    size = cache.keys.shape[1]
    last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
    kept = valid & (positions > last - size)
    slots = jnp.where(kept, positions % size, size)  # `size` is out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(keys.shape[0])[:, None], slots.shape)

    def write(buf, new):
        return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")

    written = LayerCache(write(cache.keys, keys), write(cache.values, values),
                         write(cache.positions, positions), write(cache.valid, valid), ring=True)
    # Through the cache's dtype, as a full cache would store and read them back.
    stored = lambda new, old: new.astype(old.dtype).astype(new.dtype)  # noqa: E731
    join = lambda old, new: jnp.concatenate([old.astype(new.dtype), new], axis=1)  # noqa: E731
    return (join(cache.keys, stored(keys, cache.keys)),
            join(cache.values, stored(values, cache.values)),
            join(cache.positions, positions), join(cache.valid, valid), written)


class Attention(Module):
    """Multi-head / multi-query / grouped-query attention with RoPE, QK-norm, soft-cap, window."""

    w_q: Float[Array, "heads embed head_dim"]
    w_k: Float[Array, "kv_heads embed head_dim"]
    w_v: Float[Array, "kv_heads embed head_dim"]
    w_o: Float[Array, "heads head_dim embed"]
    query_norm: RMSNorm | None
    key_norm: RMSNorm | None
    query_scale: float = eqx.field(static=True)
    rope_base: float = eqx.field(static=True)
    rope_scale: float = eqx.field(static=True)
    sliding_window: int | None = eqx.field(static=True)
    logit_softcap: float | None = eqx.field(static=True)
    b_q: Float[Array, "heads head_dim"] | None = None
    b_k: Float[Array, "kv_heads head_dim"] | None = None
    b_v: Float[Array, "kv_heads head_dim"] | None = None
    rope_llama3: tuple[float, float, float, int] | None = eqx.field(static=True, default=None)
    b_o: Float[Array, " embed"] | None = None
    rotary_dim: int | None = eqx.field(static=True, default=None)  # None: every head dim

    def __init__(self, config: GemmaConfig, layer: int, *, key: PRNGKeyArray, dtype: DTypeLike):
        n, k, d, h = config.num_heads, config.num_kv_heads, config.embed_dim, config.head_dim
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.w_q = _normal(kq, (n, d, h), d, dtype)
        self.w_k = _normal(kk, (k, d, h), d, dtype)
        self.w_v = _normal(kv, (k, d, h), d, dtype)
        self.w_o = _normal(ko, (n, h, d), n * h, dtype)
        if config.use_qk_norm:
            self.query_norm, self.key_norm = _norm(config, h, dtype), _norm(config, h, dtype)
        else:
            self.query_norm = self.key_norm = None
        if config.qkv_bias:
            self.b_q, self.b_k, self.b_v = (jnp.zeros((m, h), dtype) for m in (n, k, k))
        else:
            self.b_q = self.b_k = self.b_v = None
        self.rope_llama3 = config.rope_llama3
        self.b_o = jnp.zeros((d,), dtype) if config.attn_out_bias else None
        self.rotary_dim = None if config.rotary_dim == h else config.rotary_dim
        self.query_scale = config.query_scale
        is_local = config.attention_kinds[layer] == "local"
        self.rope_base = config.local_rope_base if is_local else config.global_rope_base
        self.rope_scale = 1.0 if is_local else config.global_rope_scale
        self.sliding_window = config.sliding_window if is_local else None
        self.logit_softcap = config.attn_logit_softcap

    @property
    def num_heads(self) -> int:
        return self.w_q.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.w_k.shape[0]

    def project_kv(
        self, x: Float[Array, "batch seq embed"], positions: Int[Array, "batch seq"]
    ) -> tuple[Float[Array, "batch seq kv_heads head_dim"], Float[Array, "batch seq kv_heads head_dim"]]:  # noqa: E501
        keys, values = project(x, self.w_k), project(x, self.w_v)
        if self.b_k is not None:
            keys, values = keys + self.b_k.astype(x.dtype), values + self.b_v.astype(x.dtype)
        if self.key_norm is not None:
            keys = self.key_norm(keys)
        return self.rope(keys, positions), values

    def rope(
        self, x: Float[Array, "batch seq heads head_dim"], positions: Int[Array, "batch seq"]
    ) -> Float[Array, "batch seq heads head_dim"]:
        """This layer's rotary embedding of queries or keys (of their first `rotary_dim` dims:
        GPT-NeoX rotates a quarter of each head, GPT-2 none)."""
        if self.rotary_dim is None:
            return apply_rope(x, positions, self.rope_base, self.rope_scale, self.rope_llama3)
        if self.rotary_dim == 0:
            return x
        turned = apply_rope(x[..., :self.rotary_dim], positions, self.rope_base,
                            self.rope_scale, self.rope_llama3)
        return jnp.concatenate([turned, x[..., self.rotary_dim:]], axis=-1)

    def mask(
        self,
        query_positions: Int[Array, "batch query"],
        key_positions: Int[Array, "batch key"],
        key_valid: Bool[Array, "batch key"],
    ) -> Bool[Array, "batch query key"]:
        """Which keys each query may read: valid, causal by position, inside the window."""
        delta = query_positions[:, :, None] - key_positions[:, None, :]
        allowed = (delta >= 0) & key_valid[:, None, :]
        if self.sliding_window is not None:
            allowed &= delta < self.sliding_window
        return allowed

    def __call__(
        self,
        x: Float[Array, "batch query embed"],
        positions: Int[Array, "batch query"],
        valid: Bool[Array, "batch query"],
        cache: LayerCache | None = None,
        cache_index: Int[Array, ""] | None = None,
        hooks: SiteHooks | None = None,
        records: dict[str, Any] | None = None,
        layer: int | None = None,
    ) -> tuple[Float[Array, "batch query embed"], LayerCache | None]:
        """Attend over `x` itself, or over the cache after writing `x`'s keys at `cache_index`.

        `hooks` act on the attention sites (see `gemma_eqx.sites`); what they record goes into
        `records`."""
        hooks = SiteHooks() if hooks is None else hooks
        records = {} if records is None else records
        context = SiteContext(positions, valid, positions, valid, layer)
        site = lambda name, value: hooks.apply(name, value, context, records)  # noqa: E731
        queries = project(x, self.w_q)
        if self.b_q is not None:
            queries = queries + self.b_q.astype(x.dtype)
        if self.query_norm is not None:
            queries = self.query_norm(queries)
        queries = site("q", self.rope(queries, positions))
        queries = queries * jnp.asarray(self.query_scale, x.dtype)
        keys, values = self.project_kv(x, positions)
        keys, values = site("k", keys), site("v", values)
        key_positions, key_valid = positions, valid
        if cache is not None and cache.ring:
            keys, values, key_positions, key_valid, cache = _through_ring(
                cache, keys, values, positions, valid)
            context = SiteContext(positions, valid, key_positions, key_valid, layer)
        elif cache is not None:
            write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                buf, new.astype(buf.dtype), cache_index, axis=1
            )
            cache = LayerCache(
                write(cache.keys, keys),
                write(cache.values, values),
                write(cache.positions, positions),
                write(cache.valid, valid),
            )
            keys, values = cache.keys.astype(x.dtype), cache.values.astype(x.dtype)
            key_positions, key_valid = cache.positions, cache.valid
            context = SiteContext(positions, valid, key_positions, key_valid, layer)

        b, s, n, h = queries.shape
        kv, t = self.num_kv_heads, keys.shape[1]
        per_head_keys, per_head_values = hooks.wants("k_per_head"), hooks.wants("v_per_head")
        if per_head_keys:
            # Query head i reads key head i // (n // kv): the grouped einsum below uses the same
            # layout, so this copy changes nothing until an intervention edits one head's copy.
            head_keys = site("k_per_head", jnp.repeat(keys, n // kv, axis=2))
            logits = jnp.einsum("bsnh,btnh->bnst", queries, head_keys)
        else:
            grouped = queries.reshape(b, s, kv, n // kv, h)
            logits = jnp.einsum("bskgh,btkh->bkgst", grouped, keys).reshape(b, n, s, t)
        if self.logit_softcap is not None:
            logits = jnp.tanh(logits / self.logit_softcap) * self.logit_softcap
        allowed = self.mask(positions, key_positions, key_valid)[:, None]
        logits = jnp.where(allowed, _at_least_f32(logits), _MASKED_LOGIT)
        if hooks.wants("attn_logits"):
            # An intervention cannot unmask a key: a zero-ablated or scaled score of a masked
            # key (a later position, padding, outside the window) stays masked.
            logits = jnp.where(allowed, site("attn_logits", logits), _MASKED_LOGIT)
        weights = site("pattern", jax.nn.softmax(logits, axis=-1).astype(x.dtype))

        if per_head_values:
            head_values = site("v_per_head", jnp.repeat(values, n // kv, axis=2))
            mixed = jnp.einsum("bnst,btnh->bsnh", weights, head_values)
        else:
            grouped_weights = weights.reshape(b, kv, n // kv, s, t)
            mixed = jnp.einsum("bkgst,btkh->bskgh", grouped_weights, values).reshape(b, s, n, h)
        mixed = site("mixed_values", mixed)
        if hooks.wants("mixed_values_flat"):
            mixed = site("mixed_values_flat", mixed.reshape(b, s, n * h)).reshape(b, s, n, h)
        w_o = self.w_o.astype(x.dtype)
        if hooks.wants("head_out"):
            out = site("head_out", jnp.einsum("bsnh,nhd->bsnd", mixed, w_o)).sum(axis=2)
        else:  # one matmul over (heads, head_dim): faster than the einsum at every size
            out = mixed.reshape(b, s, n * h) @ w_o.reshape(n * h, w_o.shape[-1])
        if self.b_o is not None:  # not any head's: after `head_out`, inside `attn_out`
            out = out + self.b_o.astype(out.dtype)
        return site("attn_out", out), cache


_ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": jax.nn.silu}


class MLP(Module):
    """Gated, `act(x @ W_gate[0]) * (x @ W_gate[1]) @ W_linear` (Gemma's GeGLU with
    tanh-approximated GELU, Llama's SwiGLU with SiLU); or plain, one input matrix,
    `act(x @ W_gate[0] + b_in) @ W_linear + b_out` (GPT-2, GPT-NeoX)."""

    w_gating: Float[Array, "gates embed mlp"]  # gates: 2 (gate, up) or 1 (plain)
    w_linear: Float[Array, "mlp embed"]
    activation: str = eqx.field(static=True, default="gelu_tanh")
    b_in: Float[Array, " mlp"] | None = None
    b_out: Float[Array, " embed"] | None = None

    def __init__(self, config: GemmaConfig, *, key: PRNGKeyArray, dtype: DTypeLike):
        d, f = config.embed_dim, config.hidden_dim
        kg, kl = jax.random.split(key)
        self.w_gating = _normal(kg, (2 if config.mlp_gated else 1, d, f), d, dtype)
        self.w_linear = _normal(kl, (f, d), f, dtype)
        self.activation = config.mlp_activation
        if config.mlp_bias:
            self.b_in, self.b_out = jnp.zeros((f,), dtype), jnp.zeros((d,), dtype)
        else:
            self.b_in = self.b_out = None

    def hidden(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq mlp"]:
        if self.w_gating.shape[0] == 1:
            pre = jnp.einsum("bsd,df->bsf", x, self.w_gating[0].astype(x.dtype))
            if self.b_in is not None:
                pre = pre + self.b_in.astype(x.dtype)
            return _ACTIVATIONS[self.activation](pre)
        if x.shape[0] * x.shape[1] <= _FEW_ROWS:
            both = project(x, self.w_gating)
            gate, up = both[:, :, 0], both[:, :, 1]
        else:  # two plain matmuls: faster than one over the stack for many rows
            w = self.w_gating.astype(x.dtype)
            gate = jnp.einsum("bsd,df->bsf", x, w[0])
            up = jnp.einsum("bsd,df->bsf", x, w[1])
        return _ACTIVATIONS[self.activation](gate) * up

    def project(self, hidden: Float[Array, "batch seq mlp"]) -> Float[Array, "batch seq embed"]:
        out = jnp.einsum("bsf,fd->bsd", hidden, self.w_linear.astype(hidden.dtype))
        return out if self.b_out is None else out + self.b_out.astype(out.dtype)

    def __call__(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq embed"]:
        return self.project(self.hidden(x))


class Block(Module):
    """Pre-norm residual block; Gemma 2 and 3 also normalise each sublayer's output.

    `hooks` holds the interventions on this layer's sites (`gemma_eqx.sites`); by default none.
    """

    pre_attention_norm: Norm
    attn: Attention
    post_attention_norm: RMSNorm | None
    pre_ffw_norm: Norm
    mlp: MLP
    post_ffw_norm: RMSNorm | None
    hooks: SiteHooks
    parallel: bool = eqx.field(static=True, default=False)  # the MLP reads the block's input

    def __init__(self, config: GemmaConfig, layer: int, *, key: PRNGKeyArray, dtype: DTypeLike):
        ka, km = jax.random.split(key)
        norm = lambda: _norm(config, config.embed_dim, dtype)  # noqa: E731
        self.pre_attention_norm = norm()
        self.attn = Attention(config, layer, key=ka, dtype=dtype)
        self.post_attention_norm = norm() if config.use_post_norms else None
        self.pre_ffw_norm = norm()
        self.mlp = MLP(config, key=km, dtype=dtype)
        self.post_ffw_norm = norm() if config.use_post_norms else None
        self.hooks = SiteHooks()
        self.parallel = config.parallel_residual

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Int[Array, "batch seq"],
        valid: Bool[Array, "batch seq"],
        cache: LayerCache | None = None,
        cache_index: Int[Array, ""] | None = None,
        records: dict[str, Any] | None = None,
        layer: int | None = None,
    ) -> tuple[Float[Array, "batch seq embed"], LayerCache | None]:
        """The block's output; what its interventions record goes into `records`."""
        records = {} if records is None else records
        hooks = self.hooks
        context = SiteContext(positions, valid, positions, valid, layer)
        site = lambda name, value: hooks.apply(name, value, context, records)  # noqa: E731
        x = site("resid_pre", x)
        attended, cache = self.attn(
            self.pre_attention_norm(x), positions, valid, cache, cache_index, hooks, records,
            layer,
        )
        if self.post_attention_norm is not None:
            attended = self.post_attention_norm(attended)
        attended = site("attn_out_normed", attended)
        # A parallel block (GPT-NeoX) adds both updates to its input: `resid_mid` is still the
        # stream after attention, but the MLP reads `resid_pre`.
        mlp_input = x
        x = site("resid_mid", x + attended)
        normed = site("mlp_in", self.pre_ffw_norm(mlp_input if self.parallel else x))
        if hooks.wants("mlp_hidden"):
            if not isinstance(self.mlp, MLP):
                raise ValueError(f"site mlp_hidden of layer {layer}: the MLP was replaced by "
                                 f"{type(self.mlp).__name__}, which has no hidden activation")
            update = self.mlp.project(site("mlp_hidden", self.mlp.hidden(normed)))
        else:
            update = self.mlp(normed)
        update = site("mlp_out", update)
        if self.post_ffw_norm is not None:
            update = self.post_ffw_norm(update)
        update = site("mlp_out_normed", update)
        return site("resid_post", x + update), cache


def _readout_context(
    positions: Int[Array, "batch seq"],
    padding_mask: Bool[Array, "batch seq"],
    logits_at: Int[Array, "batch k"] | None,
) -> SiteContext:
    """The context of the model's read-out sites: the selected positions as queries, every
    position as keys."""
    if logits_at is None:
        return SiteContext(positions, padding_mask, positions, padding_mask, None)
    take = lambda a: jnp.take_along_axis(a, logits_at, axis=1)  # noqa: E731
    return SiteContext(take(positions), take(padding_mask), positions, padding_mask, None)


_COMPILED_INIT_BELOW = 2**22  # embedding entries; a tiny test model has ~1e4, the 270M 1.7e8


@eqx.filter_jit
def _initialise(config: GemmaConfig, key: PRNGKeyArray, dtype: Any, activation_dtype: Any) -> Any:
    return Transformer(config, key=key, dtype=dtype, activation_dtype=activation_dtype)


@eqx.filter_jit
def _compiled_forward(model, tokens, positions, padding_mask, cache, cache_index, logits_at):
    return model.forward(tokens, positions=positions, padding_mask=padding_mask, cache=cache,
                         cache_index=cache_index, logits_at=logits_at, check_ids=False)


class ForwardOutput(NamedTuple):
    logits: Float[Array, "batch seq vocab"]
    records: dict[str, Any]  # what the interventions recorded, keyed by `sites.site_key`
    cache: tuple[LayerCache, ...] | None


class Transformer(Module):
    """A Gemma decoder: `model(tokens)` maps `[batch, seq]` token ids to `[batch, seq, vocab]`.

    `hooks` holds the interventions on the model's own sites (`embed`, `final_norm_in`,
    `final_norm_out`, `logits`); each block holds its own.
    """

    config: GemmaConfig = eqx.field(static=True)
    embedder: Embedder
    blocks: tuple[Block, ...]
    final_norm: Norm
    hooks: SiteHooks
    activation_dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        config: GemmaConfig,
        *,
        key: PRNGKeyArray,
        dtype: DTypeLike = jnp.float32,
        activation_dtype: DTypeLike | None = None,
    ):
        """Randomly initialised weights in `dtype`; activations default to the same dtype.

        With a concrete key, a small model's weights are drawn by one compiled program
        (eagerly, every distinct leaf shape compiles kernels of its own: seconds for a tiny
        model); a large one's eagerly (compiling the one program for the 270M took 10 s, its
        eager draw 6 s)."""
        if is_concrete(key) and config.vocab_size * config.embed_dim < _COMPILED_INIT_BELOW:
            built = _initialise(config, key, jnp.dtype(dtype),
                                None if activation_dtype is None else jnp.dtype(activation_dtype))
            for field in dataclasses.fields(built):
                setattr(self, field.name, getattr(built, field.name))
            return
        ke, *kb = jax.random.split(key, config.num_layers + 1)
        self.config = config
        table = (config.vocab_size, config.embed_dim)
        # An untied unembedding draws from a key of its own, leaving the others' draws as a
        # tied model's.
        self.embedder = Embedder(
            _normal(ke, table, config.embed_dim, dtype),
            None if config.tie_embeddings else _normal(jax.random.fold_in(ke, 1), table,
                                                       config.embed_dim, dtype),
            config.embed_scale,
            _normal(jax.random.fold_in(ke, 2), (config.context_length, config.embed_dim),
                    config.embed_dim, dtype) if config.learned_positions else None,
        )
        self.blocks = tuple(
            Block(config, i, key=k, dtype=dtype) for i, k in enumerate(kb)
        )
        self.final_norm = _norm(config, config.embed_dim, dtype)
        self.hooks = SiteHooks()
        self.activation_dtype = jnp.dtype(activation_dtype or dtype)

    def with_activation_dtype(self, dtype: DTypeLike) -> Transformer:
        """The same weights (shared, not copied), computing in `dtype`."""
        model = copy.copy(self)  # a static field: tree_at cannot replace it
        object.__setattr__(model, "activation_dtype", jnp.dtype(dtype))
        return model

    def embed(
        self,
        tokens: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        padding_mask: Bool[Array, "batch seq"],
        records: dict[str, Any],
    ) -> Float[Array, "batch seq embed"]:
        """The stream entering block 0 (the `embed` site applied; ids already checked)."""
        context = SiteContext(positions, padding_mask, positions, padding_mask, None)
        return self.hooks.apply(
            "embed", self.embedder.encode(tokens, self.activation_dtype, positions), context,
            records)

    def final_stream(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Int[Array, "batch seq"],
        padding_mask: Bool[Array, "batch seq"],
        logits_at: Int[Array, "batch k"] | None,
        records: dict[str, Any],
    ) -> Float[Array, "batch _k embed"]:
        """The last block's output after the final norm, at `logits_at` (indices into seq) or
        everywhere; the sites `final_norm_in` and `final_norm_out` applied."""
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        context = _readout_context(positions, padding_mask, logits_at)
        site = lambda name, value: self.hooks.apply(name, value, context, records)  # noqa: E731
        return site("final_norm_out", self.final_norm(site("final_norm_in", x)))

    def _softcap(self, logits: Array) -> Array:
        if self.config.final_logit_softcap is None:
            return logits
        cap = self.config.final_logit_softcap
        return jnp.tanh(logits / cap) * cap

    def readout(
        self,
        x: Float[Array, "batch seq embed"],
        positions: Int[Array, "batch seq"],
        padding_mask: Bool[Array, "batch seq"],
        logits_at: Int[Array, "batch k"] | None,
        records: dict[str, Any],
    ) -> Float[Array, "batch _k vocab"]:
        """Final norm, vocabulary projection and soft-cap of the last block's output, at
        `logits_at` (indices into seq) or everywhere; the model's own sites applied."""
        normed = self.final_stream(x, positions, padding_mask, logits_at, records)
        logits = self._softcap(self.embedder.decode(normed))
        return self.hooks.apply("logits", logits,
                                _readout_context(positions, padding_mask, logits_at), records)

    def target_logprobs(
        self,
        normed: Float[Array, "*rows embed"],
        targets: Int[Array, "*rows"],
        *,
        chunk: int | None = None,
        argmax: bool = True,
    ) -> tuple[Float[Array, "*rows"], Int[Array, "*rows"] | None]:
        """Log-probability of `targets` and the argmax token (None with `argmax=False`, which
        saves a pass over every chunk of logits), from the final norm's output
        (`final_stream`), streaming the vocabulary `chunk` tokens at a time (default: 4096
        when the `[rows, vocab]` logits would exceed 256 MiB, else all at once): large logits
        then never exist at once, and writing them out costs more than the projection on a
        CPU. Equal to `log_softmax(readout)` up to float rounding; not for a model with an
        intervention on its `logits` site (that needs the logits)."""
        if self.hooks.wants("logits"):
            raise ValueError("target_logprobs cannot apply the intervention on the logits "
                             "site; use readout")
        lead = normed.shape[:-1]
        x = _at_least_f32(normed.reshape(-1, normed.shape[-1]))
        table = self.embedder.output_table
        vocab = table.shape[0]
        rows = x.shape[0]
        if chunk is None:
            # Few rows: their logits are small, and one matmul beats many thin ones.
            chunk = vocab if rows * vocab * 4 <= _STREAM_ABOVE_BYTES else 4096
        chunk = min(chunk, vocab)
        n_chunks = -(-vocab // chunk)
        padded = n_chunks * chunk != vocab  # the last chunk's padding must not count
        table = jnp.pad(table, ((0, n_chunks * chunk - vocab), (0, 0)))

        def step(carry, i):
            top, total, best, arg = carry
            part = jax.lax.dynamic_slice_in_dim(table, i * chunk, chunk).astype(x.dtype)
            logits = self._softcap(x @ part.T)
            if padded:
                logits = jnp.where(i * chunk + jnp.arange(chunk) < vocab, logits, -jnp.inf)
            high = logits.max(-1)
            new_top = jnp.maximum(top, high)
            total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[:, None]).sum(-1)
            if argmax:
                arg = jnp.where(high > best, i * chunk + jnp.argmax(logits, -1), arg)
            return (new_top, total, jnp.maximum(best, high), arg), None

        init = (jnp.full((rows,), -jnp.inf, x.dtype), jnp.zeros((rows,), x.dtype),
                jnp.full((rows,), -jnp.inf, x.dtype), jnp.zeros((rows,), jnp.int32))
        (top, total, _, arg), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
        flat_targets = targets.reshape(-1)
        target = self._softcap(jnp.einsum(
            "rd,rd->r", x, self.embedder.output_table[flat_targets].astype(x.dtype)))
        logprob = target - (top + jnp.log(total))
        return logprob.reshape(lead), arg.reshape(lead) if argmax else None

    def token_logits(
        self, normed: Float[Array, "*rows embed"], ids: Int[Array, " n"]
    ) -> Float[Array, "*rows n"]:
        """The logits of tokens `ids` alone (soft-capped, as `readout` gives them) from the
        final norm's output (`final_stream`): a few tokens' logits without the vocabulary's
        projection. Not for a model with an intervention on its `logits` site."""
        if self.hooks.wants("logits"):
            raise ValueError("token_logits cannot apply the intervention on the logits site; "
                             "use readout")
        x = _at_least_f32(normed)
        return self._softcap(x @ self.embedder.output_table[ids].astype(x.dtype).T)

    def forward(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        cache: tuple[LayerCache, ...] | None = None,
        cache_index: Int[Array, ""] | None = None,
        logits_at: Int[Array, "batch k"] | None = None,
        check_ids: bool = True,
    ) -> ForwardOutput:
        """Logits, what the installed interventions recorded, and the updated cache.

        `padding_mask` marks real tokens (True) against padding; it must have the shape of
        `tokens` and at least one real token per row (see `checks.check_padding_mask`).
        Without `positions`, positions count real tokens only, so a left-padded sequence gets
        the positions it has unpadded. Sequences longer than the model's context are refused.
        `logits_at` (indices into seq) computes logits `[batch, k, vocab]` at those positions
        only: the vocabulary projection is most of a small model's cost.
        Token ids are checked eagerly when concrete; traced ids are checked inside the
        program by `eqx.error_if`, unless `check_ids=False` (for callers that checked them
        before `jit`: the host callback of that check keeps XLA's persistent compilation cache
        from storing the program).
        """
        check_tokens(tokens, self.config.vocab_size)
        check_length(tokens.shape[1], self.config.context_length, "a sequence of tokens")
        if is_concrete(tokens):
            # Called eagerly: checked here, computed by one compiled program (reused for every
            # model of this structure and inputs of these shapes; new weights or intervention
            # values do not recompile). Under a caller's `jit` the body below is traced inline.
            if padding_mask is not None:
                padding_mask = check_padding_mask(padding_mask, tokens.shape)
            return _compiled_forward(self, jnp.asarray(tokens), positions, padding_mask,
                                     cache, cache_index, logits_at)
        if check_ids:
            tokens = eqx.error_if(
                tokens,
                (tokens < 0) | (tokens >= self.config.vocab_size),
                f"a token id is outside the vocabulary [0, {self.config.vocab_size})",
            )
        if padding_mask is None:
            padding_mask = jnp.ones(tokens.shape, bool)
        else:
            padding_mask = check_padding_mask(padding_mask, tokens.shape)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)
        records: dict[str, Any] = {}
        x = self.embed(tokens, positions, padding_mask, records)
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block(x, positions, padding_mask, layer_cache, cache_index,
                                   records, i)
            new_cache.append(layer_cache)
        logits = self.readout(x, positions, padding_mask, logits_at, records)
        return ForwardOutput(logits, records, None if cache is None else tuple(new_cache))

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        positions: Int[Array, "batch seq"] | None = None,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        check_ids: bool = True,
    ) -> Float[Array, "batch seq vocab"]:
        return self.forward(tokens, positions=positions, padding_mask=padding_mask,
                            check_ids=check_ids).logits


def count_params(model: Transformer) -> int:
    """Number of parameters; works on abstract models from `eqx.filter_eval_shape` too."""
    leaves = [x for x in jax.tree_util.tree_leaves(model) if hasattr(x, "shape")]
    return int(sum(np.prod(x.shape) for x in leaves))
