"""Llama, Mistral, Qwen2 and Qwen3 against transformers, on tiny random models of each family
made by transformers' own config and model classes (fixed seed, float32, eager attention).

For every case: the config we read, the logits, the sites transformers exposes (the residual
stream entering each block and after the last, every attention pattern, every MLP output),
a 16-token greedy generation, and the same model read back from `save_pretrained`'s
directory without torch. Each case is sized so that its family's feature acts (a window
shorter than the sequence, RoPE scaling with frequencies on both sides of its thresholds,
biases and norm scales redrawn at random), and `test_features_are_exercised` switches each
off to show the logits move.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemma_eqx.formats.hf import config_from_hf, from_hf, load_hf_directory  # noqa: E402
from gemma_eqx.model.generate import generate  # noqa: E402
from gemma_eqx.model.weights import leaf_paths, model_from_arrays  # noqa: E402
from interp import capture  # noqa: E402

VOCAB, SEQ, WINDOW, NEW = 101, 14, 5, 16
# float32 on both sides, the same operations in a different order: measured differences are
# below 2e-6 on logits of size ~5; the issue asks for 1e-5.
TOL = 1e-5

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              head_dim=16, num_hidden_layers=3, num_key_value_heads=2,
              attn_implementation="eager", max_position_embeddings=256)
# Llama 3.1's scaling with an original context of 16 positions: at head_dim 16 and base 1e4
# the wavelengths (6 to 2e4 positions) fall below, between and above its two thresholds.
LLAMA3 = dict(rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)

# name: (config class, model class, overrides, what we must read, changes that must matter)
CASES = {
    "llama-untied": (
        "LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False),
        dict(architecture="llama", tie_embeddings=False, norm_offset=0.0),
        [dict(global_rope_base=500.0), dict(mlp_activation="gelu_tanh")],
    ),
    "llama3.1-rope-tied": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_parameters=LLAMA3),
        dict(tie_embeddings=True, rope_llama3=(8.0, 1.0, 4.0, 16)),
        [dict(rope_llama3=None)],
    ),
    "llama-linear-rope": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=4.0)),
        dict(global_rope_scale=4.0),
        [dict(global_rope_scale=1.0)],
    ),
    "mistral-window": (
        "MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW),
        dict(architecture="mistral", sliding_window=WINDOW, attention_kinds=("local",) * 3),
        [dict(attention_kinds=("global",) * 3, sliding_window=None)],
    ),
    "qwen2-biases": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False),
        dict(architecture="qwen2", qkv_bias=True),
        [],  # the biases are leaves: `test_biases_and_norms_act` zeroes them
    ),
    "qwen3-qk-norm": (
        "Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True),
        dict(architecture="qwen3", use_qk_norm=True, qkv_bias=False),
        [dict(use_qk_norm=False)],
    ),
    # GPT-2 names its sizes its own way; n_positions 256 sets the learned table.
    "gpt2": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=64, n_head=4, n_layer=3, n_inner=96, n_positions=256,
             activation_function="gelu_new"),
        dict(architecture="gpt2", norm_kind="layer", learned_positions=True,
             rotary_fraction=0.0, mlp_gated=False, attn_out_bias=True, num_kv_heads=4,
             mlp_activation="gelu_tanh", tie_embeddings=True),
        [dict(parallel_residual=True)],
    ),
    "gpt-neox": (
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(num_key_value_heads=4, hidden_act="gelu", tie_word_embeddings=False,
             rope_parameters=dict(rope_type="default", rope_theta=10_000.0,
                                  partial_rotary_factor=0.25)),
        dict(architecture="gpt_neox", norm_kind="layer", parallel_residual=True,
             rotary_fraction=0.25, mlp_activation="gelu", tie_embeddings=False),
        [dict(parallel_residual=False), dict(rotary_fraction=1.0)],
    ),
}
GPT = ("gpt2", "gpt-neox")


ROPE_VARIANTS = ("llama3.1-rope-tied", "llama-linear-rope")


def _randomise(hf_model) -> None:
    """Redraw every parameter: norm scales ~ 1 + N(0, 0.5^2) (a multiplier near one), biases
    ~ N(0, 0.1^2), matrices ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.ndim == 1:
                norm = "norm" in name or ".ln_" in name
                base = 1.0 if norm and name.endswith("weight") else 0.0
                # A bias writes the same direction at every position: large, it would
                # drown the tokens and make greedy decoding repeat one token.
                std = 0.1 if name.endswith("bias") else 0.5
                p.copy_(base + torch.randn(p.shape, generator=gen) * std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)


def _hf_config(name: str):
    config_cls, _, overrides, _, _ = CASES[name]
    common = dict(vocab_size=VOCAB, attn_implementation="eager") if name == "gpt2" else COMMON
    return getattr(transformers, config_cls)(**{**common, **overrides})


def _hf_layers(hf_model):
    """The decoder layers of a transformers causal LM, whatever the family calls them."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        owner = hf_model
        try:
            for part in path.split("."):
                owner = getattr(owner, part)
        except AttributeError:
            continue
        return owner
    raise AttributeError(type(hf_model).__name__)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config_cls, model_cls, overrides, _, _ = CASES[request.param]
    hf_config = _hf_config(request.param)
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_cls)(hf_config).eval()
    _randomise(hf_model)
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens), output_hidden_states=True, output_attentions=True)
    return request.param, hf_model, from_hf(hf_model), tokens, out


def test_config_is_read_with_the_family_facts(case):
    name, hf_model, ours, *_ = case
    c = ours.config
    for field, want in CASES[name][3].items():
        assert getattr(c, field) == want, (name, field, getattr(c, field))
    assert (c.num_layers, c.num_heads, c.head_dim) == (3, 4, 16)
    assert not c.embed_scale and c.final_logit_softcap is None
    if name not in GPT:
        assert c.num_kv_heads == 2 and c.mlp_activation == "silu" and c.norm_kind == "rms"
    assert config_from_hf(hf_model.config) == c


def test_logits_match_transformers(case):
    name, _, ours, tokens, out = case
    reference = out.logits.numpy()
    logits = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    assert logits.shape == reference.shape == (2, SEQ, VOCAB)
    assert np.abs(reference).max() > 1.0  # not degenerate
    np.testing.assert_allclose(logits, reference, rtol=0, atol=TOL, err_msg=name)


def test_sites_match_transformers(case):
    """transformers' hidden states are the residual stream entering each block (and, last,
    the final norm's output), its attentions our `pattern` site; a forward hook gives each MLP's
    output, our `mlp_out`."""
    name, hf_model, ours, tokens, out = case
    mlp_outs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: mlp_outs.append(o.detach()))
             for layer in _hf_layers(hf_model)]
    try:
        with torch.no_grad():
            hf_model(torch.tensor(tokens))
    finally:
        for h in hooks:
            h.remove()
    _, cache = capture(ours, jnp.asarray(tokens, jnp.int32),
                       sites=["resid_pre", "pattern", "mlp_out", "final_norm_out"])
    layers = ours.config.num_layers
    for i in range(layers):
        for ours_value, theirs, what in (
                (cache["resid_pre", i], out.hidden_states[i], "resid_pre"),
                (cache["pattern", i], out.attentions[i], "pattern"),
                (cache["mlp_out", i], mlp_outs[i], "mlp_out")):
            np.testing.assert_allclose(np.asarray(ours_value), theirs.numpy(), rtol=0,
                                       atol=TOL, err_msg=f"{name} layer {i} {what}")
    np.testing.assert_allclose(np.asarray(cache["final_norm_out"]),
                               out.hidden_states[layers].numpy(), rtol=0, atol=TOL)


def test_greedy_generation_matches_transformers(case):
    name, hf_model, ours, tokens, _ = case
    prompt = tokens[:, :6]
    # No end-of-sequence token on either side (transformers would stop at, or with
    # min_new_tokens suppress, the config's eos id 2): 16 plain greedy steps.
    hf_model.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(prompt), max_new_tokens=NEW, do_sample=False,
                                   pad_token_id=0)[:, 6:].numpy()
    got = np.asarray(generate(ours, prompt, max_new_tokens=NEW))
    np.testing.assert_array_equal(got, theirs, err_msg=name)
    assert len(set(got.ravel().tolist())) > 3  # not one token repeated


def test_the_saved_directory_loads_without_torch(case, tmp_path):
    name, hf_model, ours, tokens, out = case
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_hf_directory(tmp_path)
    assert loaded.config.replace(name="x") == ours.config.replace(name="x")
    np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(tokens, jnp.int32))),
                               out.logits.numpy(), rtol=0, atol=TOL, err_msg=name)


def test_features_are_exercised(case):
    name, _, ours, tokens, out = case
    arrays = leaf_paths(ours)
    logits = out.logits.numpy()
    for changes in CASES[name][4]:
        config = ours.config.replace(**changes)
        kept = {p: a for p, a in arrays.items() if "norm" not in p or config.use_qk_norm
                or "query_norm" not in p and "key_norm" not in p}
        variant = model_from_arrays(config, kept)
        moved = np.abs(np.asarray(variant(jnp.asarray(tokens, jnp.int32))) - logits).max()
        assert moved > 100 * TOL, f"{name}: {changes} left the logits unchanged ({moved})"


def test_biases_and_norms_act(case):
    """Zeroing the Qwen2 biases, or setting the norm multipliers to one, moves the logits: the
    leaves carry signal, so parity is evidence they are read and applied."""
    name, _, ours, tokens, out = case
    arrays = dict(leaf_paths(ours))
    targets = [p for p in arrays if ".b_" in p] or [p for p in arrays if p.endswith("scale")]
    for path in targets:
        arrays[path] = jnp.zeros_like(arrays[path]) if ".b_" in path else \
            jnp.ones_like(arrays[path])
    variant = model_from_arrays(ours.config, arrays)
    moved = np.abs(np.asarray(variant(jnp.asarray(tokens, jnp.int32))) - out.logits.numpy())
    assert moved.max() > 100 * TOL, name


# ------------------------------------------------------------------ GGUF of these families


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`), as it writes the
    query and key weights of Llama architectures."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _write_gguf(path, hf_model, arch: str) -> None:
    """The tiny transformers model written as llama.cpp's converter writes `arch`: its tensor
    names, Q/K permuted for "llama", the unembedding only when untied."""
    from gguf import GGUFWriter

    c = hf_model.config
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    heads = {"attn_q": c.num_attention_heads, "attn_k": c.num_key_value_heads}
    for key, x in state.items():
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            name = "output.weight"
        else:
            _, _, i, *rest = key.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{i}.{names[module]}.{kind}"
            short = names[module]
            if arch == "llama" and short in heads:
                x = _llama_cpp_permute(x, heads[short])
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name, arch", [("llama-untied", "llama"), ("qwen2-biases", "qwen2"),
                                        ("qwen3-qk-norm", "qwen3")])
def test_a_gguf_of_the_family_loads_as_transformers_computes(name, arch, tmp_path, monkeypatch):
    """llama.cpp permutes a Llama's query and key rows for its rotary kernel; loading undoes
    it, which the logits show (and loading without undoing it does not match). Qwen's are not
    permuted, nor are Gemma's (tests/test_gguf.py)."""
    from gemma_eqx.formats.gguf import load_gguf
    from gemma_eqx.model import families

    config_cls, model_cls, overrides, _, _ = CASES[name]
    hf_config = _hf_config(name)
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_cls)(hf_config).eval()
    _randomise(hf_model)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        reference = hf_model(torch.tensor(tokens)).logits.numpy()
    _write_gguf(tmp_path / "m.gguf", hf_model, arch)
    model = load_gguf(tmp_path / "m.gguf")
    assert model.config.architecture == arch
    assert model.config.tie_embeddings == hf_config.tie_word_embeddings
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, reference, rtol=0, atol=TOL, err_msg=name)
    family = families.FAMILIES[arch]
    assert family.gguf_rotary_permuted == (arch == "llama")
    if family.gguf_rotary_permuted:
        import dataclasses

        monkeypatch.setitem(families.FAMILIES, arch,
                            dataclasses.replace(family, gguf_rotary_permuted=False))
        wrong = np.asarray(load_gguf(tmp_path / "m.gguf")(jnp.asarray(tokens, jnp.int32)))
        assert np.abs(wrong - reference).max() > 100 * TOL


def _write_gpt_gguf(path, hf_model, arch: str) -> None:
    """GPT-2 or GPT-NeoX written as llama.cpp's converter writes them (convert_hf_to_gguf.py,
    `GPT2Model` and `GPTNeoXModel`): GPT-2's `Conv1D` matrices transposed to [out, in], NeoX's
    per-head `query_key_value` rows regrouped as all q, then all k, then all v; the metadata
    it writes (GPT-2: feed_forward_length = 4 * n_embd; NeoX: the rotary dimension, parallel
    residual flag, no RoPE base) and the unembedding only when untied."""
    from gguf import GGUFWriter

    c = hf_model.config
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    w = GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)  # config.json's n_ctx, the same in GPT-2's
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        w.add_tokenizer_model("gpt2")  # transformers reads the vocabulary size from it
        w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
        prefix, n_head, n_embed = "transformer.", c.n_head, c.n_embd
        names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
               "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    else:
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * head_dim))
        w.add_head_count(c.num_attention_heads)
        w.add_parallel_residual(c.use_parallel_residual)
        w.add_layer_norm_eps(c.layer_norm_eps)
        prefix, n_head, n_embed = "gpt_neox.", c.num_attention_heads, c.hidden_size
        names = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                 "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
        top = {"embed_in.weight": "token_embd.weight",
               "final_layer_norm.weight": "output_norm.weight",
               "final_layer_norm.bias": "output_norm.bias"}
    for key, x in state.items():
        if key in ("lm_head.weight", "embed_out.weight"):
            if getattr(c, "tie_word_embeddings", False):
                continue
            name = "output.weight"
        elif key.removeprefix(prefix) in top:
            name = top[key.removeprefix(prefix)]
        else:
            _, _, i, *rest = key.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            if module not in names:  # cached masks and rotary frequencies
                continue
            name = f"blk.{i}.{names[module]}.{kind}"
            if arch == "gpt2" and kind == "weight" and module != "ln_1" and module != "ln_2":
                x = x.T
            if arch == "gptneox" and module == "attention.query_key_value":
                rows = x.reshape(n_head, 3, n_embed // n_head, *x.shape[1:])
                x = np.concatenate([rows[:, j].reshape(n_embed, *x.shape[1:])
                                    for j in range(3)])
        w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name, arch", [("gpt2", "gpt2"), ("gpt-neox", "gptneox")])
def test_a_gguf_of_gpt2_or_neox_loads_as_transformers_computes(name, arch, tmp_path):
    """The fused q/k/v of both files, GPT-2's transposed matrices and learned positions, NeoX's
    regrouped rows and partial rotary: the logits of the model written equal transformers'.
    For GPT-2, transformers also reads the same file (`gguf_file=`): its reading agrees."""
    from gemma_eqx.formats.gguf import load_gguf

    config_cls, model_cls, overrides, ours_expected, _ = CASES[name]
    hf_config = _hf_config(name)
    if name == "gpt2":  # llama.cpp writes GPT-2's MLP width as 4 * n_embd, whatever n_inner;
        # transformers reads a GGUF's context length into n_ctx, leaving n_positions at 1024
        hf_config.n_inner, hf_config.n_positions = None, 1024
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_cls)(hf_config).eval()
    _randomise(hf_model)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        reference = hf_model(torch.tensor(tokens)).logits.numpy()
    _write_gpt_gguf(tmp_path / "m.gguf", hf_model, arch)
    model = load_gguf(tmp_path / "m.gguf")
    for field, value in ours_expected.items():
        assert getattr(model.config, field) == value, field
    got = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(got, reference, rtol=0, atol=TOL, err_msg=name)
    if name == "gpt2":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="m.gguf", torch_dtype=torch.float32).eval()
        with torch.no_grad():
            read_by_them = theirs(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(read_by_them, reference, rtol=0, atol=TOL)


def test_unpermuting_inverts_llama_cpp():
    from gemma_eqx.model.families import unpermute_rotary

    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    permuted = _llama_cpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rotary(permuted, 3), w)


def test_a_kaggle_layout_save_keeps_biases_and_the_unembedding(case, tmp_path):
    from gemma_eqx.formats.kaggle import load_checkpoint, save_checkpoint

    name, _, ours, tokens, out = case
    save_checkpoint(ours, tmp_path / "ckpt", dtype=None)
    back = load_checkpoint(tmp_path / "ckpt", preset=ours.config)
    np.testing.assert_array_equal(np.asarray(back(jnp.asarray(tokens, jnp.int32))),
                                  np.asarray(ours(jnp.asarray(tokens, jnp.int32))))


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf_config = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(hf_config).save_pretrained(directory)
    return directory


def _edited(source, target, **changes):
    import json
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt_bigcode"), r"model_type 'gpt_bigcode' is not an architecture this "
                                     r"library reads \(it reads gemma, .*llama, mistral, qwen2, "
                                     r"qwen3, gpt2, gpt_neox\)"),
    (dict(hidden_size=32, head_dim=8), r"tensor model.embed_tokens.weight has shape \(101, 64\); "
                                       r"leaf embedder.embedding of .* needs \(101, 32\)"),
    (dict(num_hidden_layers=2), r"layers.2.* are not read by .* \(2 layers\): the config and the "
                                r"weights disagree"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported for this family \(silu\)"),
    (dict(attention_bias=True), r"attention_bias = true .* is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     r"RoPE type 'yarn' is not supported \(default, linear, llama3\)"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                           "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                           "original_max_position_embeddings": 16}),
     r"rope_llama3 must be \(factor, low_freq_factor < high_freq_factor"),
])
def test_a_config_we_cannot_honour_is_refused_in_one_sentence(llama_dir, tmp_path, changes,
                                                               message):
    bad = _edited(llama_dir, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=message) as info:
        load_hf_directory(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_a_gguf_of_an_unknown_architecture_is_refused(tmp_path):
    from gguf import GGUFWriter

    from gemma_eqx.formats.gguf import load_gguf

    w = GGUFWriter(str(tmp_path / "x.gguf"), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"x.gguf: GGUF architecture 'rwkv6' is not one this "
                                         r"library reads \(gemma, gemma2, gemma3, llama, qwen2, "
                                         r"qwen3, gpt2, gptneox\)$"):
        load_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("rotary", [5, 18])  # 0 is refused as any count is
def test_a_neox_gguf_with_an_impossible_rotary_width_is_refused(rotary, tmp_path):
    from gguf import GGUFWriter

    from gemma_eqx.formats.gguf import load_gguf

    w = GGUFWriter(str(tmp_path / "x.gguf"), "gptneox")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 8),
                       (w.add_embedding_length, 32), (w.add_feed_forward_length, 64),
                       (w.add_head_count, 2), (w.add_rope_dimension_count, rotary)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=rf"x.gguf: rope.dimension_count {rotary} must be even "
                                         rf"and within the head dimension 16$"):
        load_gguf(tmp_path / "x.gguf")


# --------------------------------------------------------------- interp and sharding, unchanged


def test_interp_tools_work_unchanged(case):
    """Direct logit attribution adds up to the logit, the logit lens' last row is the model's
    own log-probabilities, every site is recorded, and a head-patching sweep of a source into
    itself changes nothing: the same code as for Gemma, no family branch."""
    from interp import patching

    name, _, ours, tokens, out = case
    if name in ROPE_VARIANTS:
        pytest.skip("a RoPE variant of llama-untied: the same modules, sites and leaves")
    tokens = jnp.asarray(tokens, jnp.int32)
    targets = np.asarray(tokens[:, 1:6])
    positions = list(range(5))
    dla = patching.direct_logit_attribution(ours, tokens, targets, positions)
    total = dla.embed + dla.attn.sum(0) + dla.mlp.sum(0) + dla.norm_bias
    np.testing.assert_allclose(total, dla.logit, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(dla.heads.sum(1) + dla.attn_bias, dla.attn, atol=1e-4,
                               err_msg=name)
    assert (np.abs(dla.norm_bias).max() > 1e-3) == (name in GPT)  # LayerNorm's bias
    logits = out.logits.numpy()[:, :5]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(dla.logit, picked, atol=TOL, err_msg=name)
    lens = patching.logit_lens(ours, tokens, targets, positions)
    logprobs = torch.log_softmax(out.logits[:, :5], -1).numpy()
    np.testing.assert_allclose(lens.logprobs[-1],
                               np.take_along_axis(logprobs, targets[..., None], -1)[..., 0],
                               atol=1e-4, err_msg=name)
    _, cache = capture(ours, tokens)
    for i in range(ours.config.num_layers - 1):
        np.testing.assert_array_equal(np.asarray(cache["resid_post", i]),
                                      np.asarray(cache["resid_pre", i + 1]))
    metric = patching.mean_logprob(np.asarray(tokens[0, 1:6]), positions)
    swept = patching.activation_patching(ours, tokens, tokens, "head_out", metric,
                                         per="layer_head")
    assert swept.values.shape == (3, 4)
    np.testing.assert_allclose(swept.values, swept.target, atol=1e-5, err_msg=name)


def test_a_model_sharded_over_8_devices_computes_the_same(case):
    import jax

    from gemma_eqx.parallel.sharding import default_mesh, shard_model

    name, _, ours, tokens, out = case
    if name in ROPE_VARIANTS:
        pytest.skip("a RoPE variant of llama-untied: the same leaves and axes")
    assert len(jax.devices()) == 8
    sharded = shard_model(ours, default_mesh())
    split = [x for x in jax.tree_util.tree_leaves(sharded)
             if hasattr(x, "sharding") and x.sharding.shard_shape(x.shape) != x.shape]
    assert split  # the MLP width (96) splits 8 ways; 4 heads and 101 tokens stay whole
    np.testing.assert_allclose(np.asarray(sharded(jnp.asarray(tokens, jnp.int32))),
                               out.logits.numpy(), rtol=0, atol=TOL, err_msg=name)
