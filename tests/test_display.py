"""Treescope rendering (`gemma_eqx.model.display`): parameter shapes, dtypes and shardings,
installed interventions, recorded activations with their axis names, and named-axis figures."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import random_model, tiny_config
from gemma_eqx import shard_model
from gemma_eqx.model.display import render_site, sharding_note
from gemma_eqx.model.weights import leaf_paths

treescope = pytest.importorskip("treescope")

TOKENS = jnp.array([[5, 9, 17, 3, 5, 9, 17, 3]])


def expanded_text(value) -> str:
    """The text rendering with every node expanded (comments show only on expanded lines)."""
    with treescope.using_expansion_strategy(max_height=None, target_width=1):
        return treescope.render_to_text(value)


NOTE = r"# (P\(.*?\) over data=2 x model=4|replicated over 8 devices)"


def field_note(text: str, field: str, summary: str) -> str:
    """The sharding note of the (first) field `field` whose array summary is `summary`."""
    for chunk in re.split(r"\n(?=\s*\w+=)", text):
        if chunk.strip().startswith(f"{field}=") and summary in chunk:
            return re.search(NOTE, chunk).group(1)
    raise AssertionError(f"no field {field} with {summary}")


@pytest.fixture(scope="module")
def sharded():
    # jax.make_mesh gives Explicit axes by default; the model must still run on it.
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model = random_model(tiny_config("gemma3"))
    return model, shard_model(model, mesh)


def test_sharded_leaves_render_with_their_partition_spec(sharded):
    plain, model = sharded
    np.testing.assert_allclose(model(TOKENS), plain(TOKENS), atol=1e-5)
    text = expanded_text(model)
    leaves = leaf_paths(model)
    notes = re.findall(NOTE, text)
    assert len(notes) == len(leaves)
    assert sorted(notes) == sorted(sharding_note(x) for x in leaves.values())
    # Each note belongs to its leaf, after the leaf's dtype and shape.
    spec = jax.sharding.PartitionSpec("model", None, None)
    assert leaves["blocks.0.attn.w_q"].sharding.spec == spec
    assert field_note(text, "w_q", "float32(4, 32, 16)") == (
        "P('model', None, None) over data=2 x model=4")
    assert field_note(text, "embedding", "float32(128, 32)") == (
        "P('model', None) over data=2 x model=4")
    # kv_heads=2 does not divide model=4: the rule keeps the leaf whole.
    assert field_note(text, "w_k", "float32(2, 32, 16)") == "replicated over 8 devices"


def test_one_device_says_nothing_about_sharding():
    model = random_model(tiny_config("gemma2"))
    text = expanded_text(model)
    assert "float32(128, 32)" in text and "# " not in text.replace("# jax.Array", "")


def test_installed_interventions_are_visible(sharded):
    _, model = sharded
    mask = jnp.ones((3, 4)).at[1, 2].set(0.0)
    text = expanded_text(interp.knock_out(model, mask).blocks[1])
    hooks = text[text.index("hooks=SiteHooks("):]
    assert "KnockOut(" in hooks and "site='pattern'" in hooks and "mask=" in hooks
    assert "[1., 1., 0., 1.]" in hooks
    override = interp.override_attention(model, [2], fn=lambda w: w, heads=[0])
    assert "OverridePattern(" in expanded_text(override.blocks[2].hooks)
    assert "OverridePattern(" not in expanded_text(override.blocks[1].hooks)


def test_recorded_activations_name_their_axes(sharded):
    _, model = sharded
    _, cache = interp.capture(model, TOKENS, sites=["pattern", "v"], layers=[0, 2])
    text = expanded_text(cache)
    for key, axes in [("blocks.0.pattern", "batch heads query key"),
                      ("blocks.2.v", "batch seq kv_heads head_dim")]:
        line = next(x for x in text.splitlines() if f"'{key}':" in x)
        assert f"# {axes}" in line and str(cache.arrays[key].shape) in line


def figure_html(figure) -> str:
    return treescope.lowering.render_to_html_as_root(figure.treescope_part, compressed=False)


def test_render_site_labels_axes_and_tokens(sharded):
    _, model = sharded
    _, cache = interp.capture(model, TOKENS, sites=["pattern", "resid_pre"])
    words = [f"w{i}" for i in range(TOKENS.shape[1])]
    html = figure_html(
        render_site(cache.stack("pattern"), "pattern", tokens=words, layers=[0, 1, 2]))
    for label in ("layer", "batch", "heads", "query", "key", "w7"):
        assert label in html
    stream = render_site(cache["resid_pre", 1], "resid_pre", tokens=words)
    assert "seq" in figure_html(stream)
    with pytest.raises(ValueError, match=r"7 labels for axis 'query' of size 8"):
        render_site(cache["pattern", 0], "pattern", tokens=words[:7])
    with pytest.raises(ValueError, match=r"site pattern records arrays \[batch heads query key\]"):
        render_site(cache["pattern", 0][0], "pattern")
    with pytest.raises(ValueError, match="unknown site"):
        render_site(cache["pattern", 0], "patterns")
