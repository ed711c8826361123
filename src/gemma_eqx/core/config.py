"""Architecture hyperparameters and the named presets of every Gemma text model."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

AttentionKind = Literal["global", "local"]
MLPActivation = Literal["gelu_tanh", "gelu", "silu"]
NormKind = Literal["rms", "layer"]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Static description of one Gemma architecture (hashable, so usable as a static field)."""

    name: str
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    attention_kinds: tuple[AttentionKind, ...]
    query_pre_attn_scalar: float
    sliding_window: int | None = None
    local_rope_base: float = 10_000.0
    global_rope_base: float = 10_000.0
    global_rope_scale: float = 1.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_qk_norm: bool = False
    use_post_norms: bool = False
    norm_eps: float = 1e-6
    context_length: int = 8192  # the longest sequence the model was trained for
    # What sets other families apart (gemma_eqx.model.families declares each); the defaults
    # are Gemma's. The family whose declaration built this config:
    architecture: str = "gemma"
    norm_offset: float = 1.0  # RMSNorm multiplies by (norm_offset + scale): Gemma 1, Llama 0
    embed_scale: bool = True  # token embeddings multiplied by sqrt(embed_dim) on the way in
    tie_embeddings: bool = True  # the unembedding is the embedding (else its own leaf)
    mlp_activation: MLPActivation = "gelu_tanh"  # of the gated MLP's gate
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    # Llama 3.1's RoPE frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_context); None = none (a linear scale is global_rope_scale).
    rope_llama3: tuple[float, float, float, int] | None = None
    norm_kind: NormKind = "rms"  # "layer": LayerNorm with a bias (GPT-2, GPT-NeoX)
    learned_positions: bool = False  # a [context, embed] table added to the embedding (GPT-2)
    rotary_fraction: float = 1.0  # share of each head's dims RoPE rotates (NeoX 0.25; 0: none)
    mlp_gated: bool = True  # gate * up (GeGLU, SwiGLU); else act(x W_in + b_in) (GPT-2, NeoX)
    mlp_bias: bool = False  # biases on the MLP's input and output projections
    attn_out_bias: bool = False  # a bias on the attention's output projection
    parallel_residual: bool = False  # attention and MLP both read the block's input (NeoX)

    def __post_init__(self):
        # Types first: a string or a bool where a size belongs would fail far from here, or
        # not at all (True is 1).
        for name in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
                     "hidden_dim", "vocab_size", "context_length"):
            _positive_int(self, name)
        if self.sliding_window is not None:
            _positive_int(self, "sliding_window")
        for name in ("query_pre_attn_scalar", "local_rope_base", "global_rope_base",
                     "global_rope_scale", "norm_eps"):
            _positive_number(self, name)
        for name in ("attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None:
                _positive_number(self, name)
        if isinstance(self.norm_offset, bool) or not isinstance(self.norm_offset, int | float) \
                or self.norm_offset not in (0, 1):
            raise ValueError(f"config {self.name!r}: norm_offset must be 0 or 1; got "
                             f"{self.norm_offset!r}")
        if self.mlp_activation not in ("gelu_tanh", "gelu", "silu"):
            raise ValueError(f"config {self.name!r}: mlp_activation must be 'gelu_tanh', "
                             f"'gelu' or 'silu'; got {self.mlp_activation!r}")
        if self.norm_kind not in ("rms", "layer"):
            raise ValueError(f"config {self.name!r}: norm_kind must be 'rms' or 'layer'; got "
                             f"{self.norm_kind!r}")
        fraction = self.rotary_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
                or not 0 <= fraction <= 1 or int(self.head_dim * fraction) % 2:
            raise ValueError(f"config {self.name!r}: rotary_fraction must lie in [0, 1] and "
                             f"rotate an even number of the {self.head_dim} head dims; got "
                             f"{fraction!r}")
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"config {self.name!r}: architecture must be a family name; got "
                             f"{self.architecture!r}")
        if self.rope_llama3 is not None:
            if not isinstance(self.rope_llama3, tuple) or len(self.rope_llama3) != 4 or any(
                    isinstance(v, bool) or not isinstance(v, int | float)
                    or not math.isfinite(v) or v <= 0 for v in self.rope_llama3) \
                    or self.rope_llama3[1] >= self.rope_llama3[2]:
                raise ValueError(f"config {self.name!r}: rope_llama3 must be (factor, "
                                 f"low_freq_factor < high_freq_factor, original_context), "
                                 f"all positive; got {self.rope_llama3!r}")
        for name in ("use_qk_norm", "use_post_norms", "embed_scale", "tie_embeddings",
                     "qkv_bias", "learned_positions", "mlp_gated", "mlp_bias", "attn_out_bias",
                     "parallel_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config {self.name!r}: {name} must be True or False; got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.attention_kinds, tuple) or any(
                k not in ("global", "local") for k in self.attention_kinds):
            raise ValueError(f"config {self.name!r}: attention_kinds must be a tuple of "
                             f"'global' and 'local'; got {self.attention_kinds!r}")
        if len(self.attention_kinds) != self.num_layers:
            raise ValueError(
                f"config {self.name!r}: attention_kinds has {len(self.attention_kinds)} entries "
                f"for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if "local" in self.attention_kinds and not self.sliding_window:
            raise ValueError(f"config {self.name!r}: local layers need a sliding_window")

    @property
    def query_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates (the first ones)."""
        return int(self.head_dim * self.rotary_fraction)

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)


def _positive_int(config: GemmaConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config {config.name!r}: {name} must be a positive integer; got "
                         f"{value!r} ({type(value).__name__})")


def _positive_number(config: GemmaConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config {config.name!r}: {name} must be a positive number; got "
                         f"{value!r} ({type(value).__name__})")


def gemma2_pattern(num_layers: int) -> tuple[AttentionKind, ...]:
    """Gemma 2: local and global alternate, starting with local at layer 0."""
    return tuple("local" if i % 2 == 0 else "global" for i in range(num_layers))


def gemma3_pattern(num_layers: int) -> tuple[AttentionKind, ...]:
    """Gemma 3: five local layers, then one global (layers 5, 11, 17, ... are global)."""
    return tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(num_layers))


Family = Literal["gemma", "gemma2", "gemma3"]


def family_config(
    family: Family,
    *,
    name: str,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_dim: int,
    vocab_size: int,
    **overrides,
) -> GemmaConfig:
    """A config with the sizes given and the defaults of its generation (the one place they
    are written): layer pattern, window, RoPE bases, soft-caps, norms, context. `overrides`
    replace any default; presets and the GGUF and Hugging Face readers all build on this."""
    defaults: dict = dict(query_pre_attn_scalar=float(head_dim))
    if family == "gemma":
        defaults.update(attention_kinds=("global",) * num_layers)
    elif family == "gemma2":
        defaults.update(attention_kinds=gemma2_pattern(num_layers), sliding_window=4096,
                        attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True)
    elif family == "gemma3":
        defaults.update(attention_kinds=gemma3_pattern(num_layers), sliding_window=1024,
                        local_rope_base=10_000.0, global_rope_base=1_000_000.0,
                        use_qk_norm=True, use_post_norms=True, context_length=131_072)
    else:
        raise ValueError(f"unknown Gemma family {family!r}; expected gemma, gemma2 or gemma3")
    return GemmaConfig(
        name=name, num_layers=num_layers, embed_dim=embed_dim, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, hidden_dim=hidden_dim,
        vocab_size=vocab_size, **{**defaults, **overrides},
    )


def _gemma1(name, layers, d, n, k, f) -> GemmaConfig:
    return family_config("gemma", name=name, num_layers=layers, embed_dim=d, num_heads=n,
                         num_kv_heads=k, head_dim=256, hidden_dim=f, vocab_size=256_128)


def _gemma2(name, layers, d, n, k, h, f, scalar) -> GemmaConfig:
    return family_config("gemma2", name=name, num_layers=layers, embed_dim=d, num_heads=n,
                         num_kv_heads=k, head_dim=h, hidden_dim=f, vocab_size=256_128,
                         query_pre_attn_scalar=float(scalar))


def _gemma3(name, layers, d, n, k, h, f, scalar, window, rope_scale, context) -> GemmaConfig:
    return family_config("gemma3", name=name, num_layers=layers, embed_dim=d, num_heads=n,
                         num_kv_heads=k, head_dim=h, hidden_dim=f, vocab_size=262_144,
                         query_pre_attn_scalar=float(scalar), sliding_window=window,
                         global_rope_scale=float(rope_scale), context_length=context)


PRESETS: dict[str, GemmaConfig] = {
    c.name: c
    for c in [
        _gemma1("gemma-2b", 18, 2048, 8, 1, 16_384),
        _gemma1("gemma-7b", 28, 3072, 16, 16, 24_576),
        _gemma2("gemma2-2b", 26, 2304, 8, 4, 256, 9216, 256),
        _gemma2("gemma2-9b", 42, 3584, 16, 8, 256, 14_336, 256),
        _gemma2("gemma2-27b", 46, 4608, 32, 16, 128, 36_864, 4608 // 32),
        _gemma3("gemma3-270m", 18, 640, 4, 1, 256, 2048, 256, 512, 1.0, 32_768),
        _gemma3("gemma3-1b", 26, 1152, 4, 1, 256, 6912, 256, 512, 1.0, 32_768),
        _gemma3("gemma3-4b", 34, 2560, 8, 4, 256, 10_240, 256, 1024, 8.0, 131_072),
        _gemma3("gemma3-12b", 48, 3840, 16, 8, 256, 15_360, 256, 1024, 8.0, 131_072),
        _gemma3("gemma3-27b", 62, 5376, 32, 16, 128, 21_504, 5376 // 32, 1024, 8.0, 131_072),
    ]
}


def get_preset(name: str) -> GemmaConfig:
    """The named preset; raises a ValueError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown Gemma preset {name!r}; known presets: {', '.join(PRESETS)}"
        ) from None
