"""GPT-2 and GPT-NeoX (Pythia): LayerNorm with a bias, biases on every projection, a plain
(ungated) GELU MLP; GPT-2 adds learned positions to the embedding and stores its matrices
transposed (`Conv1D`, q/k/v fused in `c_attn`); NeoX rotates a quarter of each head, runs
attention and MLP side by side, and fuses q/k/v per head."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .base import Family, FieldReader, Stored, tensor

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_SHARED = dict(norm_kind="layer", norm_offset=0.0, embed_scale=False, mlp_gated=False,
               mlp_bias=True, qkv_bias=True, attn_out_bias=True)


def _activation(f: FieldReader, name: str) -> str:
    act = f.text(name, "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{f.source}: {name} {act!r} is not supported for this family "
                         f"({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


# Buffers some checkpoints store beside the weights: causal masks, RoPE frequencies.
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|"
                      r"attention\.masked_bias|rotary_emb\.inv_freq)$")


# ------------------------------------------------------------------------------ GPT-2


def _gpt2_sizes(f: FieldReader) -> dict[str, int]:
    width, heads = f.count("n_embd"), f.count("n_head")
    return dict(num_layers=f.count("n_layer"), embed_dim=width, num_heads=heads,
                num_kv_heads=heads, head_dim=width // heads,
                hidden_dim=f.count("n_inner", 4 * width), vocab_size=f.count("vocab_size"))


def _gpt2(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
    for name, wrong in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        if f.flag(name, not wrong) == wrong:
            raise ValueError(f"{f.source}: {name} = {str(wrong).lower()} is not supported")
    return dict(norm_eps=f.number("layer_norm_epsilon", 1e-5),
                context_length=f.count("n_positions", 1024), learned_positions=True,
                rotary_fraction=0.0, mlp_activation=_activation(f, "activation_function"),
                tie_embeddings=f.flag("tie_word_embeddings", True),
                attention_kinds=("global",) * sizes["num_layers"])


def _c_attn(part: int, kind: str) -> Stored:
    """One of q, k, v from `c_attn`: a `Conv1D` weight `[embed, 3 * embed]` (x @ W), or its
    bias `[3 * embed]`."""
    def to_ours(w, c):
        n, h = c.num_heads, c.head_dim
        piece = w[..., part * n * h:(part + 1) * n * h]
        return piece.reshape(n, h) if kind == "bias" else \
            piece.reshape(c.embed_dim, n, h).transpose(1, 0, 2)

    return tensor(f"h.{{i}}.attn.c_attn.{kind}", *(["embed_dim"] if kind == "weight" else []),
                  "3*num_heads*head_dim", to_ours=to_ours)


_GPT2_LAYOUT = {
    "embedder.embedding": tensor("wte.weight", "vocab_size", "embed_dim"),
    "embedder.positions": tensor("wpe.weight", "context_length", "embed_dim"),
    "final_norm.scale": tensor("ln_f.weight", "embed_dim"),
    "final_norm.bias": tensor("ln_f.bias", "embed_dim"),
    **{f"blocks.{{i}}.{ours}.{kind}": tensor(f"h.{{i}}.{theirs}.{stored}", "embed_dim")
       for ours, theirs in (("pre_attention_norm", "ln_1"), ("pre_ffw_norm", "ln_2"))
       for kind, stored in (("scale", "weight"), ("bias", "bias"))},
    **{f"blocks.{{i}}.attn.{w}_{x}": _c_attn(p, kind) for p, x in enumerate("qkv")
       for w, kind in (("w", "weight"), ("b", "bias"))},
    "blocks.{i}.attn.w_o": tensor("h.{i}.attn.c_proj.weight", "num_heads*head_dim", "embed_dim",
                                  to_ours=lambda w, c: w.reshape(c.num_heads, c.head_dim, -1)),
    "blocks.{i}.attn.b_o": tensor("h.{i}.attn.c_proj.bias", "embed_dim"),
    "blocks.{i}.mlp.w_gating": tensor("h.{i}.mlp.c_fc.weight", "embed_dim", "hidden_dim",
                                      to_ours=lambda w, c: w[None]),
    "blocks.{i}.mlp.b_in": tensor("h.{i}.mlp.c_fc.bias", "hidden_dim"),
    "blocks.{i}.mlp.w_linear": tensor("h.{i}.mlp.c_proj.weight", "hidden_dim", "embed_dim"),
    "blocks.{i}.mlp.b_out": tensor("h.{i}.mlp.c_proj.bias", "embed_dim"),
}


# ------------------------------------------------------------------------- GPT-NeoX


def _neox(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
    p = f.nested("rope_parameters")  # transformers 5; earlier files: rotary_pct and _emb_base
    new = p is not None and p.has("rope_theta")
    base = p.number("rope_theta") if new else f.number("rotary_emb_base", 10_000.0)
    fraction = p.number("partial_rotary_factor", 1.0) if new else f.number("rotary_pct", 0.25)
    if (kind := p.text("rope_type", "default") if new else "default") != "default":
        raise ValueError(f"{f.source}: RoPE type {kind!r} is not supported for GPT-NeoX")
    biased = f.flag("attention_bias", True)
    return dict(norm_eps=f.number("layer_norm_eps", 1e-5),
                context_length=f.count("max_position_embeddings", 2048),
                global_rope_base=base, local_rope_base=base, rotary_fraction=fraction,
                mlp_activation=_activation(f, "hidden_act"), qkv_bias=biased,
                attn_out_bias=biased, parallel_residual=f.flag("use_parallel_residual", True),
                tie_embeddings=f.flag("tie_word_embeddings", False),
                attention_kinds=("global",) * sizes["num_layers"])


def _fused_per_head(part: int, kind: str) -> Stored:
    """One of q, k, v from `query_key_value`: rows ordered [heads, (q, k, v), head_dim]."""
    def to_ours(w, c):
        n, h = c.num_heads, c.head_dim
        return w.reshape(n, 3, h)[:, part] if kind == "bias" else \
            w.reshape(n, 3, h, c.embed_dim)[:, part].transpose(0, 2, 1)

    return tensor(f"layers.{{i}}.attention.query_key_value.{kind}", "3*num_heads*head_dim",
                  *(["embed_dim"] if kind == "weight" else []), to_ours=to_ours)


_NEOX_LAYOUT = {
    "embedder.embedding": tensor("embed_in.weight", "vocab_size", "embed_dim"),
    "embedder.unembedding": tensor("embed_out.weight", "vocab_size", "embed_dim"),
    "final_norm.scale": tensor("final_layer_norm.weight", "embed_dim"),
    "final_norm.bias": tensor("final_layer_norm.bias", "embed_dim"),
    **{f"blocks.{{i}}.attn.{w}_{x}": _fused_per_head(p, kind) for p, x in enumerate("qkv")
       for w, kind in (("w", "weight"), ("b", "bias"))},
    "blocks.{i}.attn.w_o": tensor("layers.{i}.attention.dense.weight", "embed_dim", "num_heads*"
                                  "head_dim", to_ours=lambda w, c: w.reshape(
                                      c.embed_dim, c.num_heads, -1).transpose(1, 2, 0)),
    "blocks.{i}.attn.b_o": tensor("layers.{i}.attention.dense.bias", "embed_dim"),
    "blocks.{i}.mlp.w_gating": tensor("layers.{i}.mlp.dense_h_to_4h.weight", "hidden_dim",
                                      "embed_dim", to_ours=lambda w, c: w.T[None]),
    "blocks.{i}.mlp.b_in": tensor("layers.{i}.mlp.dense_h_to_4h.bias", "hidden_dim"),
    "blocks.{i}.mlp.w_linear": tensor("layers.{i}.mlp.dense_4h_to_h.weight", "embed_dim",
                                      "hidden_dim", to_ours=lambda w, c: w.T),
    "blocks.{i}.mlp.b_out": tensor("layers.{i}.mlp.dense_4h_to_h.bias", "embed_dim"),
}

# ----------------------------------------------------------------------------- GGUF
# llama.cpp's converter stores both families alike: matrices [out, in] (GPT-2's transposed
# back), q/k/v fused in `attn_qkv` as all query rows, then all key rows, then all value rows
# (NeoX's per-head interleaving undone), the MLP as `ffn_up` / `ffn_down`.


def _qkv_rows(part: int, kind: str) -> Stored:
    def to_ours(w, c):
        n, h = c.num_heads, c.head_dim
        piece = w[part * n * h:(part + 1) * n * h]
        return piece.reshape(n, h) if kind == "bias" else \
            piece.reshape(n, h, c.embed_dim).transpose(0, 2, 1)

    return tensor(f"blk.{{i}}.attn_qkv.{kind}", "3*num_heads*head_dim",
                  *(["embed_dim"] if kind == "weight" else []), to_ours=to_ours)


_GGUF_LAYOUT = {
    **{f"blocks.{{i}}.attn.{w}_{x}": _qkv_rows(p, kind) for p, x in enumerate("qkv")
       for w, kind in (("w", "weight"), ("b", "bias"))},
    "blocks.{i}.mlp.w_gating": tensor("blk.{i}.ffn_up.weight", "hidden_dim", "embed_dim",
                                      to_ours=lambda w, c: w.T[None]),
}


def _gpt2_gguf(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
    return dict(norm_eps=f.number("attention.layer_norm_epsilon", 1e-5),
                context_length=f.count("context_length"), learned_positions=True,
                rotary_fraction=0.0, mlp_activation="gelu_tanh",
                attention_kinds=("global",) * sizes["num_layers"])


def _neox_gguf(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
    # No activation is named: Pythia's exact GELU (llama.cpp itself runs the tanh one here).
    rotary, head_dim = f.count("rope.dimension_count"), sizes["head_dim"]
    if not 0 < rotary <= head_dim or rotary % 2:
        raise ValueError(f"{f.source}: rope.dimension_count {rotary} must be even and within "
                         f"the head dimension {head_dim}")
    base = f.number("rope.freq_base", 10_000.0)
    return dict(norm_eps=f.number("attention.layer_norm_epsilon", 1e-5),
                context_length=f.count("context_length", 2048), global_rope_base=base,
                local_rope_base=base, rotary_fraction=rotary / head_dim, mlp_activation="gelu",
                parallel_residual=f.flag("use_parallel_residual", True),
                attention_kinds=("global",) * sizes["num_layers"])


FAMILIES = (
    Family("gpt2", ("gpt2",), ("gpt2",), _SHARED, _gpt2, _gpt2_gguf, hf_sizes=_gpt2_sizes,
           hf_layout=_GPT2_LAYOUT, gguf_layout=_GGUF_LAYOUT,
           hf_ignored=lambda name: bool(_BUFFERS.search(name))),
    Family("gpt_neox", ("gpt_neox",), ("gptneox",), _SHARED, _neox, _neox_gguf,
           hf_layout=_NEOX_LAYOUT, gguf_layout=_GGUF_LAYOUT,
           hf_ignored=lambda name: bool(_BUFFERS.search(name)),
           hf_in_memory={"lm_head.weight": "embed_out.weight"}),
)
