"""Hugging Face transformers Gemma / Gemma2 / Gemma3 weights and configs, converted to ours."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import DTypeLike

from . import params
from .config import GemmaConfig, family_config
from .modules import Transformer
from .weights import model_from_arrays


def config_from_hf(hf_config: Any, name: str = "hf") -> GemmaConfig:
    """Our config from a transformers `GemmaConfig`, `Gemma2Config` or `Gemma3TextConfig`."""
    c = getattr(hf_config, "text_config", None) or hf_config
    families = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
    if c.model_type not in families:
        raise ValueError(f"unsupported Hugging Face model type {c.model_type!r}")
    family = families[c.model_type]
    # What the config says overrides the family's defaults (config.family_config).
    read: dict[str, Any] = dict(norm_eps=c.rms_norm_eps,
                                context_length=int(c.max_position_embeddings))
    layer_types = getattr(c, "layer_types", None)
    if family == "gemma":
        read.update(global_rope_base=_rope_theta(c))
    else:
        if layer_types is not None:
            read["attention_kinds"] = tuple(
                "local" if t == "sliding_attention" else "global" for t in layer_types)
        read.update(query_pre_attn_scalar=float(c.query_pre_attn_scalar),
                    sliding_window=c.sliding_window,
                    attn_logit_softcap=_opt_float(c.attn_logit_softcapping),
                    final_logit_softcap=_opt_float(c.final_logit_softcapping))
    if family == "gemma2":
        read.update(local_rope_base=_rope_theta(c), global_rope_base=_rope_theta(c))
    if family == "gemma3":
        global_base, local_base, scale = _gemma3_rope(c)
        read.update(local_rope_base=local_base, global_rope_base=global_base,
                    global_rope_scale=scale)
    return family_config(
        family, name=name, num_layers=c.num_hidden_layers, embed_dim=c.hidden_size,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, hidden_dim=c.intermediate_size, vocab_size=c.vocab_size, **read,
    )


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
    """Our `{path: array}` from a transformers state dict (torch tensors or numpy arrays);
    `params.PARAMS` names each tensor and its layout."""

    def get(name: str) -> np.ndarray:
        for prefix in ("model.", "model.language_model.", "language_model.model.", ""):
            if prefix + name in state_dict:
                t = state_dict[prefix + name]
                return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        raise KeyError(f"Hugging Face state dict has no {name!r}")

    return params.arrays_from_tensors(config, get, names="hf",
                                      check=lambda name, w, shape: w.reshape(shape))


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
