"""Gemma 1, 2 and 3 as typed Equinox modules."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, GemmaConfig, get_preset
from .generate import generate, generate_text, init_cache
from .gguf import load_gguf
from .modules import (
    MLP,
    Attention,
    Block,
    Embedder,
    ForwardOutput,
    LayerCache,
    RMSNorm,
    Transformer,
    count_params,
)
from .pretrained import from_pretrained
from .sharding import DEFAULT_RULES, LAST_AXIS_RULES, ShardingRules, default_mesh, shard_model
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_RULES", "LAST_AXIS_RULES", "MLP", "PRESETS", "Attention", "Block", "Embedder",
    "ForwardOutput", "GemmaConfig", "LayerCache", "RMSNorm", "ShardingRules",
    "Tokenizer", "Transformer", "count_params", "default_mesh", "from_pretrained", "generate",
    "generate_text", "get_preset", "init_cache", "load_checkpoint", "load_gguf",
    "save_checkpoint", "shard_model",
]
