"""The second probe round, as a fault matrix: hostile files, indices and options, each refused
with one sentence that names the problem, before any work, with nothing written or changed.

Classes, each through every public entry point that reaches it:
- files a model directory points to (a safetensors index, links, FIFOs);
- every stored tensor used exactly once (extra layers, duplicates, missing tensors);
- weight dtypes, offsets and shapes in headers (safetensors, GGUF, Kaggle);
- typed config fields (config.json, GGUF metadata, GemmaConfig itself);
- token ids used as targets, and the one rule for indices, in every interp function;
- options of the commands and the `GEMMA_EQX_*` environment;
- the cluster launcher: where it listens, and what a signal to it leaves behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import (
    CharTokenizer,
    gguf_arrays,
    gguf_config,
    hf_config_json,
    hf_tensors,
    random_arrays,
    varied_model,
    write_hf_directory,
    write_safetensors,
    write_tiny_gguf,
)
from gemma_eqx.cli import main
from gemma_eqx.core.config import GemmaConfig
from gemma_eqx.formats import pretrained
from gemma_eqx.formats.gguf import load_gguf, read_gguf_header
from gemma_eqx.formats.hf import load_hf_directory
from gemma_eqx.formats.kaggle import load_checkpoint, save_checkpoint
from gemma_eqx.formats.pretrained import from_pretrained
from interp import patching, worlds
from interp.analyses import minimal_breaking_set
from interp.install import add_interventions
from interp.interventions import Linearized, Rewire
from interp.surgery import knockout_mask, record_attention

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def tree(directory: Path) -> dict[str, str]:
    """Every file below `directory` (links as links) with a digest of its bytes."""
    out = {}
    for p in sorted(directory.rglob("*")):
        key = str(p.relative_to(directory))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(path))
    return path


def nothing_cached(cache: Path) -> bool:
    return not (cache / "converted").exists() or not any((cache / "converted").iterdir())


def refused(call, error, match: str):
    """`call()` raises `error` whose message matches `match` (a regex)."""
    with pytest.raises(error, match=match) as caught:
        call()
    assert "\n" not in str(caught.value), "one sentence, one line"
    return caught.value


# ----------------------------------------------------------------------- Hugging Face files

CONFIG = gguf_config("gemma3").replace(
    name="tiny", head_dim=16, query_pre_attn_scalar=16.0, embed_dim=32, hidden_dim=48,
    vocab_size=64)
ARRAYS = random_arrays(CONFIG)


@pytest.fixture
def hf_dir(tmp_path, tokenizer_file):
    return write_hf_directory(tmp_path / "model", CONFIG, ARRAYS, tokenizer=tokenizer_file)


@pytest.fixture
def sharded(tmp_path, tokenizer_file):
    return write_hf_directory(tmp_path / "sharded", CONFIG, ARRAYS, shards=3,
                              tokenizer=tokenizer_file)


def loaders(directory: Path):
    """Every public entry point that reads a Hugging Face directory."""
    return [lambda: load_hf_directory(directory), lambda: from_pretrained(directory)]


def edit_index(directory: Path, change) -> None:
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("entry, match", [
    ("../../../../etc/passwd", r"points outside the model directory"),
    ("/etc/passwd", r"points outside the model directory"),
    ("", r"must be a file name"),
])
def test_an_index_entry_outside_the_directory_is_refused_before_opening(sharded, entry, match):
    edit_index(sharded, lambda m: m.update({"model.norm.weight": entry}))
    before = tree(sharded)
    for load in loaders(sharded):
        refused(load, ValueError, f"the index's file for tensor model.norm.weight .*{match}"
                if entry else match)
    assert tree(sharded) == before


def test_an_absolute_path_to_another_safetensors_file_is_refused(sharded, tmp_path):
    other = write_hf_directory(tmp_path / "other", CONFIG, random_arrays(CONFIG, seed=1))
    edit_index(sharded, lambda m: m.update({"model.norm.weight":
                                            str(other / "model.safetensors")}))
    for load in loaders(sharded):
        refused(load, ValueError, r"points outside the model directory; only files inside it")


def test_a_link_out_of_the_directory_is_refused(sharded, tmp_path):
    other = write_hf_directory(tmp_path / "other", CONFIG, random_arrays(CONFIG, seed=1))
    (sharded / "model-00001-of-00003.safetensors").unlink()
    (sharded / "model-00001-of-00003.safetensors").symlink_to(other / "model.safetensors")
    for load in loaders(sharded):
        refused(load, ValueError, r"is a link to .*other/model.safetensors, outside the model "
                r"directory; only files inside it are read")


def test_a_fifo_in_the_index_is_refused_without_hanging(sharded):
    os.mkfifo(sharded / "pipe.safetensors")
    edit_index(sharded, lambda m: m.update({"model.norm.weight": "pipe.safetensors"}))
    start = time.monotonic()
    for load in loaders(sharded):
        refused(load, ValueError, r"'pipe.safetensors' is not a regular file")
    assert time.monotonic() - start < 30


def test_a_fifo_among_the_weights_or_as_the_config_is_refused(hf_dir):
    os.mkfifo(hf_dir / "extra.safetensors")
    for load in loaders(hf_dir):
        refused(load, ValueError, r"weights file 'extra.safetensors' is not a regular file")
    (hf_dir / "extra.safetensors").unlink()
    (hf_dir / "config.json").unlink()
    os.mkfifo(hf_dir / "config.json")
    refused(lambda: load_hf_directory(hf_dir), ValueError,
            r"the config 'config.json' is not a regular file")


# --------------------------------------------------- every stored tensor is used exactly once


def test_a_config_with_fewer_layers_than_the_weights_is_refused(hf_dir, sharded):
    for directory in (hf_dir, sharded):
        config = json.loads((directory / "config.json").read_text())
        config["num_hidden_layers"] -= 1
        config["layer_types"] = config["layer_types"][:-1]
        (directory / "config.json").write_text(json.dumps(config))
        for load in loaders(directory):
            refused(load, ValueError, r"tensor\(s\) model.layers.5.input_layernorm.weight, .* "
                    r"are not read by .* \(5 layers\): the config and the weights disagree")


def test_a_tensor_stored_in_two_files_is_refused(hf_dir):
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(CONFIG.embed_dim, np.float32)},
              str(hf_dir / "zz-extra.safetensors"))
    for load in loaders(hf_dir):
        refused(load, ValueError, r"tensor model.norm.weight is stored twice, in "
                r"model.safetensors and zz-extra.safetensors")


def test_an_index_that_misplaces_or_omits_a_tensor_is_refused(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n, f in index.items() if f != "model-00001-of-00003.safetensors")
    edit_index(sharded, lambda m: m.update({name: "model-00001-of-00003.safetensors"}))
    refused(lambda: load_hf_directory(sharded), ValueError,
            rf"the index names tensor '{name}' but the file does not hold it|"
            rf"holds tensor {name}, which the index places in")
    edit_index(sharded, lambda m: m.update({name: index[name]}))
    edit_index(sharded, lambda m: m.pop(name))
    for load in loaders(sharded):
        refused(load, ValueError, rf"holds tensor {name}, which the index does not name: a "
                r"tensor no loader reads")


def test_a_missing_tensor_of_a_declared_layer_is_named(tmp_path, tokenizer_file):
    arrays = dict(hf_tensors(CONFIG, ARRAYS))
    del arrays["model.layers.3.mlp.down_proj.weight"]
    directory = tmp_path / "missing"
    directory.mkdir()
    from safetensors.numpy import save_file

    save_file(arrays, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config_json(CONFIG)))
    shutil.copy(tokenizer_file, directory / "tokenizer.model")
    for load in loaders(directory):
        refused(load, ValueError, r"tensor\(s\) layers.3.mlp.down_proj.weight of missing "
                r"\(6 layers\) are missing")


def test_an_untied_output_projection_is_refused_and_a_tied_copy_accepted(hf_dir, tmp_path):
    from safetensors.numpy import save_file

    tensors = hf_tensors(CONFIG, ARRAYS)
    copy = write_hf_directory(tmp_path / "copy", CONFIG, ARRAYS)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]},
              str(copy / "model.safetensors"))
    tokens = jnp.array([[2, 5, 6, 7]])
    np.testing.assert_array_equal(load_hf_directory(copy)(tokens),
                                  load_hf_directory(hf_dir)(tokens))
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1},
              str(copy / "model.safetensors"))
    refused(lambda: load_hf_directory(copy), ValueError,
            r"lm_head.weight differs from the token embedding, but the config ties")


def test_gguf_tensors_are_used_exactly_once(tmp_path, cache):
    config = gguf_config("gemma3")
    arrays = gguf_arrays(config)
    extra = write_tiny_gguf(tmp_path / "extra.gguf", config, arrays, arch="gemma3",
                            block_count=config.num_layers - 1)
    missing = write_tiny_gguf(tmp_path / "missing.gguf", config, arrays, arch="gemma3",
                              drop=("blk.2.ffn_down.weight",))
    for path, match in ((extra, r"tensor\(s\) blk.5.attn_k.weight, .* are not read by "
                                r"gguf:tiny test model \(5 layers\)"),
                        (missing, r"tensor\(s\) blk.2.ffn_down.weight of .* are missing")):
        refused(lambda path=path: load_gguf(path), ValueError, match)
        refused(lambda path=path: from_pretrained(path), ValueError, match)
    assert nothing_cached(cache)


def test_a_kaggle_checkpoint_with_an_extra_layer_is_refused(tmp_path):
    model = varied_model("gemma3")
    save_checkpoint(model, tmp_path / "ckpt", dtype=None)
    fewer = model.config.replace(num_layers=2, attention_kinds=model.config.attention_kinds[:2])
    refused(lambda: load_checkpoint(tmp_path / "ckpt", preset=fewer), ValueError,
            r"unexpected leaf transformer/layer_2/\S+ with shape .* for 'tiny3'")


# ------------------------------------------------------------- dtypes, offsets and shapes


def _one_tensor_file(directory: Path, entry: dict, data: bytes | int, name: str) -> Path:
    """The model directory's safetensors file rewritten with `name`'s header entry updated by
    `entry`, and `data` appended to the data section (an int: that many bytes cut off)."""
    tensors = hf_tensors(CONFIG, ARRAYS)
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        raw = tensors[key].tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape),
                       "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header[name] = {**header[name], **entry}
    body = b"".join(chunks)
    body = body[:-data] if isinstance(data, int) else body + data
    write_safetensors(directory / "model.safetensors", header, body)
    return directory


NORM = "model.norm.weight"


@pytest.mark.parametrize("entry, extra, match", [
    ({"dtype": "I32"}, b"", r"tensor model.norm.weight has dtype 'I32'; weights must be "
     r"floating point"),
    ({"dtype": "BOOL"}, b"", r"has dtype 'BOOL'; weights must be floating point"),
    ({"dtype": "Q4"}, b"", r"has dtype 'Q4'; not a safetensors dtype"),
    ({"data_offsets": [-128, 0]}, b"", r"data_offsets must be \[begin, end\] with 0 <= begin"),
    ({"data_offsets": [10**12, 10**12 + 128]}, b"", r"tensor model.norm.weight starts at byte "
     r"1000000000000 of the data section, which leaves a gap of \d+ bytes before it"),
    ({}, 100, r"model.safetensors is truncated: tensor \S+ needs bytes up to \d+ of the data "
     r"section; the file holds \d+"),
    ({"data_offsets": [0, 128]}, b"", r"starts at byte 0 of the data section, which overlaps "
     r"the tensor before it"),
    ({"shape": [-32]}, b"", r"shape must be a list of non-negative integers; got \[-32\]"),
    ({"shape": [True, 32]}, b"", r"shape must be a list of non-negative integers"),
    ({"shape": [2**40, 2**40]}, b"", r"spans 128 bytes; its shape \(1099511627776, "
     r"1099511627776\) of float32 needs"),
    ({"shape": [16]}, b"", r"spans 128 bytes; its shape \(16,\) of float32 needs 64"),
    ({}, b"\0" * 64, r"64 bytes follow the last tensor"),
])
def test_safetensors_headers_are_checked(hf_dir, entry, extra, match):
    _one_tensor_file(hf_dir, entry, extra, NORM)
    before = tree(hf_dir)
    for load in loaders(hf_dir):
        refused(load, ValueError, match)
    assert tree(hf_dir) == before


@pytest.mark.parametrize("header, match", [
    (b"[1, 2]", r"the safetensors header must be a JSON object; got list"),
    (b"{not json", r"is not a safetensors file \(its header is not JSON"),
    (b'{"model.norm.weight": 5}', r"header entry must be an object with dtype"),
])
def test_malformed_safetensors_headers_are_one_sentence(hf_dir, header, match):
    (hf_dir / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    for load in loaders(hf_dir):
        refused(load, ValueError, match)


def _tensor_info_offset(path: Path, name: str) -> int:
    """Where the tensor table entry of `name` starts in a GGUF file."""
    header = read_gguf_header(path)
    raw = path.read_bytes()
    needle = len(name).to_bytes(8, "little") + name.encode()
    at = raw.index(needle)
    assert name in header.tensors
    return at + len(needle)


def test_gguf_dims_whose_product_overflows_are_refused(tmp_path, cache):
    config = gguf_config("gemma3")
    path = write_tiny_gguf(tmp_path / "huge.gguf", config, gguf_arrays(config), arch="gemma3")
    raw = bytearray(path.read_bytes())
    at = _tensor_info_offset(path, "output_norm.weight")
    assert int.from_bytes(raw[at:at + 4], "little") == 1  # one dimension: make it two
    dims = (2**40).to_bytes(8, "little") * 2
    raw[at:at + 12] = (2).to_bytes(4, "little") + dims[:8]
    raw[at + 12:at + 12] = dims[8:]
    path.write_bytes(bytes(raw))
    for load in (lambda: load_gguf(path), lambda: from_pretrained(path)):
        refused(load, ValueError, r"huge.gguf: tensor 'output_norm.weight' has shape "
                r"\(1099511627776, 1099511627776\) \(1208925819614629174706176 values\), which "
                r"cannot fit in the file's")
    assert nothing_cached(cache)


def _gguf_with_metadata(path: Path, key: str, vtype: int, payload: bytes) -> Path:
    """A minimal GGUF (no tensors) holding one metadata entry of raw type `vtype`."""
    name = key.encode()
    kv = len(name).to_bytes(8, "little") + name + vtype.to_bytes(4, "little") + payload
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                     + (1).to_bytes(8, "little") + kv)
    return path


def test_deeply_nested_gguf_metadata_is_one_error(tmp_path):
    array_of = lambda inner: (9).to_bytes(4, "little") + (1).to_bytes(8, "little") + inner  # noqa: E731
    payload = (4).to_bytes(4, "little") + (0).to_bytes(8, "little")  # innermost: no uint32
    for _ in range(5000):
        payload = array_of(payload)
    path = _gguf_with_metadata(tmp_path / "nested.gguf", "deep", 9, payload)
    refused(lambda: read_gguf_header(path), ValueError,
            r"nested.gguf: metadata 'deep\[0\]\[0\]\[0\]\[0\]' nests arrays more than 4 deep")


def test_integer_gguf_weights_are_refused(tmp_path, cache):
    config = gguf_config("gemma3")
    arrays = gguf_arrays(config)
    path = write_tiny_gguf(tmp_path / "ints.gguf", config, arrays, arch="gemma3",
                           as_int32=("blk.0.attn_norm.weight",))
    for load in (lambda: load_gguf(path), lambda: from_pretrained(path)):
        refused(load, ValueError, r"tensor 'blk.0.attn_norm.weight' is stored as I32; weights "
                r"must be floating point")
    assert nothing_cached(cache)


def test_integer_kaggle_leaves_are_refused(tmp_path):
    import orbax.checkpoint as ocp

    from gemma_eqx.formats.kaggle import kaggle_from_arrays
    from gemma_eqx.model.weights import leaf_paths

    model = varied_model("gemma3")
    flat = kaggle_from_arrays(leaf_paths(model), model.config)
    flat["transformer/final_norm"]["scale"] = jnp.ones(model.config.embed_dim, jnp.int32)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", args=ocp.args.PyTreeSave(flat))
    refused(lambda: load_checkpoint(tmp_path / "ckpt", preset=model.config), ValueError,
            r"leaf transformer/final_norm/scale is stored as int32; weights must be floating")


# ------------------------------------------------------------------------ typed config fields


@pytest.mark.parametrize("change, match", [
    (lambda c: c.update(num_hidden_layers="6"), r"field 'num_hidden_layers' must be a positive "
     r"integer; got '6' \(str\)"),
    (lambda c: c.update(hidden_size=True), r"field 'hidden_size' must be a positive integer; "
     r"got True \(bool\)"),
    (lambda c: c.update(rms_norm_eps="1e-6"), r"field 'rms_norm_eps' must be a positive number"),
    (lambda c: c.update(head_dim=-16), r"field 'head_dim' must be a positive integer; got -16"),
    (lambda c: c.update(layer_types=["full_attention"]), r"field 'layer_types' must be a list "
     r"of 6 entries"),
    (lambda c: c.update(rope_scaling=[1, 2]), r"field 'rope_scaling' must be an object"),
    (lambda c: c.pop("vocab_size"), r"field 'vocab_size' is missing"),
    (lambda c: c.update(model_type="gpt_bigcode"), r"model_type 'gpt_bigcode' is not an "
     r"architecture this library reads \(it reads gemma, gemma2, gemma3_text, gemma3, llama, "
     r"mistral, qwen2, qwen3, gpt2, gpt_neox\)"),
    (lambda c: c.update(num_key_value_heads=3), r"num_heads=2 is not a multiple of "
     r"num_kv_heads=3"),
])
def test_config_json_fields_are_typed(hf_dir, change, match, capsys):
    config = json.loads((hf_dir / "config.json").read_text())
    change(config)
    (hf_dir / "config.json").write_text(json.dumps(config))
    for load in loaders(hf_dir):
        refused(load, ValueError, r"config.json.*" + match)
    assert main(["generate", "hi", "--model", str(hf_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemma-eqx generate: error: "), err


def test_a_list_in_place_of_the_config_is_one_sentence(hf_dir):
    (hf_dir / "config.json").write_text("[1, 2, 3]")
    for load in loaders(hf_dir):
        refused(load, ValueError, r"config.json must hold a JSON object; got list")


def test_gguf_metadata_fields_are_typed(tmp_path, cache):
    config = gguf_config("gemma3")
    arrays = gguf_arrays(config)
    for key, value, match in (("gemma3.block_count", "six", r"'gemma3.block_count' must be a "
                               r"positive integer; got 'six' \(str\)"),
                              ("gemma3.attention.layer_norm_rms_epsilon", -1.0,
                               r"'gemma3.attention.layer_norm_rms_epsilon' must be a positive "
                               r"number; got -1.0")):
        path = write_tiny_gguf(tmp_path / "typed.gguf", config, arrays, arch="gemma3",
                               metadata={key: value})
        for load in (load_gguf, from_pretrained):
            refused(lambda load=load, path=path: load(path), ValueError,
                    "typed.gguf: GGUF metadata " + match)
    assert nothing_cached(cache)


@pytest.mark.parametrize("field, value, match", [
    ("num_layers", "3", r"num_layers must be a positive integer; got '3' \(str\)"),
    ("num_heads", True, r"num_heads must be a positive integer; got True \(bool\)"),
    ("norm_eps", float("nan"), r"norm_eps must be a positive number; got nan"),
    ("attention_kinds", ("global", "sliding", "global"), r"attention_kinds must be a tuple of "
     r"'global' and 'local'"),
    ("use_qk_norm", 1, r"use_qk_norm must be True or False; got 1"),
])
def test_gemma_config_checks_its_own_fields(field, value, match, as_a_user):
    config = varied_model("gemma3").config
    import dataclasses

    fields = {**{f: getattr(config, f) for f in config.__dataclass_fields__}, field: value}
    refused(lambda: GemmaConfig(**fields), ValueError, match)
    assert dataclasses.replace(config) == config


# ------------------------------------------------------------------ interp: targets and indices


MODEL = varied_model("gemma3")  # vocabulary 128, 3 layers, 4 heads
TOKENS = jnp.array([[2, 40, 41, 42, 43, 40, 41, 42]])
OTHER = jnp.array([[2, 50, 51, 52, 53, 50, 51, 52]])
VOCAB = MODEL.config.vocab_size


@pytest.mark.parametrize("target", [VOCAB, VOCAB + 5, 10**6])
def test_targets_outside_the_vocabulary_are_refused_everywhere(target, as_a_user):
    for metric in (patching.mean_logprob([target], [7]),
                   patching.logit_difference([target], [3], [7]),
                   patching.logit_difference([3], [target], [7])):
        match = rf"target token id {target} at \[0\] is outside the vocabulary \[0, {VOCAB}\)"
        refused(lambda m=metric: patching.evaluate(MODEL, TOKENS, m), ValueError, match)
        refused(lambda m=metric: patching.activation_patching(MODEL, TOKENS, OTHER, "resid_pre",
                                                              m), ValueError, match)
        refused(lambda m=metric: patching.path_patching(MODEL, TOKENS, OTHER, [(2, 0)], "v", m),
                ValueError, match)
    targets = np.array([[target]])
    match = rf"target token id {target} at \[0, 0\] is outside the vocabulary"
    refused(lambda: patching.direct_logit_attribution(MODEL, TOKENS, targets, [7]),
            ValueError, match)
    refused(lambda: patching.logit_lens(MODEL, TOKENS, targets, [7]), ValueError, match)


@pytest.mark.parametrize("bad, error, match", [
    (-1, ValueError, r"target token id -1 is negative; token ids are 0 .. vocab - 1"),
    (3.0, TypeError, r"target token id index must be an integer; got 3.0 \(float\)"),
    (True, TypeError, r"target token id index must be an integer; got True \(a bool\)"),
])
def test_target_ids_must_be_non_negative_integers(bad, error, match, as_a_user):
    refused(lambda: patching.mean_logprob([bad], [7]), error, match)
    refused(lambda: patching.logit_difference([bad], [3], [7]), error,
            match.replace("target", "correct"))
    if error is ValueError:
        refused(lambda: patching.direct_logit_attribution(MODEL, TOKENS, np.array([[bad]]),
                                                          [7]), ValueError,
                r"target token id -1 at \[0, 0\] is outside the vocabulary")
    else:
        refused(lambda: patching.logit_lens(MODEL, TOKENS, np.array([[bad]]), [7]), TypeError,
                r"target token id must be integer token ids; got (float64|bool)")


FLOAT, BOOL = ([4.9], r"got 4.9 \(float\)"), ([True], r"got True \(a bool\)")


@pytest.mark.parametrize("value, shown", [FLOAT, BOOL,
                                          (np.array([1.0]), r"got .*1.0.* \(float64\)")])
def test_one_rule_for_indices_in_every_interp_function(value, shown, as_a_user):
    cache = interp.capture(MODEL, OTHER)[1]
    calls = {
        "position": [
            lambda: interp.capture(MODEL, TOKENS, positions=value),
            lambda: interp.patch(MODEL, cache, "resid_pre", layers=[1], positions=value),
            lambda: interp.ablate(MODEL, "resid_pre", positions=value),
            lambda: interp.scale(MODEL, "resid_pre", 0.5, positions=value),
            lambda: interp.apply_fn(MODEL, "resid_pre", lambda x: x, positions=value),
            lambda: worlds.rewire(MODEL, worlds.Worlds(("a", "b")), "v", {"b": "a"},
                                  positions=value),
            lambda: patching.evaluate(MODEL, TOKENS, patching.mean_logprob([3], value)),
            lambda: patching.direct_logit_attribution(MODEL, TOKENS, np.array([[3]]), value),
        ],
        "head": [
            lambda: interp.capture(MODEL, TOKENS, heads=value),
            lambda: interp.patch(MODEL, cache, "head_out", layers=[1], heads=value),
            lambda: interp.ablate(MODEL, "head_out", heads=value),
            lambda: interp.scale(MODEL, "pattern", 0.5, heads=value),
            lambda: interp.apply_fn(MODEL, "head_out", lambda x: x, heads=value),
            lambda: worlds.rewire(MODEL, worlds.Worlds(("a", "b")), "v_per_head", {"b": "a"},
                                  heads=value),
            lambda: record_attention(MODEL, heads=value),
            lambda: knockout_mask(MODEL, [(1, value[0])]),
            lambda: worlds.knock_out_in(MODEL, worlds.Worlds(("a", "b")), [(1, value[0])],
                                        ["a"]),
            lambda: patching.path_patching(MODEL, TOKENS, OTHER, [(2, value[0])], "v",
                                           patching.mean_logprob([3], [7])),
            lambda: minimal_breaking_set(MODEL, TOKENS, np.arange(8)[None] > 4,
                                         [(1, value[0])], chance_accuracy=0.1, threshold=0.1),
        ],
        "layer": [
            lambda: interp.capture(MODEL, TOKENS, layers=value),
            lambda: interp.ablate(MODEL, "resid_pre", layers=value),
            lambda: record_attention(MODEL, layers=value),
            lambda: knockout_mask(MODEL, [(value[0], 1)]),
            lambda: cache["resid_pre", value[0]],
            lambda: cache.stack("resid_pre", layers=value),
        ],
        "query": [lambda: record_attention(MODEL, queries=value)],
    }
    for what, group in calls.items():
        for k, call in enumerate(group):
            with pytest.raises(TypeError, match=rf"{what} index must be an integer; {shown}"):
                call()
                pytest.fail(f"{what} call {k} accepted {value!r}")


@pytest.mark.parametrize("index", [4, -5, 100])
def test_out_of_range_indices_are_refused_not_wrapped(index, as_a_user):
    refused(lambda: interp.capture(MODEL, TOKENS, heads=[index]), ValueError,
            rf"head index {index} is out of range for 4 heads")
    refused(lambda: knockout_mask(MODEL, [(0, index)]), ValueError,
            rf"head index {index} is out of range for 4 heads")
    refused(lambda: patching.evaluate(MODEL, TOKENS, patching.mean_logprob([3], [3 * index])),
            ValueError, rf"metric position index {3 * index} is out of range for 8 metric "
            r"positions")


@pytest.mark.parametrize("source, match", [
    ([0, 5], r"rewiring source at site v holds row 5 at index 1; its 2 entries must be rows "
     r"0..1"),
    ([0, -1], r"holds row -1 at index 1"),
    ([0.0, 1.0], r"rewiring source at site v must be an integer array of batch rows; got "
     r"float32"),
    ([True, False], r"must be an integer array of batch rows; got bool"),
])
def test_rewiring_rows_are_checked(source, match, as_a_user):
    error = TypeError if "integer array" in match else ValueError
    refused(lambda: Rewire("v", source=jnp.asarray(source)), error, match)
    refused(lambda: Linearized(MODEL.blocks[0].mlp, jnp.asarray(source), jnp.asarray([0, 1])),
            error, match.replace("rewiring source at site v", "Linearized.around"))


def test_a_world_table_in_range_still_runs():
    model = add_interventions(MODEL, {1: Rewire("v", source=jnp.asarray([1, 1]))})
    logits = interp.run(model, jnp.concatenate([TOKENS, OTHER]))
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("receivers, senders, error, match", [
    ([(0, 1)], None, ValueError, r"every receiver \(\(0, 1\)\) is in layer 0, where no head can "
     r"send to it"),
    ([5], None, TypeError, r"receiver 0 must be a \(layer, head\) pair; got 5"),
    ([(1,)], None, TypeError, r"receiver 0 must be a \(layer, head\) pair; got \(1,\)"),
    ("2,1", None, TypeError, r"receiver 0 must be a \(layer, head\) pair; got '2'|receivers "
     r"must be a sequence"),
    ([(1, 0)], [(2, 1)], ValueError, r"sender \(2, 1\) is not below any receiver's layer \(the "
     r"last receiver is in layer 1\)"),
    ([(1, 0)], [], ValueError, r"needs at least one sender head"),
])
def test_path_patching_receivers_and_senders_are_checked(receivers, senders, error, match,
                                                         as_a_user):
    refused(lambda: patching.path_patching(MODEL, TOKENS, OTHER, receivers, "v",
                                           patching.mean_logprob([3], [7]), senders=senders),
            error, match)


@pytest.mark.parametrize("fn, error, match", [
    (lambda x: None, TypeError, r"the function applied at site resid_mid of layer 1 returned "
     r"NoneType, not an array of the site's shape \(1, 8, 32\)"),
    (lambda x: [1.0], TypeError, r"returned list, not an array"),
    (lambda x: x[:, :4], ValueError, r"returned shape \(1, 4, 32\); the site has shape "
     r"\(1, 8, 32\)"),
    (lambda x: (x > 0), TypeError, r"returned bool values; the site holds float32 activations"),
    (lambda x: x.astype(jnp.int32), TypeError, r"returned int32 values"),
])
def test_apply_fn_results_are_checked(fn, error, match, as_a_user):
    model = interp.apply_fn(MODEL, "resid_mid", fn, layers=[1])
    refused(lambda: interp.run(model, TOKENS), error, match)


# --------------------------------------------------------------------- the cluster launcher

# Imported by every child's interpreter (PYTHONPATH): joins the cluster, runs a collective,
# starts a grandchild in its process group, says it is ready and waits to be stopped.
CHILD = '''
import os, subprocess, time
ready = os.environ.get("HOSTILE_READY_DIR")
if ready and "GEMMA_EQX_PROCESS_ID" in os.environ:
    from gemma_eqx.core import multihost
    multihost.initialize()
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    multihost_utils.process_allgather(jnp.ones(2))
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(ready, os.environ["GEMMA_EQX_PROCESS_ID"]), "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    time.sleep(300)
'''


def _listening(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = cols[1].split(":")
            raw = bytes.fromhex(address)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                import ipaddress

                v6address = ipaddress.IPv6Address(raw)
                host = str(v6address.ipv4_mapped or v6address)
            else:
                host = ".".join(str(b) for b in raw[::-1])
            found.append(f"{host}:{int(port, 16)}")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow  # child processes running JAX
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_launch_listens_on_loopback_and_a_signal_leaves_no_process(tmp_path, sig):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CHILD)
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "HOSTILE_READY_DIR": str(ready), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"),
                                          os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gemma_eqx.cli", "launch", "--processes", "2",
         "--devices-per-process", "1", "--", "generate", "hi"],
        env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < 2:
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline, "the processes never joined the cluster"
            time.sleep(0.2)
        time.sleep(0.2)  # the files are whole
        pids = [int(x) for f in ready.iterdir() for x in f.read_text().split()]
        children = pids[::2]
        addresses = _listening(children)
        assert addresses, "process 0 must listen (the coordinator)"
        import ipaddress

        assert all(ipaddress.ip_address(a.rpartition(":")[0]).is_loopback
                   for a in addresses), addresses
        launcher.send_signal(sig)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == (f"gemma-eqx launch: stopped by {sig.name}: every "
                                            f"process of the run was stopped")
    time.sleep(0.5)
    left = [p for p in pids if _alive(p)]
    assert not left, f"processes of the run still running: {left}"


def test_the_coordinator_binds_where_it_is_reached_or_where_told():
    from gemma_eqx.core.multihost import cluster_settings

    assert cluster_settings("127.0.0.1:4000", 2, 0).bind_address == "127.0.0.1:4000"
    assert cluster_settings("10.1.2.3:4000", 2, 1).bind_address == "10.1.2.3:4000"
    assert cluster_settings("[::1]:4000", 2, 1).bind_address == "[::1]:4000"
    assert cluster_settings("10.1.2.3:4000", 2, 0, bind_address="all").bind_address == \
        "[::]:4000"
    assert cluster_settings("h0:4000", 2, 0, bind_address="10.0.0.9").bind_address == \
        "10.0.0.9:4000"
    assert cluster_settings("h0:4000", 2, 0, bind_address="10.0.0.9:5000").bind_address == \
        "10.0.0.9:5000"


@pytest.mark.parametrize("env, match", [
    ({"GEMMA_EQX_COORDINATOR": "localhost", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "0"}, r"GEMMA_EQX_COORDINATOR must be host:port with a port in "
     r"1..65535"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:99999", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "0"}, r"GEMMA_EQX_COORDINATOR must be host:port"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "two",
      "GEMMA_EQX_PROCESS_ID": "0"}, r"GEMMA_EQX_NUM_PROCESSES must be an integer; got 'two'"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "5"}, r"process id 5 is out of range for 2 processes"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "-1"}, r"GEMMA_EQX_PROCESS_ID must be >= 0; got -1"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "0",
      "GEMMA_EQX_PROCESS_ID": "0"}, r"GEMMA_EQX_NUM_PROCESSES must be >= 1; got 0"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000"}, r"the process count and this process's id "
     r"are needed too"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "0", "GEMMA_EQX_HEARTBEAT_SECONDS": "0"},
     r"GEMMA_EQX_HEARTBEAT_SECONDS must be >= 1; got 0"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "0", "GEMMA_EQX_HEARTBEAT_SECONDS": "1.5"},
     r"GEMMA_EQX_HEARTBEAT_SECONDS must be an integer; got '1.5'"),
    ({"GEMMA_EQX_COORDINATOR": "127.0.0.1:4000", "GEMMA_EQX_NUM_PROCESSES": "2",
      "GEMMA_EQX_PROCESS_ID": "0", "GEMMA_EQX_COORDINATOR_BIND": "a:b:c"},
     r"GEMMA_EQX_COORDINATOR_BIND must be 'all', a host or host:port"),
    ({"GEMMA_EQX_LOG_LEVEL": "LOUD"}, r"GEMMA_EQX_LOG_LEVEL must be DEBUG, INFO, WARNING, "
     r"ERROR or CRITICAL; got 'LOUD'"),
])
def test_the_cluster_environment_is_checked_before_jax_sees_it(env, match, monkeypatch, capsys,
                                                                 tmp_path):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["generate", "hi", "--model", str(tmp_path / "absent.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gemma-eqx generate: error: "), err
    assert __import__("re").search(match, err[0]), err[0]


@pytest.mark.parametrize("args, match", [
    (["--timeout", "-1"], r"timeout must be a finite number of seconds > 0; got -1.0"),
    (["--timeout", "nan"], r"timeout must be a finite number of seconds > 0; got nan"),
    (["--devices-per-process", "0"], r"devices_per_process must be an integer >= 1; got 0"),
    (["--processes", "0"], r"processes must be an integer >= 1; got 0"),
])
def test_launch_options_are_checked_before_any_process_starts(args, match, capsys):
    assert main(["launch", *args, "--", "generate", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(match, err[0]), err


# ----------------------------------------------------------------- the commands' options


@pytest.mark.parametrize("option, value, least", [
    ("--top", 0, 1), ("--strings", 0, 1), ("--residual-stride", 0, 1), ("--period", 1, 2),
    ("--top", -3, 1),
])
def test_each_induction_option_is_refused_by_its_own_name(option, value, least, capsys,
                                                          tmp_path):
    out = tmp_path / "report"
    assert main(["induction", option, str(value), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gemma-eqx induction: error: {option} must be >= {least}; got {value}"
    assert not out.exists()


def test_more_top_heads_than_half_the_model_is_refused_after_loading(monkeypatch, capsys,
                                                                   tmp_path):
    monkeypatch.setattr(pretrained, "from_pretrained",
                        lambda name: (varied_model("gemma3"), CharTokenizer()))
    out = tmp_path / "report"
    assert main(["induction", "--top", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--top 7 needs 14 distinct heads (the top set and a control set as "
                        "large); tiny3 has 12: use --top 6 or fewer")
    assert not out.exists()


def test_out_must_be_writable_before_the_study(tmp_path, capsys):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere" / "report")
    before = tree(tmp_path)
    assert main(["induction", "--out", str(dangling)]) == 2
    err = capsys.readouterr().err
    assert f"--out {dangling} is a symbolic link to {tmp_path}/nowhere/report, which does not " \
           f"exist" in err and "loading" not in err
    assert main(["induction", "--out", "/proc/gemma-eqx-report"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc/gemma-eqx-report is not writable (/proc:" in err, err
    assert tree(tmp_path) == before and not Path("/proc/gemma-eqx-report").exists()


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_generate_refuses_a_seed_beyond_64_bits(seed, capsys):
    assert main(["generate", "hi", "--temperature", "1", "--seed", str(seed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gemma-eqx generate: error: --seed must be an integer in [0, 2**63); got {seed}"


BENCH = ROOT / "benchmarks" / "bench_throughput.py"


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, match", [
    (["--modes", "prefil"], r"--modes: unknown mode 'prefil'; choose from prefill, decode, "
     r"train"),
    (["--modes", "prefill,prefill"], r"--modes names a mode twice"),
    (["--modes", ""], r"--modes: unknown mode ''"),
    (["--batch", "0"], r"--batch must be >= 1; got 0"),
    (["--seq", "-5"], r"--seq must be >= 1; got -5"),
    (["--repeats", "0"], r"--repeats must be >= 1; got 0"),
    (["--decode-steps", "0"], r"--decode-steps must be >= 1; got 0"),
    (["--dtype", "int8"], r"--dtype 'int8' is not a floating dtype"),
    (["--dtype", "float64"], r"--dtype 'float64' is not a floating dtype JAX computes in"),
    (["--peak-tflops", "0"], r"--peak-tflops must be a positive number; got 0.0"),
    (["--bandwidth-gbs", "nan"], r"--bandwidth-gbs must be a positive number; got nan"),
    (["--device-kind", "h"], r"--device-kind 'h' is not a known device; choose from v4, v5e, "
     r"v5p, v6e, a100, h100, h200"),
    (["--devices", "8"], r"--devices simulates CPU devices for --dry-run only"),
    (["--remat"], r"--remat recomputes a scanned stack's periods: add --scan"),
    (["--preset", "gemma-9b"], r"unknown Gemma preset 'gemma-9b'"),
])
def test_the_throughput_script_refuses_bad_options_before_any_work(args, match):
    bench = _bench_module()
    with pytest.raises(bench.Refused, match=match):
        bench.check_args(bench._args(args))


@pytest.mark.slow  # child processes running JAX
def test_the_throughput_script_refuses_in_one_line_and_writes_nothing(tmp_path):
    results = tmp_path / "throughput.jsonl"
    results.write_text('{"earlier": 1}\n')
    for args in (["--mesh", "model=3"], ["--mesh", "data=2,data=4"], ["--device-kind", "h"],
                 ["--batch", "3", "--mesh", "data=2,model=4"]):
        run = subprocess.run([sys.executable, str(BENCH), *args, "--results", str(results)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1, run.stderr
        assert lines[0].startswith("bench_throughput.py: error: "), lines
        assert results.read_text() == '{"earlier": 1}\n'
    assert _bench_module()._args([]).results is None  # the default writes no file


def test_a_mesh_is_parsed_strictly():
    from gemma_eqx.parallel.throughput import parse_mesh

    for text, match in (("data=2,data=4", "axis data is given twice"),
                        ("model=3", "has 3 devices; there are 8"),
                        ("data=3,model=-1", "8 devices do not split into model x 3"),
                        ("data=-1,model=-1", "only one axis may be -1"),
                        ("data", "expected axes data=N,model=M; got 'data'"),
                        ("data=1.5", "expected axes data=N,model=M; got 'data=1.5'"),
                        ("model=0", "axis model must have a positive size")):
        refused(lambda text=text: parse_mesh(text), ValueError, match)
    assert dict(parse_mesh(" data = 2 , model=-1 ").shape) == {"data": 2, "model": 4}


def test_device_kinds_match_whole_names():
    from gemma_eqx.parallel.throughput import device_peak

    assert device_peak("h") is None and device_peak("v5") is not None
    assert device_peak("h200").name == "H200" and device_peak("NVIDIA H200").name == "H200"
    assert device_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"


# -------------------------------------------------------------------------------- the cache


def test_an_entry_replaced_by_a_link_to_a_users_directory(tmp_path, cache):
    config = gguf_config("gemma3")
    path = write_tiny_gguf(tmp_path / "tiny.gguf", config, gguf_arrays(config), arch="gemma3")
    entry = pretrained.gguf_cache_entry(path)
    expected = np.asarray(from_pretrained(path)[0](TOKENS[:, :5] + 200))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    shutil.rmtree(entry)
    entry.symlink_to(mine)
    before = tree(mine)
    model, _ = from_pretrained(path)  # first run after the change: no "File exists"
    np.testing.assert_array_equal(np.asarray(model(TOKENS[:, :5] + 200)), expected)
    assert tree(mine) == before and entry.is_dir() and not entry.is_symlink()
    # A link to a whole entry (moved to another disk) is used as it is.
    moved = tmp_path / "elsewhere"
    shutil.move(entry, moved)
    entry.symlink_to(moved)
    from_pretrained(path)
    assert entry.is_symlink() and os.readlink(entry) == str(moved)


def _hub_repo(hub: Path, name: str, source: Path) -> None:
    """`source`'s files as huggingface_hub caches them: blobs, a snapshot of links, refs/main."""
    repo = hub / f"models--google--{name}"
    commit = hashlib.sha1(name.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.mark.slow  # child processes running JAX
def test_the_hub_cache_entry_point_checks_the_same_classes(tmp_path, tokenizer_file):
    hub = tmp_path / "hub"
    good = write_hf_directory(tmp_path / "good", CONFIG, ARRAYS, shards=2,
                              tokenizer=tokenizer_file)
    _hub_repo(hub, "good", good)
    fewer = tmp_path / "fewer"
    shutil.copytree(good, fewer)
    config = json.loads((fewer / "config.json").read_text())
    config.update(num_hidden_layers=5, layer_types=config["layer_types"][:5])
    (fewer / "config.json").write_text(json.dumps(config))
    _hub_repo(hub, "fewer", fewer)
    outside = tmp_path / "outside"
    shutil.copytree(good, outside)
    edit_index(outside, lambda m: m.update({"model.norm.weight": "../../blobs/anything"}))
    _hub_repo(hub, "outside", outside)
    ints = tmp_path / "ints"
    shutil.copytree(good, ints)
    (ints / "model.safetensors.index.json").unlink()
    for f in ints.glob("*.safetensors"):
        f.unlink()
    _one_tensor_file(ints, {"dtype": "I32"}, b"", NORM)
    _hub_repo(hub, "ints", ints)
    linked = hub / "models--google--linked"
    _hub_repo(hub, "linked", good)
    snapshot = next((linked / "snapshots").iterdir())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(good / "config.json")  # outside the repo's blobs
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_TOKEN": "",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    code = """
import json
from gemma_eqx import from_pretrained
out = {}
for name in ("good", "fewer", "outside", "ints", "linked"):
    try:
        model, _ = from_pretrained("google/" + name)
        out[name] = "loaded " + model.config.name
    except ValueError as e:
        out[name] = str(e)
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["good"].startswith("loaded ")
    assert "are not read by" in got["fewer"] and "(5 layers)" in got["fewer"], got["fewer"]
    assert "the index's file for tensor model.norm.weight '../../blobs/anything' points " \
           "outside the model directory" in got["outside"], got["outside"]
    assert "tensor model.norm.weight has dtype 'I32'; weights must be floating point" in \
        got["ints"], got["ints"]
    assert "the config 'config.json' is a link to" in got["linked"] and \
           "outside the model directory" in got["linked"], got["linked"]


def test_a_detected_cluster_binds_its_detected_address(monkeypatch):
    from gemma_eqx.core.multihost import _detected, cluster_settings

    for name, value in (("SLURM_JOB_ID", "4242"), ("SLURM_STEP_NODELIST", "node[007-009]"),
                        ("SLURM_NTASKS", "3"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "0")):
        monkeypatch.setenv(name, value)
    settings = _detected(cluster_settings(), 5)
    port = 4242 % 2**12 + 65535 - 2**12 + 1  # SLURM's port rule in JAX
    assert settings == type(settings)(f"node007:{port}", 3, 1, 10, f"node007:{port}")
    monkeypatch.setenv("GEMMA_EQX_COORDINATOR_BIND", "all")
    assert _detected(cluster_settings(), 5).bind_address == f"[::]:{port}"


def test_a_compile_cache_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("GEMMA_EQX_NO_COMPILE_CACHE")
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    monkeypatch.setenv("GEMMA_EQX_COMPILE_CACHE", str(blocker))
    assert main(["induction", "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"gemma-eqx induction: error: GEMMA_EQX_COMPILE_CACHE={blocker} is not a " \
                  f"directory"
    assert blocker.read_text() == "mine" and not (tmp_path / "report").exists()
