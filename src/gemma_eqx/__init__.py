"""Gemma 1, 2 and 3 as typed Equinox modules."""

from .config import PRESETS, GemmaConfig, get_preset
from .modules import (
    MLP,
    Attention,
    Block,
    Embedder,
    ForwardOutput,
    LayerCache,
    PatternHook,
    RMSNorm,
    Transformer,
    count_params,
)

__all__ = [
    "PRESETS", "GemmaConfig", "get_preset", "MLP", "Attention", "Block", "Embedder",
    "ForwardOutput", "LayerCache", "PatternHook", "RMSNorm", "Transformer", "count_params",
]
