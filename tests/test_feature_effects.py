"""Features' effects on the output: direct logit attribution per latent (against numpy and
against the model's own direct logit attribution), logit weights, and ablation sweeps of
latents (against one plain forward per ablation)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import varied_model
from gemma_eqx.model.sites import feature_site
from interp import analyses, patching
from interp.features import HookPoint, SparseDictionary, splice
from interp.features.effects import (
    feature_logit_attribution,
    latent_ablation_sweep,
    logit_weights,
)


@pytest.fixture(scope="module")
def model():
    return varied_model("gemma3")  # post-norms: the frozen post-attention norm matters


@pytest.fixture(scope="module")
def tokens(model):
    return jnp.asarray(np.random.default_rng(3).integers(1, model.config.vocab_size, (2, 11)))


def _sae(model, site, layer, width=24, seed=0):
    rng = np.random.default_rng(seed)
    c = model.config
    d = c.num_heads * c.head_dim if site == "mixed_values_flat" else c.embed_dim
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    point = HookPoint(site, layer)
    return SparseDictionary(
        f32(rng.normal(size=(d, width)) * 0.4), f32(rng.normal(size=width) * 0.2),
        f32(rng.normal(size=(width, d)) * 0.2), f32(rng.normal(size=d) * 0.1),
        f32(np.abs(rng.normal(size=width)) * 0.1), None, "jumprelu", None, point, point,
        name=f"test-{site}")


def _rms_factor(x, norm):
    x = np.asarray(x, np.float64)
    gain = norm.offset + np.asarray(norm.scale, np.float64)
    return gain / np.sqrt((x * x).mean(-1, keepdims=True) + norm.eps)


@pytest.mark.parametrize("site", ["mixed_values_flat", "attn_out_normed", "attn_out"])
def test_direct_effects_of_latents_against_numpy(model, tokens, site):
    layer, positions = 1, [3, 7, 10]
    d = _sae(model, site, layer)
    spliced = splice(model, d)
    targets = np.asarray(tokens)[:, [4, 8, 1]]
    out = feature_logit_attribution(spliced, tokens, targets, positions,
                                    site=feature_site(site), layer=layer)
    # numpy, from recorded activations and the weights
    _, cache = interp.capture(spliced, tokens, sites=[feature_site(site), "attn_out"],
                              layers=[layer])
    _, final = interp.capture(model, tokens, sites=["final_norm_in"])
    acts = np.asarray(cache[feature_site(site), layer], np.float64)[:, positions]
    w_dec = np.asarray(d.w_dec, np.float64)
    if site == "mixed_values_flat":
        w_o = np.asarray(model.blocks[layer].attn.w_o, np.float64)
        w_dec = w_dec @ w_o.reshape(-1, w_o.shape[-1])
    reads = _rms_factor(np.asarray(final["final_norm_in"])[:, positions], model.final_norm)
    reads = reads * np.asarray(model.embedder.output_table, np.float64)[targets]
    if site != "attn_out_normed":  # the post-attention norm, frozen
        reads = reads * _rms_factor(np.asarray(cache["attn_out", layer])[:, positions],
                                    model.blocks[layer].post_attention_norm)
    expected = acts * np.einsum("bkd,ld->bkl", reads, w_dec)
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(out.activations, acts, rtol=1e-5, atol=1e-6)
    # float32 sums over 1024 terms of size ~1 against float64
    np.testing.assert_allclose(out.effects, expected, rtol=1e-4, atol=1e-5)
    # the whole attention update's direct effect is the model's own attribution of it
    dla = patching.direct_logit_attribution(model, tokens, targets, positions)
    np.testing.assert_allclose(out.site_total, dla.attn[layer], rtol=1e-4, atol=1e-4)


def test_latents_that_write_through_the_mlp_have_no_direct_effect(model, tokens):
    d = _sae(model, "mlp_in", 1)
    with pytest.raises(ValueError, match="writes mlp_in, which reaches the logits only through "
                       "the MLP"):
        feature_logit_attribution(splice(model, d), tokens, np.zeros((2, 1), int), [3],
                                  site=feature_site("mlp_in"), layer=1)
    with pytest.raises(ValueError, match="no SAE or transcoder with features "
                       "features@resid_post is spliced into layer 0"):
        feature_logit_attribution(splice(model, d), tokens, np.zeros((2, 1), int), [3],
                                  site=feature_site("resid_post"), layer=0)


def test_logit_weights_fold_the_final_norm_gain(model):
    d = _sae(model, "resid_post", 2)
    weights = logit_weights(model, d, [0, 5])
    gain = model.final_norm.offset + np.asarray(model.final_norm.scale, np.float64)
    table = np.asarray(model.embedder.output_table, np.float64)
    expected = (np.asarray(d.w_dec, np.float64)[[0, 5]] * gain) @ table.T
    # the norm's eps on a unit-RMS stream: a relative 1e-6 shrink
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="latent index 24 is out of range for 24 latents"):
        logit_weights(model, d, [24])


def test_ablation_sweep_equals_one_forward_per_ablation(model, tokens):
    layer, site = 1, feature_site("resid_post")
    d = _sae(model, "resid_post", layer)
    spliced = splice(model, d)
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, 5:] = True
    sets = [[], [3], [0, 7, 11], list(range(d.width))]
    swept = latent_ablation_sweep(spliced, tokens, eval_mask, site, layer, sets)
    assert swept.logprob.shape == (len(sets), 2)
    plain = analyses.knockout_eval(model, tokens, interp.knockout_mask(model), eval_mask)
    # the empty set is the spliced model with its error term: the original model
    np.testing.assert_allclose(swept.logprob[0], plain.logprob, rtol=1e-5)
    for i, chosen in enumerate(sets[1:], 1):
        ablated = interp.ablate(spliced, site, layers=[layer], heads=chosen)
        one = analyses.knockout_eval(ablated, tokens, interp.knockout_mask(model), eval_mask)
        # staged rows run batched with other rows: float32 rounding of a few ulps
        np.testing.assert_allclose(swept.logprob[i], one.logprob, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(swept.accuracy[i], one.accuracy)
    assert not np.allclose(swept.logprob[-1], swept.logprob[0])
    with pytest.raises(ValueError, match="not a feature site"):
        latent_ablation_sweep(spliced, tokens, eval_mask, "resid_post", layer, sets)
