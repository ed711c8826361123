"""The parameter schema: every leaf of `Transformer` with its logical axes and its name and
layout in each storage format. Loaders, savers, sharding, layout checks and preset detection
are derived from `PARAMS`; a new leaf or a new format is one entry or one column here.

Formats:
- Kaggle (the official Flax/orbax checkpoints): `{key: {leaf: array}}`; q/k/v are stacked in
  `qkv_einsum` (multi-head) or `kv_einsum` (grouped), gate and up in `gating_einsum`.
- Hugging Face and GGUF store PyTorch-style `[out, in]` matrices, q/k/v/o flattened over heads
  (`Storage`); GGUF (llama.cpp) also stores every norm as `1 + scale`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from ..core.config import GemmaConfig

LogicalAxes = tuple[str | None, ...]


class Storage(enum.Enum):
    """How Hugging Face and GGUF hold a leaf, relative to our layout."""

    SAME = "same"
    QKV = "qkv"  # ours [heads, embed, head_dim]; theirs [heads * head_dim, embed]
    OUT = "out"  # ours [heads, head_dim, embed]; theirs [embed, heads * head_dim]
    GATE_UP = "gate_up"  # ours [2, embed, mlp]; theirs gate and up, each [mlp, embed]
    TRANSPOSED = "transposed"  # ours [mlp, embed]; theirs [embed, mlp]
    BIAS = "bias"  # ours [heads, head_dim]; theirs [heads * head_dim]


@dataclasses.dataclass(frozen=True)
class KaggleSlot:
    """Where a leaf lives in a Kaggle checkpoint: `key/leaf`, or part `part` of the `parts`
    leaves stacked along a new first axis there."""

    key: str
    leaf: str
    part: int | None = None
    parts: int = 1


@dataclasses.dataclass(frozen=True)
class Param:
    """One leaf (per layer where `path` holds `{i}`) and how each format stores it."""

    path: str
    axes: LogicalAxes
    shape: Callable[[GemmaConfig], tuple[int, ...]]
    kaggle: Callable[[GemmaConfig], KaggleSlot]
    hf: Callable[[GemmaConfig], tuple[str, ...]]
    gguf: tuple[str, ...]
    storage: Storage = Storage.SAME
    # A norm's scale: GGUF stores the multiplier, `config.norm_offset + scale` (llama.cpp
    # adds 1 to every Gemma norm; other families store the multiplier in every format).
    is_norm: bool = False
    present: Callable[[GemmaConfig], bool] = lambda c: True

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.path


def _norm(path: str, kaggle: str, hf: str | Callable[[GemmaConfig], str], gguf: str,
          present: Callable[[GemmaConfig], bool] = lambda c: True,
          axes: LogicalAxes = ("embed",)) -> Param:
    size = (lambda c: (c.head_dim,)) if axes == ("head_dim",) else (lambda c: (c.embed_dim,))
    return Param(
        path=path, axes=axes, shape=size, kaggle=lambda c: KaggleSlot(kaggle, "scale"),
        hf=lambda c: (hf(c) if callable(hf) else hf,), gguf=(gguf,), is_norm=True,
        present=present,
    )


def _norm_bias(path: str, kaggle: str, hf: str, gguf: str) -> Param:
    """A LayerNorm's bias (GPT-2, GPT-NeoX), beside its scale."""
    return Param(path=path, axes=("embed",), shape=lambda c: (c.embed_dim,),
                 kaggle=lambda c: KaggleSlot(kaggle, "bias"), hf=lambda c: (hf,), gguf=(gguf,),
                 present=lambda c: c.norm_kind == "layer")


def _vector(path: str, axis: str, size: Callable[[GemmaConfig], int], kaggle: str, hf: str,
            gguf: str, present: Callable[[GemmaConfig], bool]) -> Param:
    """A bias vector stored as it is in every format."""
    return Param(path, (axis,), lambda c: (size(c),), lambda c: KaggleSlot(kaggle, "b"),
                 lambda c: (hf,), (gguf,), present=present)


def _qkv(which: int) -> Callable[[GemmaConfig], KaggleSlot]:
    def slot(c: GemmaConfig) -> KaggleSlot:
        if c.num_kv_heads == c.num_heads:
            return KaggleSlot("transformer/layer_{i}/attn/qkv_einsum", "w", which, 3)
        if which == 0:
            return KaggleSlot("transformer/layer_{i}/attn/q_einsum", "w")
        return KaggleSlot("transformer/layer_{i}/attn/kv_einsum", "w", which - 1, 2)

    return slot


def _fixed(name: str) -> Callable[[GemmaConfig], tuple[str, ...]]:
    return lambda c: (name,)


_L = "transformer/layer_{i}"
_ATTN = "layers.{i}.self_attn"


def _bias(which: str, heads: str) -> Param:
    """A query, key or value bias (Qwen2). Kaggle's Gemma checkpoints have none: our own
    Kaggle-layout saves of such a model keep it beside the weight."""
    return Param(f"blocks.{{i}}.attn.b_{which}", (heads, "head_dim"),
                 lambda c: ((c.num_heads if heads == "heads" else c.num_kv_heads), c.head_dim),
                 lambda c: KaggleSlot(f"{_L}/attn/{which}_bias", "b"),
                 _fixed(f"{_ATTN}.{which}_proj.bias"), (f"blk.{{i}}.attn_{which}.bias",),
                 Storage.BIAS, present=lambda c: c.qkv_bias)

PARAMS: tuple[Param, ...] = (
    Param("embedder.embedding", ("vocab", "embed"), lambda c: (c.vocab_size, c.embed_dim),
          lambda c: KaggleSlot("transformer/embedder", "input_embedding"),
          _fixed("embed_tokens.weight"), ("token_embd.weight",)),
    Param("embedder.unembedding", ("vocab", "embed"), lambda c: (c.vocab_size, c.embed_dim),
          lambda c: KaggleSlot("transformer/unembedder", "output_embedding"),
          lambda c: ("lm_head.weight",), ("output.weight",),
          present=lambda c: not c.tie_embeddings),
    Param("embedder.positions", (None, "embed"), lambda c: (c.context_length, c.embed_dim),
          lambda c: KaggleSlot("transformer/embedder", "position_embedding"),
          lambda c: ("embed_positions.weight",), ("position_embd.weight",),
          present=lambda c: c.learned_positions),
    _norm("final_norm.scale", "transformer/final_norm", "norm.weight", "output_norm.weight"),
    _norm_bias("final_norm.bias", "transformer/final_norm", "norm.bias", "output_norm.bias"),
    _norm_bias("blocks.{i}.pre_attention_norm.bias", f"{_L}/pre_attention_norm",
               "layers.{i}.input_layernorm.bias", "blk.{i}.attn_norm.bias"),
    _norm_bias("blocks.{i}.pre_ffw_norm.bias", f"{_L}/pre_ffw_norm",
               "layers.{i}.post_attention_layernorm.bias", "blk.{i}.ffn_norm.bias"),
    _norm("blocks.{i}.pre_attention_norm.scale", f"{_L}/pre_attention_norm",
          "layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    # Gemma 1 calls its pre-MLP norm "post_attention_layernorm"; Gemma 2 and 3 use that name
    # for the norm after attention.
    _norm("blocks.{i}.pre_ffw_norm.scale", f"{_L}/pre_ffw_norm",
          lambda c: "layers.{i}." + ("pre_feedforward_layernorm" if c.use_post_norms
                                     else "post_attention_layernorm") + ".weight",
          "blk.{i}.ffn_norm.weight"),
    _norm("blocks.{i}.post_attention_norm.scale", f"{_L}/post_attention_norm",
          "layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight",
          present=lambda c: c.use_post_norms),
    _norm("blocks.{i}.post_ffw_norm.scale", f"{_L}/post_ffw_norm",
          "layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight",
          present=lambda c: c.use_post_norms),
    Param("blocks.{i}.attn.w_q", ("heads", "embed", "head_dim"),
          lambda c: (c.num_heads, c.embed_dim, c.head_dim), _qkv(0),
          _fixed(f"{_ATTN}.q_proj.weight"), ("blk.{i}.attn_q.weight",), Storage.QKV),
    Param("blocks.{i}.attn.w_k", ("kv_heads", "embed", "head_dim"),
          lambda c: (c.num_kv_heads, c.embed_dim, c.head_dim), _qkv(1),
          _fixed(f"{_ATTN}.k_proj.weight"), ("blk.{i}.attn_k.weight",), Storage.QKV),
    Param("blocks.{i}.attn.w_v", ("kv_heads", "embed", "head_dim"),
          lambda c: (c.num_kv_heads, c.embed_dim, c.head_dim), _qkv(2),
          _fixed(f"{_ATTN}.v_proj.weight"), ("blk.{i}.attn_v.weight",), Storage.QKV),
    Param("blocks.{i}.attn.w_o", ("heads", "head_dim", "embed"),
          lambda c: (c.num_heads, c.head_dim, c.embed_dim),
          lambda c: KaggleSlot(f"{_L}/attn/attn_vec_einsum", "w"),
          _fixed(f"{_ATTN}.o_proj.weight"), ("blk.{i}.attn_output.weight",), Storage.OUT),
    _bias("q", "heads"),
    _bias("k", "kv_heads"),
    _bias("v", "kv_heads"),
    _vector("blocks.{i}.attn.b_o", "embed", lambda c: c.embed_dim, f"{_L}/attn/o_bias",
            f"{_ATTN}.o_proj.bias", "blk.{i}.attn_output.bias", lambda c: c.attn_out_bias),
    _norm("blocks.{i}.attn.query_norm.scale", f"{_L}/attn/_query_norm",
          f"{_ATTN}.q_norm.weight", "blk.{i}.attn_q_norm.weight",
          present=lambda c: c.use_qk_norm, axes=("head_dim",)),
    _norm("blocks.{i}.attn.key_norm.scale", f"{_L}/attn/_key_norm",
          f"{_ATTN}.k_norm.weight", "blk.{i}.attn_k_norm.weight",
          present=lambda c: c.use_qk_norm, axes=("head_dim",)),
    Param("blocks.{i}.mlp.w_gating", (None, "embed", "mlp"),
          lambda c: (2 if c.mlp_gated else 1, c.embed_dim, c.hidden_dim),
          lambda c: KaggleSlot(f"{_L}/mlp/gating_einsum", "w"),
          lambda c: ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
          ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"), Storage.GATE_UP),
    Param("blocks.{i}.mlp.w_linear", ("mlp", "embed"), lambda c: (c.hidden_dim, c.embed_dim),
          lambda c: KaggleSlot(f"{_L}/mlp/linear", "w"),
          _fixed("layers.{i}.mlp.down_proj.weight"), ("blk.{i}.ffn_down.weight",),
          Storage.TRANSPOSED),
    _vector("blocks.{i}.mlp.b_in", "mlp", lambda c: c.hidden_dim, f"{_L}/mlp/in_bias",
            "layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias", lambda c: c.mlp_bias),
    _vector("blocks.{i}.mlp.b_out", "embed", lambda c: c.embed_dim, f"{_L}/mlp/out_bias",
            "layers.{i}.mlp.down_proj.bias", "blk.{i}.ffn_down.bias", lambda c: c.mlp_bias),
)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One concrete leaf of a model of some config: `param` at layer `layer`."""

    param: Param
    layer: int | None
    config: GemmaConfig

    def _fill(self, name: str) -> str:
        return name if self.layer is None else name.replace("{i}", str(self.layer))

    @property
    def path(self) -> str:
        return self._fill(self.param.path)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.param.shape(self.config)

    @property
    def kaggle(self) -> KaggleSlot:
        slot = self.param.kaggle(self.config)
        return dataclasses.replace(slot, key=self._fill(slot.key))

    def stored(self, names: str) -> Any:
        """The family's own layout of this leaf in Hugging Face (`names="hf"`) or GGUF
        (`"gguf"`) files (`families.Stored`), or None where the schema's default holds."""
        from .families import FAMILIES

        family = FAMILIES.get(self.config.architecture)
        if family is None:
            return None
        return (family.hf_layout if names == "hf" else family.gguf_layout).get(self.param.path)

    @property
    def hf(self) -> tuple[str, ...]:
        stored = self.stored("hf")
        names = stored.names if stored is not None else self.param.hf(self.config)
        return tuple(self._fill(n) for n in names)

    @property
    def gguf(self) -> tuple[str, ...]:
        stored = self.stored("gguf")
        return tuple(self._fill(n) for n in (stored.names if stored is not None
                                             else self.param.gguf))


def leaves(config: GemmaConfig) -> list[Leaf]:
    """Every leaf a model of `config` has, in a fixed order."""
    out = []
    for param in PARAMS:
        if not param.present(config):
            continue
        layers = range(config.num_layers) if param.per_layer else [None]
        out += [Leaf(param, i, config) for i in layers]
    return out


_AXES = {re.sub(r"\{i\}", "", p.path): p.axes for p in PARAMS}


def logical_axes(path: str, ndim: int) -> LogicalAxes:
    """Logical axis names of the leaf at `path` (e.g. `blocks.0.attn.w_q`); leaves not in the
    schema, such as intervention masks, get no names and so stay replicated."""
    axes = _AXES.get(re.sub(r"\.\d+\.", "..", path))
    return axes if axes is not None and len(axes) == ndim else (None,) * ndim


def from_storage(
    leaf: Leaf, stored: list[np.ndarray], names: tuple[str, ...],
    check: Callable[[str, Any, tuple[int, ...]], Any], *, hf: bool = True,
) -> np.ndarray:
    """Our array from the Hugging Face / GGUF tensors `stored`, named `names`;
    `check(name, array, shape)` reshapes a flattened tensor or raises naming it."""
    c, storage = leaf.config, leaf.param.storage
    heads, d, h = leaf.shape[0], c.embed_dim, c.head_dim
    family_layout = leaf.stored("hf" if hf else "gguf")
    if family_layout is not None:
        return family_layout.to_ours(stored, c)
    if storage is Storage.QKV:
        return check(names[0], stored[0], (heads, h, d)).transpose(0, 2, 1)
    if storage is Storage.OUT:
        return check(names[0], stored[0], (d, heads, h)).transpose(1, 2, 0)
    if storage is Storage.GATE_UP:
        return np.stack([stored[0].T, stored[1].T])
    if storage is Storage.TRANSPOSED:
        return stored[0].T
    if storage is Storage.BIAS:
        return check(names[0], stored[0], (heads, h))
    return stored[0]


def stored_shapes(leaf: Leaf, *, hf: bool = True) -> list[tuple[int, ...]]:
    """The shapes Hugging Face (`hf`) or GGUF stores a leaf's tensor(s) in (`[out, in]`
    matrices): what `from_storage` turns into the leaf."""
    c, shape, storage = leaf.config, leaf.shape, leaf.param.storage
    family_layout = leaf.stored("hf" if hf else "gguf")
    if family_layout is not None:
        return list(family_layout.shapes(c))
    if storage is Storage.QKV:
        return [(shape[0] * c.head_dim, c.embed_dim)]
    if storage is Storage.OUT:
        return [(c.embed_dim, shape[0] * c.head_dim)]
    if storage is Storage.GATE_UP:
        return [(c.hidden_dim, c.embed_dim)] * 2
    if storage is Storage.TRANSPOSED:
        return [shape[::-1]]
    if storage is Storage.BIAS:
        return [(shape[0] * shape[1],)]
    return [shape]


def arrays_from_tensors(
    config: GemmaConfig,
    get: Callable[[str], np.ndarray],
    *,
    names: str,
    check: Callable[[str, Any, tuple], Any],
    description: str | None = None,
) -> dict[str, np.ndarray]:
    """Our `{path: array}` from a Hugging Face (`names="hf"`) or GGUF (`names="gguf"`) source
    that `get(name)` reads one tensor from; `description` labels a progress bar (shown on a
    terminal)."""
    from ..core.runtime import progress

    out = {}
    every = leaves(config)
    for leaf in every if description is None else progress(every, description, unit="leaf"):
        tensor_names = leaf.hf if names == "hf" else leaf.gguf
        stored = [get(n) for n in tensor_names]
        if names == "gguf" and leaf.param.is_norm and config.norm_offset:
            stored = [s - np.float32(config.norm_offset) for s in stored]
        out[leaf.path] = from_storage(leaf, stored, tensor_names, check, hf=names == "hf")
    return out


def _listed(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def match_tensors(
    config: GemmaConfig,
    stored: Collection[str],
    *,
    names: str,
    source: str,
    prefixes: tuple[str, ...] = ("",),
    ignored: Callable[[str], bool] = lambda name: False,
) -> dict[str, str]:
    """`{schema name: stored name}` for every tensor a model of `config` reads from a Hugging
    Face (`names="hf"`) or GGUF (`names="gguf"`) source holding the tensors `stored`, each
    found under exactly one of `prefixes`. Every stored tensor must be used once: a missing
    tensor, one stored under two prefixes, or a stored tensor no leaf reads (a layer the config
    does not declare, say) is a ValueError naming them, raised before any tensor is read.
    `ignored(name)` marks stored tensors that are not the text model's (a vision tower)."""
    found, missing, twice = {}, [], []
    for leaf in leaves(config):
        for name in (leaf.hf if names == "hf" else leaf.gguf):
            hits = [p + name for p in prefixes if p + name in stored]
            if not hits:
                missing.append(name)
            elif len(hits) > 1:
                twice.append(" and ".join(hits))
            else:
                found[name] = hits[0]
    if missing:
        raise ValueError(f"{source}: tensor(s) {_listed(missing)} of {config.name} "
                         f"({config.num_layers} layers) are missing")
    if twice:
        raise ValueError(f"{source}: tensor(s) stored twice under different prefixes: "
                         f"{_listed(twice)}")
    used = set(found.values())
    unused = sorted((n for n in stored if n not in used and not ignored(n)), key=_natural)
    if unused:
        raise ValueError(f"{source}: tensor(s) {_listed(unused)} are not read by "
                         f"{config.name} ({config.num_layers} layers): the config and the "
                         f"weights disagree")
    return found


def _natural(name: str) -> list[Any]:
    """Sort key that puts layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
