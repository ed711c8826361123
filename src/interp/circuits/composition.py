"""Composition scores between attention heads ("A Mathematical Framework for Transformer
Circuits", Elhage et al. 2021; TransformerLens' `HookedTransformer.all_composition_scores`).

For an earlier head A and a later head B, with `OV_A = W_V^A W_O^A` and `QK_B = W_Q^B W_K^B^T`
(both `[embed, embed]`, acting on row vectors of the residual stream):

    Q-composition  ||OV_A QK_B||_F   / (||OV_A||_F ||QK_B||_F)
    K-composition  ||OV_A QK_B^T||_F / (||OV_A||_F ||QK_B||_F)
    V-composition  ||OV_A OV_B||_F   / (||OV_A||_F ||OV_B||_F)

`scores[l_A, h_A, l_B, h_B]`, 0 unless `l_A < l_B` (TransformerLens' mask).

Grouped-query attention: query head `h` reads key and value head `h // (heads // kv_heads)`,
so the heads of a group share `W_K` and `W_V` (as TransformerLens expands them).
Gemma's norms, folded where they are linear: the pre-attention norm's scale `(1 + w)` into
`W_Q`, `W_K` and `W_V` (it multiplies their input), the post-attention norm's (Gemma 2, 3) into
`W_O`, the QK-norm's scales (Gemma 3) into `W_Q` and `W_K` of each head. Their `1 / rms`
factors, one number per token, are left out, as are RoPE (a rotation that depends on the two
positions) and LayerNorm's centring and bias; a score is unchanged by scaling either factor.

The Frobenius norms are computed in factored form, never as `[embed, embed]` products:
`||X M Y||_F^2 = sum((X^T X M) * (M Y Y^T))` with `M` the `[head_dim, head_dim]` middle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gemma_eqx.model.modules import Transformer

MODES = ("Q", "K", "V")


def _scale(norm) -> Array:
    """The per-dimension factor of a norm's learned scale (1 without a norm)."""
    if norm is None:
        return jnp.ones(())
    if hasattr(norm, "offset"):  # RMSNorm: offset + scale
        return norm.offset + norm.scale.astype(jnp.float32)
    return norm.scale.astype(jnp.float32)  # LayerNorm


def head_factors(model: Transformer) -> dict[str, Float[Array, "layers heads ..."]]:
    """Per query head, with the norms folded in: `W_Q`, `W_K`, `W_V` `[embed, head_dim]` and
    `W_O` `[head_dim, embed]`, stacked `[layers, heads, ...]` (float32)."""
    q, k, v, o = [], [], [], []
    for block in model.blocks:
        attn = block.attn
        group = attn.num_heads // attn.num_kv_heads
        pre = _scale(block.pre_attention_norm)
        pre = pre if pre.ndim else jnp.ones(attn.w_q.shape[1])
        post = _scale(block.post_attention_norm)
        wq = attn.w_q.astype(jnp.float32) * pre[:, None]
        wk = jnp.repeat(attn.w_k.astype(jnp.float32), group, axis=0) * pre[:, None]
        wv = jnp.repeat(attn.w_v.astype(jnp.float32), group, axis=0) * pre[:, None]
        if attn.query_norm is not None:
            wq = wq * _scale(attn.query_norm)
            wk = wk * _scale(attn.key_norm)
        q.append(wq)
        k.append(wk)
        v.append(wv)
        o.append(attn.w_o.astype(jnp.float32) * post)
    return {"q": jnp.stack(q), "k": jnp.stack(k), "v": jnp.stack(v), "o": jnp.stack(o)}


@jax.jit
def _scores(left_a, left_b, right_a, right_b):
    """`||A_i B_i C_j D_j||_F / (||A_i B_i||_F ||C_j D_j||_F)` for every pair: A `[n, d, h]`,
    B `[n, h, d]`, C `[n, d, h]`, D `[n, h, d]`."""
    gram_left = jnp.einsum("nda,ndb->nab", left_a, left_a)    # A^T A
    gram_right = jnp.einsum("nad,nbd->nab", right_b, right_b)  # D D^T
    norm_left = jnp.einsum("nab,nab->n", gram_left, jnp.einsum("nad,nbd->nab", left_b, left_b))
    norm_right = jnp.einsum("nab,nab->n", gram_right,
                            jnp.einsum("nda,ndb->nab", right_a, right_a))

    def row(args):
        gram, b = args
        middle = jnp.einsum("ad,ndb->nab", b, right_a)           # B_i C_j
        return jnp.einsum("nab,nab->n", jnp.einsum("ac,ncb->nab", gram, middle),
                          jnp.einsum("nac,ncb->nab", middle, gram_right))

    squared = jax.lax.map(row, (gram_left, left_b))
    return jnp.sqrt(jnp.maximum(squared, 0)) / jnp.sqrt(norm_left[:, None] * norm_right[None])


def composition_scores(model: Transformer, mode: str) -> Float[Array, "layers heads layers heads"]:
    """Q-, K- or V-composition (`mode`) of every earlier head into every later one (module
    docstring); `[l_A, h_A, l_B, h_B]`, 0 where `l_A >= l_B`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    f = head_factors(model)
    L, H = f["q"].shape[:2]  # noqa: N806
    flat = {name: a.reshape(L * H, *a.shape[2:]) for name, a in f.items()}
    right = {"Q": (flat["q"], jnp.swapaxes(flat["k"], 1, 2)),
             "K": (flat["k"], jnp.swapaxes(flat["q"], 1, 2)),
             "V": (flat["v"], flat["o"])}[mode]
    scores = _scores(flat["v"], flat["o"], *right).reshape(L, H, L, H)
    layers = jnp.arange(L)
    return jnp.where((layers[:, None] < layers[None, :])[:, None, :, None], scores, 0.0)


__all__ = ["MODES", "composition_scores", "head_factors"]
