"""Hugging Face transformers Gemma / Gemma2 / Gemma3 weights and configs, converted to ours."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import DTypeLike

from .config import GemmaConfig, gemma2_pattern, gemma3_pattern
from .modules import Transformer
from .weights import model_from_arrays


def config_from_hf(hf_config: Any, name: str = "hf") -> GemmaConfig:
    """Our config from a transformers `GemmaConfig`, `Gemma2Config` or `Gemma3TextConfig`."""
    c = getattr(hf_config, "text_config", None) or hf_config
    model_type = c.model_type
    layers = c.num_hidden_layers
    common = dict(
        name=name, num_layers=layers, embed_dim=c.hidden_size, num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_dim=c.intermediate_size,
        vocab_size=c.vocab_size, norm_eps=c.rms_norm_eps,
        context_length=int(c.max_position_embeddings),
    )
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        kinds = tuple("local" if t == "sliding_attention" else "global" for t in layer_types)
    if model_type == "gemma":
        return GemmaConfig(
            **common, attention_kinds=("global",) * layers, query_pre_attn_scalar=float(c.head_dim),
            global_rope_base=_rope_theta(c),
        )
    if model_type == "gemma2":
        return GemmaConfig(
            **common, attention_kinds=kinds if layer_types else gemma2_pattern(layers),
            query_pre_attn_scalar=float(c.query_pre_attn_scalar), sliding_window=c.sliding_window,
            local_rope_base=_rope_theta(c), global_rope_base=_rope_theta(c),
            attn_logit_softcap=_opt_float(c.attn_logit_softcapping),
            final_logit_softcap=_opt_float(c.final_logit_softcapping), use_post_norms=True,
        )
    if model_type == "gemma3_text":
        global_base, local_base, scale = _gemma3_rope(c)
        return GemmaConfig(
            **common, attention_kinds=kinds if layer_types else gemma3_pattern(layers),
            query_pre_attn_scalar=float(c.query_pre_attn_scalar), sliding_window=c.sliding_window,
            local_rope_base=local_base, global_rope_base=global_base, global_rope_scale=scale,
            attn_logit_softcap=_opt_float(c.attn_logit_softcapping),
            final_logit_softcap=_opt_float(c.final_logit_softcapping), use_qk_norm=True,
            use_post_norms=True, checkpoint_gating_transposed=True,
        )
    raise ValueError(f"unsupported Hugging Face model type {model_type!r}")


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


def _rope_theta(c: Any) -> float:
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(c, "rope_theta", 10_000.0))


def _gemma3_rope(c: Any) -> tuple[float, float, float]:
    """(global base, local base, global position scale) across transformers versions."""
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, Mapping) and "full_attention" in params:
        full, sliding = params["full_attention"], params["sliding_attention"]
        scale = full.get("factor", 1.0) if full.get("rope_type") == "linear" else 1.0
        return float(full["rope_theta"]), float(sliding["rope_theta"]), float(scale)
    scaling = getattr(c, "rope_scaling", None) or {}
    scale = scaling.get("factor", 1.0) if scaling.get("rope_type") == "linear" else 1.0
    return float(c.rope_theta), float(c.rope_local_base_freq), float(scale)


def arrays_from_hf(state_dict: Mapping[str, Any], config: GemmaConfig) -> dict[str, np.ndarray]:
    """Our `{path: array}` from a transformers state dict (torch tensors or numpy arrays)."""

    def get(name: str) -> np.ndarray:
        for prefix in ("model.", "model.language_model.", "language_model.model.", ""):
            if prefix + name in state_dict:
                t = state_dict[prefix + name]
                return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        raise KeyError(f"Hugging Face state dict has no {name!r}")

    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    out = {"embedder.embedding": get("embed_tokens.weight"), "final_norm.scale": get("norm.weight")}
    post = config.use_post_norms
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs, heads in (("w_q", "q", n), ("w_k", "k", k), ("w_v", "v", k)):
            w = get(f"{src}self_attn.{theirs}_proj.weight")  # [heads * head_dim, embed]
            out[f"{dst}attn.{ours}"] = w.reshape(heads, h, d).transpose(0, 2, 1)
        w_o = get(src + "self_attn.o_proj.weight")  # [embed, heads * head_dim]
        out[dst + "attn.w_o"] = w_o.reshape(d, n, h).transpose(1, 2, 0)
        if config.use_qk_norm:
            out[dst + "attn.query_norm.scale"] = get(src + "self_attn.q_norm.weight")
            out[dst + "attn.key_norm.scale"] = get(src + "self_attn.k_norm.weight")
        out[dst + "mlp.w_gating"] = np.stack(
            [get(src + "mlp.gate_proj.weight").T, get(src + "mlp.up_proj.weight").T]
        )
        out[dst + "mlp.w_linear"] = get(src + "mlp.down_proj.weight").T
        out[dst + "pre_attention_norm.scale"] = get(src + "input_layernorm.weight")
        if post:
            out[dst + "post_attention_norm.scale"] = get(src + "post_attention_layernorm.weight")
            out[dst + "pre_ffw_norm.scale"] = get(src + "pre_feedforward_layernorm.weight")
            out[dst + "post_ffw_norm.scale"] = get(src + "post_feedforward_layernorm.weight")
        else:  # Gemma 1 calls its pre-MLP norm "post_attention_layernorm".
            out[dst + "pre_ffw_norm.scale"] = get(src + "post_attention_layernorm.weight")
    return out


def from_hf(
    hf_model: Any,
    *,
    dtype: DTypeLike = jnp.float32,
    activation_dtype: DTypeLike | None = None,
    check_finite: bool = True,
) -> Transformer:
    """Our model with the weights of a transformers Gemma causal LM (any of the three); a
    weight holding NaN or infinity is refused by name unless `check_finite=False`."""
    config = config_from_hf(hf_model.config)
    arrays = arrays_from_hf(hf_model.state_dict(), config)
    arrays = {p: jnp.asarray(a, dtype) for p, a in arrays.items()}
    return model_from_arrays(
        config, arrays, activation_dtype=activation_dtype, source="Hugging Face model",
        check_finite=check_finite,
    )
