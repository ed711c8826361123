"""Hugging Face model directories and Hub repo ids, read without torch: tiny Gemma 1, 2 and 3
saved by transformers' `save_pretrained` (one file and sharded with an index), the Hub cache
layout offline, clear failures, and host memory while loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_parity import CASES, COMMON, SEQ, TOL, VOCAB, _randomise  # noqa: E402

FAMILIES = ["gemma1-multi-query", "gemma2", "gemma3"]
HERE = Path(__file__).parent


def _child(code: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `code` in a fresh interpreter (8 simulated devices, as in the tests) and return
    the JSON it prints last."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), full_env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=full_env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_file):
    """Per family: a single-file and a sharded save_pretrained directory, and HF's logits."""
    out = {}
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ))
    for name in FAMILIES:
        config_cls, model_cls, overrides, _ = CASES[name]
        hf_config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(hf_config).eval()
        _randomise(model)
        with torch.no_grad():
            reference = model(torch.tensor(tokens)).logits.numpy()
        dirs = {}
        for layout, kw in (("single", {}), ("sharded", {"max_shard_size": "40KB"})):
            d = tmp_path_factory.mktemp(f"{name}-{layout}")
            model.save_pretrained(d, **kw)
            shutil.copy(tokenizer_file, d / "tokenizer.model")
            dirs[layout] = str(d)
        assert len(list(Path(dirs["sharded"]).glob("*.safetensors"))) > 2
        assert (Path(dirs["sharded"]) / "model.safetensors.index.json").is_file()
        out[name] = (dirs, reference)
    return tokens, out


@pytest.mark.slow  # child processes running JAX
def test_save_pretrained_directories_load_without_torch_sharded_leaf_by_leaf(saved):
    tokens, cases = saved
    plan = {name: dirs for name, (dirs, _) in cases.items()}
    got = _child(f"""
        import json, sys
        import jax, numpy as np
        from gemma_eqx import from_pretrained
        from gemma_eqx.parallel.sharding import default_mesh, leaf_sharding
        from gemma_eqx.model.weights import leaf_paths
        tokens = np.asarray({tokens.tolist()}, np.int32)
        out = {{}}
        for name, dirs in {plan!r}.items():
            for layout, d in dirs.items():
                model, tokenizer = from_pretrained(d)
                out[name + "/" + layout] = np.asarray(model(tokens)).tolist()
            mesh = default_mesh()
            model, _ = from_pretrained(dirs["sharded"], mesh=mesh)
            wrong = [p for p, x in leaf_paths(model).items()
                     if x.sharding != leaf_sharding(p, x.shape, mesh)]
            split = [p for p, x in leaf_paths(model).items()
                     if x.sharding.shard_shape(x.shape) != x.shape]
            assert not wrong and split, (wrong, split)
            out[name + "/mesh"] = np.asarray(model(tokens)).tolist()
            out[name + "/dtype"] = str(model.embedder.embedding.dtype)
        out["torch"] = "torch" in sys.modules or "transformers" in sys.modules
        out["devices"] = len(jax.devices())
        print(json.dumps(out))
    """)
    assert got["torch"] is False and got["devices"] == 8
    for name, (_, reference) in cases.items():
        for layout in ("single", "sharded", "mesh"):
            np.testing.assert_allclose(np.asarray(got[f"{name}/{layout}"]), reference,
                                       rtol=0, atol=TOL, err_msg=f"{name} {layout}")
        assert got[f"{name}/dtype"] == "float32"  # as stored


@pytest.mark.slow  # child processes running JAX
def test_a_repo_id_loads_from_the_hub_cache_offline_and_fails_clearly_without_it(saved,
                                                                                  tmp_path):
    _, cases = saved
    dirs, reference = cases["gemma3"]
    # The layout huggingface_hub writes: blobs, a snapshot per commit, refs/main.
    repo = tmp_path / "hub" / "models--google--gemma-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in Path(dirs["sharded"]).iterdir():
        blob = repo / "blobs" / f"{abs(hash(f.name)):x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}
    tokens = saved[0].tolist()
    got = _child(f"""
        import json, numpy as np
        from gemma_eqx import from_pretrained
        from gemma_eqx.formats.pretrained import ModelUnavailableError
        model, tokenizer = from_pretrained("google/gemma-tiny")
        logits = np.asarray(model(np.asarray({tokens}, np.int32))).tolist()
        try:
            from_pretrained("google/gemma-absent")
            message = None
        except ModelUnavailableError as e:
            message = str(e)
        print(json.dumps({{"logits": logits, "message": message}}))
    """, env=env)
    np.testing.assert_allclose(np.asarray(got["logits"]), reference, atol=TOL)
    assert "cannot reach the Hugging Face Hub to download google/gemma-absent" in got["message"]
    assert "hf download google/gemma-absent" in got["message"]


def test_hub_failures_say_what_to_do(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from gemma_eqx.formats.pretrained import ModelUnavailableError, from_pretrained

    response = type("R", (), {"status_code": 401, "headers": {}, "request": None,
                              "url": "https://huggingface.co"})()
    for error, expected in (
        (errors.GatedRepoError("gated", response=response),
         "google/gemma-2-2b is gated: accept its licence at https://huggingface.co/google/"
         "gemma-2-2b"),
        (errors.RepositoryNotFoundError("nope", response=response),
         "the Hugging Face Hub has no repo google/gemma-2-2b"),
    ):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(ModelUnavailableError, match="^" + expected.replace(".", r"\.")):
            from_pretrained("google/gemma-2-2b")


def test_bad_directories_name_the_file_and_tensor(saved, tmp_path):
    from gemma_eqx.formats.hf import SafetensorsReader, load_hf_directory

    dirs, _ = saved[1]["gemma2"]
    broken = tmp_path / "broken"
    shutil.copytree(dirs["single"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated: tensor "):
        load_hf_directory(broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 48
    shutil.copy(Path(dirs["single"]) / "model.safetensors", weights)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.embed_tokens\.weight has shape "
                                         r"\(97, 64\); leaf embedder\.embedding"):
        load_hf_directory(broken)
    with pytest.raises(ValueError, match="no tensor 'nothing'"):
        SafetensorsReader(dirs["single"]).find("nothing")


def test_a_directory_with_only_tokenizer_json_gets_its_tokenizer_rebuilt(saved, tmp_path,
                                                                        tokenizer_file):
    import jax.numpy as jnp

    from gemma_eqx import from_pretrained
    from gemma_eqx.formats.tokenizer import Tokenizer

    tokens, cases = saved
    dirs, reference = cases["gemma3"]
    only_json = tmp_path / "only-json"
    shutil.copytree(dirs["single"], only_json)
    (only_json / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="has neither tokenizer.model .* nor tokenizer.json"):
        from_pretrained(only_json)
    # Hugging Face's own conversion of the directory's SentencePiece model.
    transformers.GemmaTokenizer.from_pretrained(dirs["single"]).save_pretrained(only_json)
    (only_json / "tokenizer.model").unlink(missing_ok=True)
    model, tokenizer = from_pretrained(only_json)
    np.testing.assert_allclose(model(jnp.asarray(tokens, jnp.int32)), reference, atol=TOL)
    expected = Tokenizer.from_tokenizer_json(only_json / "tokenizer.json")
    assert tokenizer.to_proto() == expected.to_proto() and tokenizer.vocab_size >= 60
    assert tokenizer.encode("The quick brown fox") == transformers.GemmaTokenizer.from_pretrained(
        only_json)("The quick brown fox", add_special_tokens=False)["input_ids"]


@pytest.mark.slow  # child processes running JAX
def test_loading_holds_about_one_leaf_above_the_model_in_host_memory(tmp_path):
    """A Gemma 3-shaped model of 126M parameters (503 MB in float32), sharded in 100 MB files:
    the load's peak resident memory over what the process held before."""
    config = transformers.Gemma3TextConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    model = transformers.Gemma3ForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    total = sum(p.numel() * 4 for p in model.parameters() if p is not model.lm_head.weight)
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's high-water mark.
    got = _child(f"""
        import json
        import jax, jax.numpy as jnp
        from gemma_eqx.formats.hf import load_hf_directory

        def high_water():
            line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
            return int(line.split()[1]) * 1024

        jax.block_until_ready(jnp.ones(8) + 1)  # the runtime started
        before = high_water()
        model = load_hf_directory({str(tmp_path)!r}, check_finite=False)
        jax.block_until_ready(model)
        print(json.dumps({{"growth": high_water() - before}}))
    """, env={"XLA_FLAGS": ""})
    assert total > 4e8 and largest == 32768 * 1024 * 4
    # Measured: 699 MB for a 503 MB model whose largest leaf is 134 MB.
    assert total < got["growth"] <= total + largest + 128 * 2**20, (got["growth"], total)
