"""Llama 1-3.2, Mistral, Qwen2/2.5 and Qwen3: pre-norm decoders with RMSNorm (the multiplier
stored as is), rotary positions, a SwiGLU MLP and no embedding scale. They differ in four
facts: biases on q/k/v (Qwen2), QK-norm (Qwen3), a sliding window (Mistral; Qwen when
enabled), and RoPE scaling (Llama 3.1's, or linear)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Family, FieldReader

_SHARED = dict(norm_offset=0.0, embed_scale=False, mlp_activation="silu")
_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def _rope(f: FieldReader) -> dict[str, Any]:
    """Base and scaling from `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (earlier files)."""
    p = f.nested("rope_parameters") or f.nested("rope_scaling")
    theta = p.number("rope_theta") if p is not None and p.has("rope_theta") else \
        f.number("rope_theta", 10_000.0)
    out: dict[str, Any] = dict(global_rope_base=theta, local_rope_base=theta)
    kind = "default" if p is None else p.text("rope_type", None) or p.text("type", "default")
    if kind == "linear":
        out["global_rope_scale"] = p.number("factor")
    elif kind == "llama3":
        out["rope_llama3"] = (p.number("factor"), p.number("low_freq_factor"),
                              p.number("high_freq_factor"),
                              p.count("original_max_position_embeddings"))
    elif kind != "default":
        raise ValueError(f"{f.source}: RoPE type {kind!r} is not supported (default, linear, "
                         f"llama3)")
    return out


def _layers(f: FieldReader, layers: int, windowed: bool) -> dict[str, Any]:
    """Which layers attend in a window: `layer_types` when the file lists them, else every
    layer when `windowed` (Mistral's window; Qwen's from `max_window_layers` on)."""
    window = f.count("sliding_window") if f.has("sliding_window") else None
    types = f.text("layer_types", None)
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or any(
                t not in _LAYER_TYPES for t in types):
            raise ValueError(f"{f.source}: field 'layer_types' must list {layers} entries, each "
                             f"one of {', '.join(_LAYER_TYPES)}; got {types!r}")
        kinds = tuple(_LAYER_TYPES[t] for t in types)
    elif windowed and window is not None:
        first = f.count("max_window_layers", 1) if f.has("max_window_layers") else 0
        kinds = tuple("local" if i >= first else "global" for i in range(layers))
    else:
        kinds = ("global",) * layers
    return dict(attention_kinds=kinds, sliding_window=window if "local" in kinds else None)


def _refuse(f: FieldReader) -> None:
    """What no declaration here covers, refused by name before any tensor is read."""
    act = f.text("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{f.source}: hidden_act {act!r} is not supported for this family "
                         f"(silu)")
    for name in ("attention_bias", "mlp_bias"):
        if f.flag(name, False):
            raise ValueError(f"{f.source}: {name} = true (biases on every projection) is not "
                             f"supported")


def _hf(windowed: Any) -> Any:
    def read(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
        _refuse(f)
        window_on = windowed(f) if callable(windowed) else windowed
        return dict(norm_eps=f.number("rms_norm_eps", 1e-6),
                    context_length=f.count("max_position_embeddings", 2048),
                    tie_embeddings=f.flag("tie_word_embeddings", False),
                    **_rope(f), **_layers(f, sizes["num_layers"], window_on))

    return read


def _gguf(f: FieldReader, sizes: Mapping[str, int]) -> dict[str, Any]:
    rotary = f.count("rope.dimension_count", sizes["head_dim"])
    if rotary != sizes["head_dim"]:
        raise ValueError(f"{f.source}: rope.dimension_count is {rotary}, not the head "
                         f"dimension {sizes['head_dim']}: partial rotary is not supported for "
                         f"this family")
    base = f.number("rope.freq_base", 10_000.0)
    out = dict(norm_eps=f.number("attention.layer_norm_rms_epsilon", 1e-6),
               context_length=f.count("context_length", 2048), global_rope_base=base,
               local_rope_base=base, attention_kinds=("global",) * sizes["num_layers"])
    if f.text("rope.scaling.type", "none") == "linear":
        out["global_rope_scale"] = f.number("rope.scaling.factor")
    window = f.count("attention.sliding_window") if f.has("attention.sliding_window") else None
    if window is not None:
        out.update(attention_kinds=("local",) * sizes["num_layers"], sliding_window=window)
    return out


FAMILIES = (
    Family("llama", ("llama",), ("llama",), _SHARED, _hf(False), _gguf,
           gguf_rotary_permuted=True),
    Family("mistral", ("mistral",), (), _SHARED, _hf(True), _gguf),
    Family("qwen2", ("qwen2",), ("qwen2",), {**_SHARED, "qkv_bias": True},
           _hf(lambda f: f.flag("use_sliding_window", False)), _gguf),
    Family("qwen3", ("qwen3",), ("qwen3",), {**_SHARED, "use_qk_norm": True},
           _hf(lambda f: f.flag("use_sliding_window", False)), _gguf),
)
