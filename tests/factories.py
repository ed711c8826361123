"""What the tests build: tiny configs (`tiny`, `shrink`, `tiny_config`), random models
(`random_model`, `varied_model`), a character tokenizer and tiny GGUF files."""

from __future__ import annotations

import functools
from pathlib import Path

import equinox as eqx
import gguf as gguf_pkg
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from gemma_eqx.core.config import GemmaConfig, gemma2_pattern, gemma3_pattern, get_preset
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.weights import abstract_model, leaf_paths, model_from_arrays

VOCAB, WINDOW = 128, 8


def tiny_config(family: str):
    """Tiny random configs of each generation, small enough to compile in a second or two."""
    shared = dict(
        embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=16, hidden_dim=64, vocab_size=VOCAB,
        query_pre_attn_scalar=16.0,
    )
    if family == "gemma1":
        return get_preset("gemma-2b").replace(
            name="tiny1", num_layers=2, attention_kinds=("global",) * 2, **shared
        )
    if family == "gemma2":
        return get_preset("gemma2-2b").replace(
            name="tiny2", num_layers=2, attention_kinds=("local", "global"),
            sliding_window=WINDOW, **shared,
        )
    return get_preset("gemma3-270m").replace(
        name="tiny3", num_layers=3, attention_kinds=("local", "local", "global"),
        sliding_window=WINDOW, **shared,
    )


def tiny(kinds: tuple[str, ...] = ("global", "global"), **changes) -> GemmaConfig:
    """A Gemma-shaped config small enough to compile in about a second; `kinds` sets the
    layers, `changes` any field."""
    fields = dict(
        name="tiny", num_layers=len(kinds), embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
        hidden_dim=48, vocab_size=61, attention_kinds=kinds, query_pre_attn_scalar=8.0,
        sliding_window=4 if "local" in kinds else None,
    )
    return GemmaConfig(**{**fields, **changes})


def shrink(preset: str, **changes) -> GemmaConfig:
    """A small config with the mechanics of `preset` (its name too unless changed); sizes
    divisible by 8 devices."""
    base = get_preset(preset)
    multi_head = base.num_kv_heads == base.num_heads
    layers = changes.pop("num_layers", 6 if "gemma3" in preset else 2)
    fields = dict(
        name=f"tiny-{preset}", num_layers=layers,
        attention_kinds=(base.attention_kinds * 10)[:layers], embed_dim=32, hidden_dim=64,
        head_dim=16, vocab_size=128, num_heads=8 if multi_head else 4,
        num_kv_heads=8 if multi_head else (1 if base.num_kv_heads == 1 else 2),
        sliding_window=4 if base.sliding_window else None,
    )
    return base.replace(**{**fields, **changes})


def random_arrays(config: GemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every leaf, norm scales included (they init to zero).

    Drawn with numpy: JAX would compile a kernel for every distinct leaf shape."""
    rng = np.random.RandomState(seed)
    arrays = {}
    for path, leaf in leaf_paths(abstract_model(config)).items():
        if path.endswith("scale"):
            std = 0.5
        elif path == "embedder.embedding":
            std = config.embed_dim**-0.5
        elif path.endswith("attn.w_o"):
            std = (config.num_heads * config.head_dim) ** -0.5
        else:  # w_q, w_k, w_v, w_gating, w_linear contract their second-to-last axis
            std = leaf.shape[-2] ** -0.5
        arrays[path] = (rng.randn(*leaf.shape) * std).astype(np.float32)
    return arrays


def random_model(
    config: GemmaConfig, seed: int = 0, dtype=jnp.float32, activation_dtype=None
) -> Transformer:
    """A model of `config` with `random_arrays` weights in `dtype`."""
    arrays = {p: jnp.asarray(a.astype(dtype)) for p, a in random_arrays(config, seed).items()}
    return model_from_arrays(config, arrays, activation_dtype=activation_dtype)


@functools.cache
def varied_model(family: str, seed: int = 0) -> Transformer:
    """Random weights, norms included. With the default init the residual stream is all
    embedding and greedy decoding repeats one token; a smaller embedding and random norm scales
    make the output vary (checked where it matters)."""
    model = Transformer(tiny_config(family), key=jax.random.key(seed))
    model = eqx.tree_at(lambda m: m.embedder.embedding, model, 0.3 * model.embedder.embedding)
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
    leaves = [
        x + jax.random.normal(k, x.shape, x.dtype) if x.ndim == 1 else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


class CharTokenizer:
    """Stand-in with the Tokenizer interface: one token per ASCII character, id
    `offset + ord(c)`."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def __init__(self, offset: int = 0):
        self.offset = offset

    def encode(self, text):
        return [self.offset + ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i - self.offset) for i in ids)

    def id_to_piece(self, i):
        return chr(i - self.offset) if i - self.offset >= 32 else f"<{i}>"

    def encode_batch(self, texts, *, add_bos=True, pad_side="left"):
        assert pad_side == "left"
        rows = [[self.bos_id] * add_bos + self.encode(t) for t in texts]
        s = max(map(len, rows))
        tokens = np.full((len(rows), s), self.pad_id, np.int32)
        mask = np.zeros((len(rows), s), bool)
        for i, r in enumerate(rows):
            tokens[i, s - len(r):], mask[i, s - len(r):] = r, True
        return jnp.asarray(tokens), jnp.asarray(mask)


# ---------------------------------------------------------------------------- tiny GGUF files


def gguf_config(arch: str) -> GemmaConfig:
    """Small, but with head_dim 256 (transformers' default query scale for Gemma 2 and 3 GGUFs,
    which carry none), six layers and a 4-token window so local and global layers differ."""
    layers = 6
    common = dict(
        name="tiny", num_layers=layers, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=256,
        hidden_dim=96, vocab_size=300, query_pre_attn_scalar=256.0,
    )
    if arch == "gemma":
        return GemmaConfig(**common, attention_kinds=("global",) * layers)
    if arch == "gemma2":
        return GemmaConfig(
            **common, attention_kinds=gemma2_pattern(layers), sliding_window=4,
            attn_logit_softcap=50.0, final_logit_softcap=30.0, use_post_norms=True,
        )
    return GemmaConfig(
        **common, attention_kinds=gemma3_pattern(layers), sliding_window=4,
        global_rope_base=1_000_000.0, use_qk_norm=True, use_post_norms=True,
    )


def _tiny_vocab(size: int, digits: bool = False) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-like vocabulary: specials, the 256 byte pieces, then letters (with
    `digits`, the ten digits first: what the induction study needs)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 3] + [6] * 256
    if digits:
        tokens += [str(d) for d in range(10)]
        types += [1] * 10
    letters = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    first = len(tokens)
    while len(tokens) < size:
        i = len(tokens) - first
        tokens.append(letters[i % len(letters)] * (1 + i // len(letters)))
        types.append(1)
    scores = [-1000.0] * 4 + [0.0] * 256 + [-float(i) for i in range(size - 260)]
    return tokens[:size], scores[:size], types[:size]


def _gguf_tensors(config: GemmaConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp's names and layouts for our arrays: norms hold 1 + scale, matrices [out, in]."""
    n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
    out = {"token_embd.weight": arrays["embedder.embedding"],
           "output_norm.weight": arrays["final_norm.scale"] + 1}
    norms = {"pre_attention_norm": "attn_norm", "pre_ffw_norm": "ffn_norm",
             "post_attention_norm": "post_attention_norm", "post_ffw_norm": "post_ffw_norm",
             "attn.query_norm": "attn_q_norm", "attn.key_norm": "attn_k_norm"}
    for i in range(config.num_layers):
        a = lambda p: arrays[f"blocks.{i}.{p}"]  # noqa: B023, E731
        b = f"blk.{i}."
        out[b + "attn_q.weight"] = a("attn.w_q").transpose(0, 2, 1).reshape(n * h, d)
        out[b + "attn_k.weight"] = a("attn.w_k").transpose(0, 2, 1).reshape(k * h, d)
        out[b + "attn_v.weight"] = a("attn.w_v").transpose(0, 2, 1).reshape(k * h, d)
        out[b + "attn_output.weight"] = a("attn.w_o").transpose(2, 0, 1).reshape(d, n * h)
        out[b + "ffn_gate.weight"] = a("mlp.w_gating")[0].T
        out[b + "ffn_up.weight"] = a("mlp.w_gating")[1].T
        out[b + "ffn_down.weight"] = a("mlp.w_linear").T
        for ours, theirs in norms.items():
            if f"blocks.{i}.{ours}.scale" in arrays:
                out[f"{b}{theirs}.weight"] = a(f"{ours}.scale") + 1
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def write_tiny_gguf(
    path: Path,
    config: GemmaConfig,
    arrays: dict[str, np.ndarray],
    *,
    arch: str,
    quantized: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
    vocab: bool = True,
    digits: bool = False,
    block_count: int | None = None,
    as_int32: tuple[str, ...] = (),
    metadata: dict | None = None,
) -> Path:
    """Our arrays written as llama.cpp would; tensors named in `quantized` as Q8_0. For
    hostile files: `block_count` overrides the layer count written, tensors in `as_int32` are
    stored as int32, and `metadata` replaces keys' values (a str as a string, a float as
    float32, an int as uint32)."""
    from gguf import GGUFValueType
    from gguf.gguf_writer import GGUFValue

    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(config.num_layers if block_count is None else block_count)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.embed_dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.global_rope_base)
    if config.sliding_window:
        w.add_sliding_window(config.sliding_window)
    if config.attn_logit_softcap:
        w.add_attn_logit_softcapping(config.attn_logit_softcap)
        w.add_final_logit_softcapping(config.final_logit_softcap)
    if vocab:
        tokens, scores, types = _tiny_vocab(config.vocab_size, digits)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
    for key, value in (metadata or {}).items():
        vtype = (GGUFValueType.STRING if isinstance(value, str) else
                 GGUFValueType.FLOAT32 if isinstance(value, float) else GGUFValueType.UINT32)
        w.kv_data[0][key] = GGUFValue(value, vtype)
    for name, x in _gguf_tensors(config, arrays).items():
        if name in drop:
            continue
        if name in as_int32:
            w.add_tensor(name, x.astype(np.int32))
        elif name in quantized:
            q = gguf_pkg.quants.quantize(x, GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_arrays(config: GemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random model's arrays for a GGUF file, norms included (they start at zero otherwise)."""
    model = Transformer(config, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in leaf_paths(model).items():
        x = np.asarray(leaf, np.float32)
        out[path] = rng.normal(0, 0.3, x.shape).astype(np.float32) if "norm" in path else x
    return out


# ------------------------------------------------------------- Hugging Face directories by hand


def hf_tensors(config: GemmaConfig, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our arrays under transformers' names and layouts (`[out, in]` matrices, q/k/v/o
    flattened over heads): the inverse of `params.from_storage`, for writing safetensors."""
    from gemma_eqx.model import params

    out = {}
    for leaf in params.leaves(config):
        a, storage = arrays[leaf.path], leaf.param.storage
        if storage is params.Storage.QKV:
            stored = [a.transpose(0, 2, 1).reshape(-1, config.embed_dim)]
        elif storage is params.Storage.OUT:
            stored = [a.transpose(2, 0, 1).reshape(config.embed_dim, -1)]
        elif storage is params.Storage.GATE_UP:
            stored = [a[0].T, a[1].T]
        elif storage is params.Storage.TRANSPOSED:
            stored = [a.T]
        else:
            stored = [a]
        for name, x in zip(leaf.hf, stored, strict=True):
            out["model." + name] = np.ascontiguousarray(x, np.float32)
    return out


def hf_config_json(config: GemmaConfig) -> dict:
    """A Gemma 3 `config.json` (transformers' field names) for a gemma3-family config."""
    return {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": config.num_layers, "hidden_size": config.embed_dim,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.hidden_dim,
        "vocab_size": config.vocab_size, "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.context_length,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "sliding_window": config.sliding_window,
        "layer_types": ["sliding_attention" if k == "local" else "full_attention"
                        for k in config.attention_kinds],
        "rope_theta": config.global_rope_base, "rope_local_base_freq": config.local_rope_base,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
    }


def write_hf_directory(directory: Path, config: GemmaConfig, arrays: dict[str, np.ndarray],
                       *, shards: int = 1, tokenizer: Path | None = None) -> Path:
    """A Hugging Face model directory as `save_pretrained` writes it, without transformers:
    `config.json` and one safetensors file, or `shards` files and an index."""
    import json

    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_json(config)))
    tensors = hf_tensors(config, arrays)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[k::shards]}
            save_file(part, str(directory / file))
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer is not None:
        import shutil

        shutil.copy(tokenizer, directory / "tokenizer.model")
    return directory


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with exactly this header (however wrong) and data section."""
    import json

    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def tiny_transcoder(model: Transformer, layer: int, seed: int, width: int = 24,
                    reads: str = "mlp_in"):
    """A random JumpReLU transcoder of `model`'s MLP at `layer` (`reads` -> mlp_out_normed)."""
    from interp.features import HookPoint, SparseDictionary

    rng = np.random.default_rng(seed)
    d = model.config.embed_dim
    a = {k: jnp.asarray(v, jnp.float32) for k, v in dict(
        w_enc=rng.normal(size=(d, width)) * 0.5, b_enc=rng.normal(size=width) * 0.1,
        w_dec=rng.normal(size=(width, d)) * 0.3, b_dec=rng.normal(size=d) * 0.1,
        threshold=np.abs(rng.normal(size=width)) * 0.3).items()}
    return SparseDictionary(a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"],
                            None, "jumprelu", None, HookPoint(reads, layer),
                            HookPoint("mlp_out_normed", layer), name=f"transcoder-{layer}")


def tiny_attribution_graph():
    """`(model, graph)`: the attribution graph of 9 random tokens through a tiny Gemma 3 (GQA,
    QK-norm, post-norms, local layers) with random transcoders at layers 0 and 2."""
    from interp.circuits import attribution_graph

    model = random_model(tiny_config("gemma3"))
    tokens = np.random.default_rng(0).integers(3, 100, 9)
    return model, attribution_graph(model, tokens, {0: tiny_transcoder(model, 0, 0),
                                                    2: tiny_transcoder(model, 2, 1)})
