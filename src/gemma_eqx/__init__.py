"""Gemma 1, 2 and 3 as typed Equinox modules.

The package in four layers, each importing only those before it: `core` (config, checks,
atomic writes, the process runtime), `model` (modules, sites, the parameter schema,
generation), `parallel` (sharding, throughput) and `formats` (Kaggle, GGUF, Hugging Face,
tokenizer, downloads, `from_pretrained`); `cli` is the `gemma-eqx` command. The names below
are the public API; the flat module paths of 0.1 (`gemma_eqx.checkpoint`, ...) still import.
"""

from . import _aliases
from .core.config import PRESETS, GemmaConfig, get_preset
from .formats.gguf import load_gguf
from .formats.kaggle import load_checkpoint, save_checkpoint
from .formats.pretrained import from_pretrained
from .formats.tokenizer import Tokenizer
from .model.generate import generate, generate_text, init_cache
from .model.modules import (
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
from .parallel.sharding import (
    DEFAULT_RULES,
    LAST_AXIS_RULES,
    ShardingRules,
    default_mesh,
    shard_model,
)

__all__ = [
    "DEFAULT_RULES", "LAST_AXIS_RULES", "MLP", "PRESETS", "Attention", "Block", "Embedder",
    "ForwardOutput", "GemmaConfig", "LayerCache", "RMSNorm", "ShardingRules",
    "Tokenizer", "Transformer", "count_params", "default_mesh", "from_pretrained", "generate",
    "generate_text", "get_preset", "init_cache", "load_checkpoint", "load_gguf",
    "save_checkpoint", "shard_model",
]

_aliases.install()
