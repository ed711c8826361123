"""Activation sites and patching on the real Gemma 3 270M: the identities the site vocabulary
promises, and the same numbers on the model sharded over 8 simulated devices.

Inputs: clean = BOS + A + A, corrupted = BOS + B + A (A, B random digit strings of 20).
References: the model's own forward (identities), exact sums (heads, direct logit
attribution), the unsharded model (sharding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from gemma_eqx.model.sites import LAYER_SITES, MODEL_SITES
from gemma_eqx.parallel.sharding import DEFAULT_RULES, default_mesh, shard_model
from interp import patching
from interp.analyses import digit_ids

pytestmark = pytest.mark.slow

PERIOD = 20


@pytest.fixture(scope="module")
def inputs(gemma270m):
    _, tokenizer = gemma270m
    ids = np.asarray(digit_ids(tokenizer))
    rng = np.random.default_rng(11)
    a, b = ids[rng.integers(0, 10, PERIOD)], ids[rng.integers(0, 10, PERIOD)]
    bos = [tokenizer.bos_id]
    clean = jnp.asarray([np.concatenate([bos, a, a])], jnp.int32)
    corrupted = jnp.asarray([np.concatenate([bos, b, a])], jnp.int32)
    scored = np.arange(PERIOD + 1, 2 * PERIOD)
    metric = patching.mean_logprob(np.asarray(clean[0])[scored + 1], scored)
    return clean, corrupted, metric


@pytest.fixture(scope="module")
def clean_capture(gemma270m, inputs):
    model, _ = gemma270m
    return interp.capture(model, inputs[0])


def test_patching_every_site_or_nothing(gemma270m, inputs, clean_capture):
    """Every site of every layer patched from clean into corrupted gives the clean logits;
    patching with zero weights gives the corrupted logits."""
    model, _ = gemma270m
    clean, corrupted, _ = inputs
    logits, cache = clean_capture
    np.testing.assert_allclose(logits, model(clean), atol=1e-4)
    everything = model
    for site in LAYER_SITES + MODEL_SITES:
        everything = interp.patch(everything, cache, site)
    got = interp.run(everything, corrupted)
    scale = float(jnp.abs(logits).max())
    assert float(jnp.abs(got - logits).max()) <= 1e-5 * scale
    # The stream alone suffices too: the embedding and every head and MLP output.
    parts = interp.patch(model, cache, "embed")
    for site in ("head_out", "mlp_out"):
        parts = interp.patch(parts, cache, site)
    assert float(jnp.abs(interp.run(parts, corrupted) - logits).max()) <= 1e-4 * scale
    # (Summing per-head outputs instead of one fused contraction rounds differently: 4e-5.)
    nothing = interp.patch(model, cache, "head_out", weight=jnp.zeros((1, clean.shape[1], 4)))
    np.testing.assert_allclose(interp.run(nothing, corrupted), model(corrupted), atol=2e-4,
                               rtol=0)


def test_heads_sum_to_attention_and_logit_attribution_adds_up(gemma270m, inputs,
                                                              clean_capture):
    model, _ = gemma270m
    clean, _, _ = inputs
    logits, cache = clean_capture
    for layer in range(len(model.blocks)):
        np.testing.assert_allclose(cache["head_out", layer].sum(2), cache["attn_out", layer],
                                   atol=2e-4, rtol=1e-5)
    positions = list(range(PERIOD + 1, 2 * PERIOD))
    targets = clean[:, np.asarray(positions) + 1]
    dla = patching.direct_logit_attribution(model, clean, targets, positions)
    total = dla.embed + dla.attn.sum(0) + dla.mlp.sum(0)
    np.testing.assert_allclose(total, dla.logit, atol=1e-3, rtol=1e-5)
    np.testing.assert_allclose(dla.heads.sum(1), dla.attn, atol=1e-3, rtol=1e-5)
    model_logit = np.take_along_axis(np.asarray(logits[:, positions]),
                                     np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(dla.logit, model_logit, atol=1e-3, rtol=1e-5)
    lens = patching.logit_lens(model, clean, targets, positions)
    logprobs = jax.nn.log_softmax(logits[:, positions].astype(jnp.float32))
    expected = np.take_along_axis(np.asarray(logprobs), np.asarray(targets)[..., None],
                                  -1)[..., 0]
    np.testing.assert_allclose(lens.logprobs[-1], expected, atol=1e-4)
    # Early layers know little of the answer; the induction heads (layers 5-11) bring it.
    assert lens.logprobs[3].mean() < lens.logprobs[-1].mean() - 2


def test_sharded_model_gives_the_same_sites(gemma270m, inputs, clean_capture):
    model, _ = gemma270m
    clean, _, _ = inputs
    sharded = shard_model(model, default_mesh(), DEFAULT_RULES)
    _, cache = interp.capture(sharded, clean, sites=["v_per_head", "head_out", "resid_post"])
    for key in cache.keys():
        # Sharded contractions add in another order: relative to each array's scale (the
        # residual stream reaches a few hundred).
        ours, plain = np.asarray(cache.arrays[key]), np.asarray(clean_capture[1].arrays[key])
        assert np.abs(ours - plain).max() <= 1e-4 * np.abs(plain).max(), key
    # (The sweep on a sharded model: tests/test_patching.py, on tiny models of each family.)
