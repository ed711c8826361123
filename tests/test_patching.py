"""The patching analyses of `interp.patching` on tiny random models of each family.

References: numpy float64 read-outs of the captured residual stream (direct logit attribution
with the final norm frozen, the logit lens), hand-written loops that patch one unit at a time
with `interp.patch` for the batched sweeps, a hand-written two-step run for path patching, and
the unsharded model for the sharded one. The sites themselves are tested in
tests/test_sites.py, whose tiny models and captures this file shares.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from gemma_eqx.model.weights import leaf_paths
from gemma_eqx.parallel.sharding import LAST_AXIS_RULES, default_mesh, shard_model
from interp import patching as P
from interp.capture import ActivationCache
from interp.install import add_interventions
from interp.interventions import Replace
from test_sites import CLEAN, CORRUPT, FAMILIES, SEQ, captured, model_of, np_rms, site

POSITIONS = [0, 3, 7, 11]
TARGETS = np.asarray([[5, 9, 17, 100], [64, 2, 33, 127]])


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_readout(model, stream):
    """Logits of a residual stream `[batch, k, embed]`: final norm, tied unembedding, soft-cap."""
    config = model.config
    logits = np_rms(stream, model.final_norm.scale, config.norm_eps) @ np.asarray(
        model.embedder.embedding, np.float64).T
    if config.final_logit_softcap is not None:
        logits = config.final_logit_softcap * np.tanh(logits / config.final_logit_softcap)
    return logits


def norm_factor(norm, x, config):
    """What an RMSNorm multiplies `x` by, per position: `(1 + scale) / rms(x)`."""
    return (1 + np.asarray(norm.scale, np.float64)) / np.sqrt(
        np.mean(x * x, axis=-1, keepdims=True) + config.norm_eps)


def at_targets(x):
    """`x[b, j, TARGETS[b, j]]` for `x [batch, len(POSITIONS), vocab]`."""
    return np.take_along_axis(x, TARGETS[..., None], axis=-1)[..., 0]


# ------------------------------------------------------- direct logit attribution, logit lens


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_logit_attribution_adds_up_to_the_models_logit(family):
    model = model_of(family)
    config, layers = model.config, model.config.num_layers
    logits, cache = captured(family, "clean")
    dla = P.direct_logit_attribution(model, CLEAN, jnp.asarray(TARGETS), POSITIONS)
    k = len(POSITIONS)
    assert dla.embed.shape == dla.logit.shape == (2, k)
    assert dla.attn.shape == dla.mlp.shape == (layers, 2, k)
    assert dla.heads.shape == (layers, config.num_heads, 2, k)

    np.testing.assert_allclose(dla.embed + dla.attn.sum(0) + dla.mlp.sum(0), dla.logit,
                               atol=1e-5)
    np.testing.assert_allclose(dla.heads.sum(1), dla.attn, atol=1e-5)
    capped = dla.logit
    if config.final_logit_softcap is not None:
        capped = config.final_logit_softcap * np.tanh(dla.logit / config.final_logit_softcap)
        assert np.abs(capped - dla.logit).max() > 1e-2  # the cap bites
    np.testing.assert_allclose(capped, at_targets(logits[:, POSITIONS]), atol=1e-5)

    # By hand: each component's output times the frozen final-norm factor, read along the
    # target's unembedding row.
    frozen = norm_factor(model.final_norm, site(cache, "final_norm_in")[:, POSITIONS], config)
    read = np.asarray(model.embedder.embedding, np.float64)[TARGETS] * frozen  # [b, k, embed]
    direct = lambda y: np.sum(y[:, POSITIONS] * read, axis=-1)  # noqa: E731
    np.testing.assert_allclose(dla.embed, direct(site(cache, "embed")), atol=1e-5)
    for i, block in enumerate(model.blocks):
        get = functools.partial(site, cache, layer=i)
        np.testing.assert_allclose(dla.mlp[i], direct(get("resid_post") - get("resid_mid")),
                                   atol=1e-5)
        heads = get("head_out")  # [b, s, heads, embed]
        if config.use_post_norms:  # the post-attention norm frozen at its value on attn_out
            heads = heads * norm_factor(block.post_attention_norm, get("attn_out"),
                                        config)[:, :, None]
        for h in range(config.num_heads):
            np.testing.assert_allclose(dla.heads[i, h], direct(heads[:, :, h]), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_reads_each_stream_and_ends_at_the_model(family):
    model = model_of(family)
    logits, cache = captured(family, "clean")
    lens = P.logit_lens(model, CLEAN, jnp.asarray(TARGETS), POSITIONS)
    layers = model.config.num_layers
    assert lens.logprobs.shape == lens.top.shape == (layers + 1, 2, len(POSITIONS))
    own = np_log_softmax(logits[:, POSITIONS].astype(np.float64))
    np.testing.assert_allclose(lens.logprobs[-1], at_targets(own), atol=1e-5)
    np.testing.assert_array_equal(lens.top[-1], own.argmax(-1))
    streams = [site(cache, "embed")] + [site(cache, "resid_post", i) for i in range(layers)]
    for row, stream in enumerate(streams):
        expected = np_log_softmax(np_readout(model, stream[:, POSITIONS]))
        np.testing.assert_allclose(lens.logprobs[row], at_targets(expected), atol=1e-5)
        np.testing.assert_array_equal(lens.top[row], expected.argmax(-1))


# -------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_target_logprobs_equal_the_log_softmax_of_the_logits(family):
    """The vocabulary streamed in chunks (uneven: the last one padded) gives the log-softmax
    and the argmax of the full logits, soft-cap included."""
    model = model_of(family)
    logits, cache = interp.capture(model, CLEAN, sites=["final_norm_out"])
    lp = np_log_softmax(np.asarray(logits, np.float64))
    targets = np.asarray(CLEAN)
    for chunk in (7, model.config.vocab_size, 4096):
        got, argmax = model.target_logprobs(cache["final_norm_out"], jnp.asarray(targets),
                                            chunk=chunk)
        np.testing.assert_allclose(got, np.take_along_axis(lp, targets[..., None], -1)[..., 0],
                                   atol=1e-5)
        np.testing.assert_array_equal(argmax, np.asarray(logits).argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logits_are_those_columns_of_the_logits(family):
    """A few tokens' logits from the final stream equal those columns of the full logits,
    soft-cap included (the study's path analysis reads the ten digits' this way)."""
    model = model_of(family)
    logits, cache = interp.capture(model, CLEAN, sites=["final_norm_out"])
    ids = np.array([5, 0, 9, 5, model.config.vocab_size - 1])
    got = model.token_logits(cache["final_norm_out"], jnp.asarray(ids))
    np.testing.assert_allclose(got, np.asarray(logits)[..., ids], rtol=1e-6, atol=1e-6)
    knocked = interp.scale(model, "logits", 0.5)
    with pytest.raises(ValueError, match="cannot apply the intervention on the logits"):
        knocked.token_logits(cache["final_norm_out"], jnp.asarray(ids))


def test_logit_difference_against_numpy():
    """(`mean_logprob` is checked against numpy in the sweep test.)"""
    family = "gemma2"
    model = model_of(family)
    logits, _ = captured(family, "clean")
    diff = P.logit_difference([5, 9], [7, 8], [2, -1])
    expected = (logits[:, 2, 5] - logits[:, 2, 7] + logits[:, -1, 9] - logits[:, -1, 8]) / 2
    np.testing.assert_allclose(np.asarray(P.evaluate(model, CLEAN, diff)), expected, atol=1e-5)


# ------------------------------------------------------------------------ patching sweeps

SWEEP_FAMILY = "gemma2"


@functools.cache
def sweep_metric():
    return P.mean_logprob(np.asarray(CLEAN)[0, 6:10].tolist(), [5, 6, 7, 8])


@functools.cache
def head_sweep() -> P.PatchingResult:
    """Clean head outputs into the corrupted run, one head at a time (the first sweep of this
    metric in the process, so it compiles its program; shared with the sharded test)."""
    _, clean = captured(SWEEP_FAMILY, "clean")
    return P.activation_patching(model_of(SWEEP_FAMILY), CORRUPT, clean, "head_out",
                                 sweep_metric(), per="layer_head")


def one_at_a_time(site_name, units, unit_weight):
    """The sweep by hand: `interp.patch` of one unit (a one-hot per-unit weight on its layer,
    zero weights on the others: one compiled program for every unit) and `evaluate` of the
    unbatched input, averaged over the rows."""
    model = model_of(SWEEP_FAMILY)
    _, clean = captured(SWEEP_FAMILY, "clean")
    layers = model.config.num_layers
    out = np.zeros((layers, units))
    for layer in range(layers):
        for u in range(units):
            patched = model
            for other in range(layers):
                w = unit_weight(u) * (other == layer)
                patched = interp.patch(patched, clean, site_name, layers=[other],
                                       weight=jnp.asarray(w))
            out[layer, u] = np.mean(np.asarray(P.evaluate(patched, CORRUPT, sweep_metric())))
    return out


def test_activation_patching_sweeps_equal_one_patch_at_a_time():
    model, metric = model_of(SWEEP_FAMILY), sweep_metric()
    targets = np.asarray(CLEAN)[0, 6:10]
    per_row = {}
    for which, tokens in (("clean", CLEAN), ("corrupt", CORRUPT)):
        lp = np_log_softmax(captured(SWEEP_FAMILY, which)[0].astype(np.float64))
        per_row[which] = lp[:, [5, 6, 7, 8], targets].mean(axis=-1)
        np.testing.assert_allclose(np.asarray(P.evaluate(model, tokens, metric)),
                                   per_row[which], atol=1e-5)
    target, source = per_row["corrupt"].mean(), per_row["clean"].mean()

    heads = head_sweep()
    assert heads.compilations == 1
    assert heads.axes == ("layer", "head") and heads.values.shape == (2, 4)
    assert heads.site == "head_out"
    np.testing.assert_allclose([heads.target, heads.source], [target, source], atol=1e-5)
    np.testing.assert_allclose(heads.normalized, (heads.values - target) / (source - target),
                               atol=1e-4)

    def one_head(h):
        w = np.zeros((2, SEQ, 4), np.float32)
        w[:, :, h] = 1
        return w

    np.testing.assert_allclose(heads.values, one_at_a_time("head_out", 4, one_head), atol=1e-5)
    assert np.ptp(heads.values) > 1e-3  # the heads differ: the comparison means something

    before = P.sweep_compilations()
    # 24 patches, 5 per program: 5 programs of one schedule (padded with no-op patches).
    positions = P.activation_patching(model, CORRUPT, CLEAN, "resid_pre", metric,
                                      per="layer_position", chunk=5)
    assert positions.compilations == 1 == P.sweep_compilations() - before
    assert positions.axes == ("layer", "position") and positions.values.shape == (2, SEQ)

    def one_position(p):
        w = np.zeros((2, SEQ), np.float32)
        w[:, p] = 1
        return w

    np.testing.assert_allclose(positions.values, one_at_a_time("resid_pre", SEQ, one_position),
                               atol=1e-5)
    # Positions after the last measured one cannot matter; patching every position of layer 0's
    # input is the clean run, so its positions carry the whole effect between them.
    np.testing.assert_allclose(positions.values[:, 9:], target, atol=1e-5)
    assert np.abs(positions.values[0, :9] - target).max() > 1e-3

    # Another source (a full capture of other tokens): no new program, other results; the
    # source's metric comes from the logits in its cache.
    other_logits, other = interp.capture(model, CLEAN[::-1])
    again = P.activation_patching(model, CORRUPT, other, "resid_pre", metric,
                                  per="layer_position", chunk=5)
    assert again.compilations == 0
    assert np.abs(again.values - positions.values).max() > 1e-3
    lp = np_log_softmax(np.asarray(other_logits, np.float64))
    np.testing.assert_allclose(again.source, lp[:, [5, 6, 7, 8], targets].mean(), atol=1e-5)


def test_path_patching_equals_two_steps_by_hand():
    model, metric = model_of(SWEEP_FAMILY), sweep_metric()
    _, target_run = captured(SWEEP_FAMILY, "corrupt")
    _, source_run = captured(SWEEP_FAMILY, "clean")
    receiver, senders = (1, 2), [(0, 1), (0, 3)]
    result = P.path_patching(model, CORRUPT, CLEAN, [receiver], "v", metric, senders=senders)
    assert result.compilations == 2 and result.axes == ("layer", "head")
    swept = np.zeros((2, 4), bool)
    swept[0, [1, 3]] = True
    assert np.isnan(result.values[~swept]).all() and not np.isnan(result.values[swept]).any()

    for layer, head in senders:
        # 1. every head frozen to the target run, the sender from the source run (a one-hot
        #    weight: one program for both senders); record the values the receiver reads.
        sender = np.zeros((2, SEQ, 4), np.float32)
        sender[:, :, head] = 1
        step1 = interp.patch(model, target_run, "head_out")
        step1 = interp.patch(step1, source_run, "head_out", layers=[layer],
                             weight=jnp.asarray(sender))
        _, recorded = interp.capture(step1, CORRUPT, sites=["v_per_head"], layers=[1])
        # 2. the target run with only the receiver's values replaced.
        step2 = add_interventions(model, {receiver[0]: Replace(
            "v_per_head", value=recorded["v_per_head", 1], heads=(receiver[1],))})
        expected = np.mean(np.asarray(P.evaluate(step2, CORRUPT, metric)))
        np.testing.assert_allclose(result.values[layer, head], expected, atol=1e-5)
    assert np.abs(result.values[swept] - result.target).max() > 1e-4  # the paths carry signal


# ------------------------------------------------------------------------------- sharding


def test_a_model_sharded_over_8_devices_captures_and_patches_like_the_unsharded_one():
    devices = set(jax.devices())
    assert len(devices) == 8
    model = model_of(SWEEP_FAMILY)
    sharded = shard_model(model, default_mesh(), LAST_AXIS_RULES)
    leaves = leaf_paths(sharded)
    assert all(x.sharding.shard_shape(x.shape) != x.shape for x in leaves.values())
    assert {s.device for s in leaves["blocks.0.attn.w_q"].addressable_shards} == devices

    logits, cache = interp.capture(sharded, CLEAN)
    plain_logits, plain = captured(SWEEP_FAMILY, "clean")
    np.testing.assert_allclose(np.asarray(logits), plain_logits, atol=1e-5)
    assert cache.keys() == plain.keys()
    for key in plain.keys():
        np.testing.assert_allclose(np.asarray(cache.arrays[key]), np.asarray(plain.arrays[key]),
                                   atol=1e-5, err_msg=key)

    result = P.activation_patching(sharded, CORRUPT, cache, "head_out", sweep_metric(),
                                   per="layer_head")
    expected = head_sweep()
    np.testing.assert_allclose(result.values, expected.values, atol=1e-5)
    np.testing.assert_allclose([result.target, result.source], [expected.target, expected.source],
                               atol=1e-5)


# ------------------------------------------------------------------------------ bad input


def test_bad_arguments_of_the_analyses_are_refused(typecheck_mode):
    model, metric = model_of("gemma1"), P.mean_logprob([1], [2])
    _, clean = captured("gemma1", "clean")
    sweep = functools.partial(P.activation_patching, model, CORRUPT, clean)
    with pytest.raises(ValueError, match="site resid_pre has no heads"):
        sweep("resid_pre", metric, per="layer_head")
    with pytest.raises(ValueError, match="per must be one of"):
        sweep("head_out", metric, per="head")
    with pytest.raises(ValueError, match="site embed is not on every layer"):
        sweep("embed", metric)
    with pytest.raises(ValueError, match="unknown site 'heads'"):
        sweep("heads", metric)
    with pytest.raises(ValueError, match="metric position index 12 is out of range"):
        sweep("head_out", P.mean_logprob([1], [12]))
    with pytest.raises(ValueError, match="layer index 2 is out of range for 2 layers"):
        sweep("head_out", metric, layers=[2])
    with pytest.raises(TypeError, match="metric"):  # a Metric, not a bare function
        sweep("head_out", lambda logits: logits[:, 0, 0])
    short = ActivationCache({}, model.config, (1, SEQ))
    with pytest.raises(ValueError, match=re.escape(
            "the source was recorded on inputs of shape (1, 12); the target has shape (2, 12)")):
        P.activation_patching(model, CORRUPT, short, "head_out", metric)
    other = captured("gemma2", "clean")[1]
    with pytest.raises(ValueError, match="recorded from a different model"):
        P.activation_patching(model, CORRUPT, other, "head_out", metric)

    with pytest.raises(ValueError, match="via must be 'q', 'k' or 'v'"):
        P.path_patching(model, CORRUPT, CLEAN, [(1, 0)], "o", metric)
    with pytest.raises(ValueError, match="head index 4 is out of range for 4 heads"):
        P.path_patching(model, CORRUPT, CLEAN, [(1, 4)], "q", metric)
    if typecheck_mode == "plain":  # (jaxtyping refuses the mismatched batch first)
        with pytest.raises(ValueError, match=re.escape("source shape (1, 12) differs")):
            P.path_patching(model, CORRUPT, CLEAN[:1], [(1, 0)], "q", metric)
    with pytest.raises(ValueError, match="one target per position"):
        P.mean_logprob([1, 2], [3])
    with pytest.raises(ValueError, match=re.escape("targets must have shape [batch, positions] "
                                                   "= (2, 2); got (2, 3)")):
        P.direct_logit_attribution(model, CLEAN, jnp.zeros((2, 3), jnp.int32), [0, 1])
    with pytest.raises(ValueError, match="position index -13 is out of range"):
        P.logit_lens(model, CLEAN, jnp.zeros((2, 1), jnp.int32), [-13])


def test_patches_that_cannot_change_the_metric_are_not_run_and_score_the_target():
    """A corrupted input that shares its first 4 tokens with the clean one: there every layer's
    activations agree, and positions after the last measured one (8) cannot matter. Those
    patches are skipped; the sweep still equals one patch at a time."""
    model, metric = model_of(SWEEP_FAMILY), sweep_metric()
    corrupt = np.asarray(CORRUPT).copy()
    corrupt[:, :4] = np.asarray(CLEAN)[:, :4]
    corrupt = jnp.asarray(corrupt)
    target = float(np.mean(np.asarray(P.evaluate(model, corrupt, metric))))
    _, clean = captured(SWEEP_FAMILY, "clean")
    layers = model.config.num_layers
    for site_name, per, units in (("resid_pre", "layer_position", SEQ),
                             ("v_per_head", "layer_head_position", 4 * SEQ)):
        swept = P.activation_patching(model, corrupt, CLEAN, site_name, metric, per=per, chunk=7)
        values = swept.values.reshape(layers, -1, SEQ)  # [layer, (head,) position]
        # 4 shared positions and the 3 after position 8, on every layer (and head)
        assert swept.patches_run == layers * (units // SEQ) * (SEQ - 7)
        np.testing.assert_allclose(values[..., :4], target, atol=1e-5)
        np.testing.assert_allclose(values[..., 9:], target, atol=1e-5)
        assert np.abs(values[..., 4:9] - target).max() > 1e-3
        model_patched = []
        checked = ((0, 5), (1, 2), (1, 6)) if units == SEQ else ((0, 5), (1, 2), (1, 3 * SEQ + 6))
        for layer, unit in checked:
            w = np.zeros((2, SEQ) if units == SEQ else (2, SEQ, 4), np.float32)
            if units == SEQ:
                w[:, unit] = 1
            else:
                w[:, unit % SEQ, unit // SEQ] = 1
            patched = interp.patch(model, clean, site_name, layers=[layer], weight=jnp.asarray(w))
            model_patched.append(
                (np.mean(np.asarray(P.evaluate(patched, corrupt, metric))),
                 values.reshape(layers, -1)[layer, unit]))
        np.testing.assert_allclose(*np.asarray(model_patched).T, atol=1e-5)
