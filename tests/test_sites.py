"""Named activation sites (`gemma_eqx.model.sites`) and the interventions on them
(`interp.interventions`), on tiny random models of each family.

References: a numpy float64 re-implementation of every block (each attention and MLP site),
exact identities of the residual stream (patching everything the stream carries restores the
source run, zero weights change nothing), the weights themselves (a head's output zeroed or
scaled through its `w_o`), the analytic Jacobian of the MLP for `Linearized`, finite differences
for gradients and a trace counter for jit reuse. The patching analyses built on the sites are
tested in tests/test_patching.py.
"""

from __future__ import annotations

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import VOCAB, random_arrays, tiny_config
from gemma_eqx.core.checks import NonFiniteError
from gemma_eqx.model.sites import LAYER_SITES, MODEL_SITES, SITES
from gemma_eqx.model.weights import leaf_paths, model_from_arrays
from interp.capture import ActivationCache
from interp.install import add_interventions, clear_interventions, installed, intervene
from interp.interventions import Linearized, Record, Replace, Rewire, Scale

SEQ = 12  # longer than the window (8) of the local layers, so the window bites
FAMILIES = ("gemma1", "gemma2", "gemma3")
# Gemma 2 with soft-caps small enough to bite on random weights; Gemma 3 with a global RoPE scale
# (as in the 4B and larger models), so the reference checks both.
CONFIGS = {
    "gemma1": tiny_config("gemma1"),
    "gemma2": tiny_config("gemma2").replace(attn_logit_softcap=5.0, final_logit_softcap=5.0),
    "gemma3": tiny_config("gemma3").replace(global_rope_scale=8.0),
}
_rng = np.random.RandomState(0)
CLEAN = jnp.asarray(_rng.randint(0, VOCAB, (2, SEQ)), jnp.int32)
CORRUPT = jnp.asarray(_rng.randint(0, VOCAB, (2, SEQ)), jnp.int32)
MASKED = -1e30  # attention logits of masked keys are a large negative number, below this


@functools.cache
def model_of(family: str):
    """`factories.random_model`'s weights, norm scales included (drawn with numpy: quicker
    than `varied_model`), without the finiteness check (a compiled program per config)."""
    arrays = {p: jnp.asarray(a) for p, a in random_arrays(CONFIGS[family]).items()}
    return model_from_arrays(CONFIGS[family], arrays, check_finite=False)


@functools.cache
def captured(family: str, which: str):
    """`(logits, cache)` of every site of the clean or corrupted input, as numpy and cache."""
    logits, cache = interp.capture(model_of(family), CLEAN if which == "clean" else CORRUPT)
    return np.asarray(logits), cache


@eqx.filter_jit
def forward(model, tokens):
    """The plain forward pass, jitted (eager would compile every op)."""
    return model(tokens)


def site(cache, name, layer=None) -> np.ndarray:
    return np.asarray(cache[name] if layer is None else cache[name, layer], np.float64)


# ------------------------------------------------------------------- numpy float64 reference


def np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1 + np.asarray(scale))


def np_rope(x, base, scale):
    """Split-half RoPE at positions 0..seq-1 of `x [batch, seq, heads, head_dim]`."""
    half = x.shape[-1] // 2
    timescale = base ** (2 * np.arange(half) / x.shape[-1])
    angles = np.arange(x.shape[1])[None, :, None, None] / scale / timescale
    sin, cos = np.sin(angles), np.cos(angles)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def np_gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def np_gelu_grad(z):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_allowed(config, layer, seq=SEQ):
    """`[query, key]`: causal, and inside the window on local layers."""
    delta = np.arange(seq)[:, None] - np.arange(seq)[None, :]
    allowed = delta >= 0
    if config.attention_kinds[layer] == "local":
        allowed &= delta < config.sliding_window
    return allowed


def np_weights(block):
    return {name: np.asarray(leaf, np.float64) for name, leaf in leaf_paths(block).items()}


def np_block(config, block, layer, x):
    """Every site of block `layer` from its input `x` (`resid_pre`), written from the Gemma
    papers' description, not from `modules.py`."""
    w = np_weights(block)
    eps, group = config.norm_eps, config.num_heads // config.num_kv_heads
    local = config.attention_kinds[layer] == "local"
    base = config.local_rope_base if local else config.global_rope_base
    rope_scale = 1.0 if local else config.global_rope_scale
    out = {"resid_pre": x}
    h = np_rms(x, w["pre_attention_norm.scale"], eps)
    q = np.einsum("bsd,ndh->bsnh", h, w["attn.w_q"])
    k = np.einsum("bsd,kdh->bskh", h, w["attn.w_k"])
    v = np.einsum("bsd,kdh->bskh", h, w["attn.w_v"])
    if config.use_qk_norm:
        q = np_rms(q, w["attn.query_norm.scale"], eps)
        k = np_rms(k, w["attn.key_norm.scale"], eps)
    out["q"], out["k"], out["v"] = np_rope(q, base, rope_scale), np_rope(k, base, rope_scale), v
    out["k_per_head"] = np.repeat(out["k"], group, axis=2)
    out["v_per_head"] = np.repeat(v, group, axis=2)
    scores = np.einsum("bsnh,btnh->bnst", out["q"] * config.query_pre_attn_scalar**-0.5,
                       out["k_per_head"])
    if config.attn_logit_softcap is not None:
        scores = config.attn_logit_softcap * np.tanh(scores / config.attn_logit_softcap)
    allowed = np_allowed(config, layer)
    out["attn_logits"] = np.where(allowed, scores, -np.inf)
    out["pattern"] = np_softmax(out["attn_logits"])
    out["mixed_values"] = np.einsum("bnst,btnh->bsnh", out["pattern"], out["v_per_head"])
    out["head_out"] = np.einsum("bsnh,nhd->bsnd", out["mixed_values"], w["attn.w_o"])
    out["attn_out"] = out["head_out"].sum(axis=2)
    update = out["attn_out"]
    if config.use_post_norms:
        update = np_rms(update, w["post_attention_norm.scale"], eps)
    out["resid_mid"] = x + update
    h = np_rms(out["resid_mid"], w["pre_ffw_norm.scale"], eps)
    gate, up = np.einsum("bsd,df->bsf", h, w["mlp.w_gating"][0]), h @ w["mlp.w_gating"][1]
    out["mlp_hidden"] = np_gelu(gate) * up
    out["mlp_out"] = out["mlp_hidden"] @ w["mlp.w_linear"]
    update = out["mlp_out"]
    if config.use_post_norms:
        update = np_rms(update, w["post_ffw_norm.scale"], eps)
    out["resid_post"] = out["resid_mid"] + update
    return out


# ------------------------------------------------------------------------- 1. identities


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_the_model_and_the_site_table(family):
    model = model_of(family)
    config, layers = model.config, range(model.config.num_layers)
    logits, cache = captured(family, "clean")
    np.testing.assert_allclose(logits, np.asarray(forward(model, CLEAN)), atol=1e-5)

    # Every site of every layer is recorded, with the axes the table gives it.
    sizes = dict(batch=2, seq=SEQ, query=SEQ, key=SEQ, embed=config.embed_dim,
                 heads=config.num_heads, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                 mlp=config.hidden_dim, vocab=config.vocab_size,
                 heads_x_head_dim=config.num_heads * config.head_dim)
    assert set(cache.keys()) == set(MODEL_SITES) | {
        f"blocks.{i}.{s}" for i in layers for s in LAYER_SITES}
    for key in cache.keys():
        name = key.split(".")[-1]
        assert cache.arrays[key].shape == tuple(sizes[a] for a in SITES[name].axes), key
    assert cache.stack("pattern").shape == (len(layers), 2, 4, SEQ, SEQ)

    # The stream is continuous from one site to the next.
    np.testing.assert_array_equal(site(cache, "embed"), site(cache, "resid_pre", 0))
    for i in layers[:-1]:
        np.testing.assert_array_equal(site(cache, "resid_post", i), site(cache, "resid_pre", i + 1))
    np.testing.assert_array_equal(site(cache, "final_norm_in"),
                                  site(cache, "resid_post", layers[-1]))
    final = np_rms(site(cache, "final_norm_in"), model.final_norm.scale, config.norm_eps)
    np.testing.assert_allclose(site(cache, "final_norm_out"), final, atol=1e-5)
    raw = final @ np.asarray(model.embedder.embedding, np.float64).T
    if config.final_logit_softcap is not None:
        raw = config.final_logit_softcap * np.tanh(raw / config.final_logit_softcap)
    np.testing.assert_allclose(site(cache, "logits"), raw, atol=1e-4)
    np.testing.assert_array_equal(site(cache, "logits"), logits)

    group = config.num_heads // config.num_kv_heads
    for i, block in enumerate(model.blocks):
        get = functools.partial(site, cache, layer=i)
        # heads add up to the attention output; the stream adds each sublayer's update
        np.testing.assert_allclose(get("head_out").sum(axis=2), get("attn_out"), atol=1e-5)
        attn, mlp = get("attn_out"), get("mlp_out")
        if config.use_post_norms:
            attn = np_rms(attn, block.post_attention_norm.scale, config.norm_eps)
            mlp = np_rms(mlp, block.post_ffw_norm.scale, config.norm_eps)
        np.testing.assert_allclose(get("resid_mid") - get("resid_pre"), attn, atol=1e-5)
        np.testing.assert_allclose(get("resid_post") - get("resid_mid"), mlp, atol=1e-5)
        # the sites of Gemma Scope's hook points: after the post-norms, the MLP's normed input,
        # the output projection's input
        np.testing.assert_allclose(get("attn_out_normed"), attn, atol=1e-5)
        np.testing.assert_allclose(get("mlp_out_normed"), mlp, atol=1e-5)
        np.testing.assert_allclose(
            get("mlp_in"), np_rms(get("resid_mid"), block.pre_ffw_norm.scale, config.norm_eps),
            atol=1e-5)
        np.testing.assert_array_equal(get("mixed_values_flat"),
                                      get("mixed_values").reshape(2, SEQ, -1))
        # the pattern is the softmax of the logits; each query head reads its group's k and v
        np.testing.assert_allclose(get("pattern"), np_softmax(get("attn_logits")), atol=1e-6)
        np.testing.assert_array_equal(get("k_per_head"), np.repeat(get("k"), group, axis=2))
        np.testing.assert_array_equal(get("v_per_head"), np.repeat(get("v"), group, axis=2))
        w_o = np.asarray(block.attn.w_o, np.float64)
        np.testing.assert_allclose(np.einsum("bsnh,nhd->bsnd", get("mixed_values"), w_o),
                                   get("head_out"), atol=1e-5)
        np.testing.assert_allclose(get("mlp_hidden") @ np.asarray(block.mlp.w_linear),
                                   get("mlp_out"), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_what_the_stream_carries_restores_the_source_run(family):
    """Clean values patched into the corrupted run with per-unit weights: all ones on the
    embedding and every head and MLP output, or on resid_pre of layer 0, or on resid_post of the
    last layer, give the clean logits; all zeros give the corrupted logits, whatever the patch
    values (`(1 - 0) x + 0 v` is `x` bit for bit). One compiled program serves every choice of
    weights and values."""
    model = model_of(family)
    clean_logits, clean = captured(family, "clean")
    corrupt_logits, _ = captured(family, "corrupt")
    units, heads = (2, SEQ), (2, SEQ, model.config.num_heads)
    traces = []

    @eqx.filter_jit
    def run(patched, tokens):
        traces.append(1)
        return patched(tokens)

    def patched_logits(embed=0.0, head=0.0, mlp=0.0, pre0=0.0, post_last=0.0, source=clean):
        full = lambda shape, value: jnp.full(shape, value, jnp.float32)  # noqa: E731
        m = interp.patch(model, source, "embed", weight=full(units, embed))
        m = interp.patch(m, source, "head_out", weight=full(heads, head))
        m = interp.patch(m, source, "mlp_out", weight=full(units, mlp))
        m = interp.patch(m, source, "resid_pre", layers=[0], weight=full(units, pre0))
        m = interp.patch(m, source, "resid_post", layers=[-1], weight=full(units, post_last))
        return np.asarray(run(m, CORRUPT))

    unpatched = patched_logits()
    np.testing.assert_allclose(unpatched, corrupt_logits, atol=1e-5)
    other = interp.capture(model, CLEAN[::-1])[1]  # other values, the same program
    np.testing.assert_array_equal(patched_logits(source=other), unpatched)
    np.testing.assert_allclose(patched_logits(embed=1, head=1, mlp=1), clean_logits, atol=1e-5)
    np.testing.assert_allclose(patched_logits(pre0=1), clean_logits, atol=1e-5)
    np.testing.assert_allclose(patched_logits(post_last=1), clean_logits, atol=1e-5)
    # Without the embedding the corrupted tokens stay in the stream: not restored.
    assert np.abs(patched_logits(head=1, mlp=1) - clean_logits).max() > 1e-2
    assert len(traces) == 1
    assert np.abs(clean_logits - corrupt_logits).max() > 1e-1


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_match_a_numpy_reference_of_each_block(family):
    model = model_of(family)
    config = model.config
    _, cache = captured(family, "clean")
    embedding = np.asarray(model.embedder.embedding, np.float64)
    np.testing.assert_allclose(site(cache, "embed"),
                               embedding[np.asarray(CLEAN)] * np.sqrt(config.embed_dim),
                               rtol=1e-6)
    for i, block in enumerate(model.blocks):
        ref = np_block(config, block, i, site(cache, "resid_pre", i))
        allowed = np_allowed(config, i)
        for name, expected in ref.items():
            got = site(cache, name, i)
            if name == "attn_logits":
                assert (got[:, :, ~allowed] < MASKED).all()
                got, expected = got[:, :, allowed], expected[:, :, allowed]
            scale = max(1.0, np.abs(expected).max())
            np.testing.assert_allclose(got, expected, atol=2e-5 * scale, rtol=1e-4,
                                       err_msg=f"{family} layer {i} site {name}")
        # The window bites on local layers: a query 8 or more positions later reads nothing.
        if config.attention_kinds[i] == "local":
            assert (site(cache, "pattern", i)[:, :, SEQ - 1, : SEQ - 8] == 0).all()


# ----------------------------------------------------------------- 3. grouped-query heads


def test_per_query_head_sites_edit_one_head_of_a_kv_group():
    """4 query heads share 2 kv heads (groups {0, 1} and {2, 3}). Patching one query head's
    copy of the values (or keys) changes that head only; patching the kv head changes its
    whole group. The changed heads match a reference from the clean and corrupted sites."""
    family, layer = "gemma1", 1
    model = model_of(family)
    scale = model.config.query_pre_attn_scalar**-0.5
    _, clean = captured(family, "clean")
    _, corrupt = captured(family, "corrupt")
    get = lambda cache, name: site(cache, name, layer)  # noqa: E731
    base_mixed, base_pattern = get(corrupt, "mixed_values"), get(corrupt, "pattern")

    def run(patched):
        _, cache = interp.capture(patched, CORRUPT, sites=["pattern", "mixed_values"],
                                  layers=[layer])
        return get(cache, "pattern"), get(cache, "mixed_values")

    def changed(new, old, axis):
        diff = np.abs(new - old).max(axis=tuple(a for a in range(new.ndim) if a != axis))
        assert ((diff < 1e-4) | (diff > 1e-2)).all()  # rounding, or a real change
        return set(np.flatnonzero(diff > 1e-2).tolist())

    # v_per_head of query head 1: head 1 mixes the clean values of kv head 0, head 0 does not.
    pattern, mixed = run(interp.patch(model, clean, "v_per_head", layers=[layer], heads=[1]))
    assert changed(mixed, base_mixed, axis=2) == {1}
    assert changed(pattern, base_pattern, axis=1) == set()
    np.testing.assert_allclose(mixed[:, :, 1], np.einsum(
        "bqk,bkd->bqd", base_pattern[:, 1], get(clean, "v")[:, :, 0]), atol=1e-5)

    # k_per_head of query head 2: only head 2 attends with the clean keys of kv head 1.
    pattern, mixed = run(interp.patch(model, clean, "k_per_head", layers=[layer], heads=[2]))
    assert changed(pattern, base_pattern, axis=1) == {2}
    assert changed(mixed, base_mixed, axis=2) == {2}
    logits = np.einsum("bqh,bkh->bqk", get(corrupt, "q")[:, :, 2] * scale,
                       get(clean, "k")[:, :, 1])
    expected = np_softmax(np.where(np_allowed(model.config, layer), logits, -np.inf))
    np.testing.assert_allclose(pattern[:, 2], expected, atol=1e-5)

    # v of kv head 0: both heads of group 0 change, group 1 does not.
    pattern, mixed = run(interp.patch(model, clean, "v", layers=[layer], heads=[0]))
    assert changed(mixed, base_mixed, axis=2) == {0, 1}
    for h in (0, 1):
        np.testing.assert_allclose(mixed[:, :, h], np.einsum(
            "bqk,bkd->bqd", base_pattern[:, h], get(clean, "v")[:, :, 0]), atol=1e-5)


def test_per_unit_weights_follow_each_sites_axis_order():
    """`pattern` is `batch heads query key` (heads before the unit's seq axis) and
    `k_per_head` is `batch key heads head_dim`: a weight on unit (row, seq, head) lands on that
    row, query (key) and head only."""
    family, layer = "gemma1", 1
    model = model_of(family)
    _, clean = captured(family, "clean")
    _, corrupt = captured(family, "corrupt")
    on_pattern, on_keys = np.zeros((2, SEQ, 4), np.float32), np.zeros((2, SEQ, 4), np.float32)
    on_pattern[0, 5, 2] = 1  # row 0, query 5, head 2
    on_keys[1, 3, 0] = 1  # row 1, key 3, head 0: row 0 is left alone
    m = interp.patch(model, clean, "k_per_head", layers=[layer], weight=jnp.asarray(on_keys))
    m = interp.patch(m, clean, "pattern", layers=[layer], weight=jnp.asarray(on_pattern))
    _, got = interp.capture(m, CORRUPT, sites=["pattern", "k_per_head"], layers=[layer])
    get = functools.partial(site, layer=layer)
    keys, expected = get(got, "k_per_head"), get(corrupt, "k_per_head").copy()
    expected[1, 3, 0] = get(clean, "k_per_head")[1, 3, 0]
    np.testing.assert_allclose(keys, expected, atol=1e-5)
    pattern, expected = get(got, "pattern"), get(corrupt, "pattern").copy()
    expected[0, 2, 5] = get(clean, "pattern")[0, 2, 5]
    np.testing.assert_allclose(pattern[0], expected[0], atol=1e-5)
    # In row 1 only head 0 reads the new key 3, from query 3 on.
    np.testing.assert_allclose(pattern[1, 1:], expected[1, 1:], atol=1e-5)
    np.testing.assert_allclose(pattern[1, 0, :3], expected[1, 0, :3], atol=1e-5)
    assert (np.abs(pattern[1, 0, 3:] - expected[1, 0, 3:]).max(axis=-1) > 1e-3).all()


# ------------------------------------------------------------------------ 4. interventions


def test_record_filters_heads_and_positions():
    family = "gemma1"
    model = model_of(family)
    _, full = captured(family, "clean")
    names = ["resid_pre", "pattern", "head_out", "k_per_head", "v", "logits"]
    heads, positions = [1, 0], [-1, 3]
    _, cache = interp.capture(model, CLEAN, sites=names, layers=[1], heads=heads,
                              positions=positions)
    p = [SEQ - 1, 3]
    assert cache.layers("pattern") == [1] and "pattern" not in cache.keys()
    assert ("pattern", 0) not in cache and ("pattern", 1) in cache
    for layer in (1,):
        get = functools.partial(site, layer=layer)
        assert cache["head_out", layer].shape == (2, 2, 2, model.config.embed_dim)
        same = functools.partial(np.testing.assert_allclose, atol=1e-5)  # another program
        same(get(cache, "resid_pre"), get(full, "resid_pre")[:, p])
        same(get(cache, "pattern"), get(full, "pattern")[:, heads][:, :, p])
        same(get(cache, "head_out"), get(full, "head_out")[:, p][:, :, heads])
        same(get(cache, "k_per_head"), get(full, "k_per_head")[:, p][:, :, heads])
        same(get(cache, "v"), get(full, "v")[:, p])  # query-head filters keep k, v whole
    np.testing.assert_allclose(site(cache, "logits"), site(full, "logits")[:, p], atol=1e-5)
    filtered = full.filter(sites=["v"], layers=[0])
    assert filtered.keys() == ["blocks.0.v"]


def test_zero_ablation_and_scaling_of_a_head_equal_editing_its_output_weights():
    """A head's output is `mixed_values[h] @ w_o[h]`: ablating it equals zeroing `w_o[h]`,
    scaling it by 3 (a per-unit factor, or `apply_fn`) equals `3 * w_o[h]`."""
    family, layer, head = "gemma1", 1, 2
    model = model_of(family)

    def with_w_o(factor):
        w_o = np.array(model.blocks[layer].attn.w_o)
        w_o[head] *= factor
        return eqx.tree_at(lambda m: m.blocks[layer].attn.w_o, model, jnp.asarray(w_o))

    def logits(m):
        return np.asarray(interp.run(m, CORRUPT))

    zeroed = np.asarray(forward(with_w_o(0.0), CORRUPT))
    tripled = np.asarray(forward(with_w_o(3.0), CORRUPT))
    assert np.abs(zeroed - captured(family, "corrupt")[0]).max() > 1e-3
    ablated = logits(interp.ablate(model, "head_out", layers=[layer], heads=[head]))
    np.testing.assert_allclose(ablated, zeroed, atol=1e-5)
    applied = interp.apply_fn(model, "head_out", lambda x: 3 * x, layers=[layer], heads=[head])
    np.testing.assert_allclose(logits(applied), tripled, atol=1e-5)
    # Per-unit factors (one per row, position and head): 0 or 3 on the head, 1 elsewhere.
    for value, expected in ((0.0, zeroed), (3.0, tripled)):
        factor = np.ones((2, SEQ, 4), np.float32)
        factor[:, :, head] = value
        per_unit = interp.scale(model, "head_out", jnp.asarray(factor), layers=[layer])
        np.testing.assert_allclose(logits(per_unit), expected, atol=1e-5)


def test_zero_ablated_attention_scores_stay_masked():
    """Zero scores give uniform attention over the keys a query may read (earlier positions
    inside the window), never over later tokens: an intervention cannot unmask a key."""
    family, layer = "gemma2", 0  # a local layer: the window bites too
    model = model_of(family)
    ablated = interp.ablate(model, "attn_logits", layers=[layer])
    _, cache = interp.capture(ablated, CLEAN, sites=["pattern"], layers=[layer])
    allowed = np_allowed(model.config, layer)
    expected = np.broadcast_to(allowed / allowed.sum(-1, keepdims=True), (2, 4, SEQ, SEQ))
    np.testing.assert_allclose(site(cache, "pattern", layer), expected, atol=1e-6)


def test_mean_and_resample_ablation():
    family, layer = "gemma1", 1
    model = model_of(family)
    _, clean = captured(family, "clean")
    _, reference = captured(family, "corrupt")
    ref = site(reference, "resid_mid", layer)

    def recorded(m):
        m = intervene(m, Record("resid_mid"), layers=[layer])
        return site(interp.run_with_records(m, CLEAN)[1], "resid_mid", layer)

    got = recorded(interp.ablate(model, "resid_mid", layers=[layer], positions=[2, 7],
                                 how="mean", reference=reference))
    expected = site(clean, "resid_mid", layer).copy()
    expected[:, [2, 7]] = (ref[0, [2, 7]] + ref[1, [2, 7]]) / 2  # per position, over the batch
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # Resampling: every row takes one reference row, each reference row used once.
    perms = []
    for seed in range(8):
        got = recorded(interp.ablate(model, "resid_mid", layers=[layer], how="resample",
                                     reference=reference, key=jax.random.key(seed)))
        perm = [int(np.argmin(np.abs(ref - row).max(axis=(1, 2)))) for row in got]
        np.testing.assert_allclose(got, ref[perm], atol=1e-5)
        assert sorted(perm) == [0, 1]
        perms.append(perm)
    assert [1, 0] in perms and [0, 1] in perms  # some keys swap the rows, some do not


def test_gradients_reach_per_unit_factors_and_weights():
    """`jax.grad` of one log-prob with respect to a per-unit `Scale.factor` and a per-unit
    `Replace.weight` matches central finite differences; units after the predicting position
    and of the other batch row get exactly zero."""
    family, position, target = "gemma1", 5, 17
    model = model_of(family)
    _, clean = captured(family, "clean")
    base = interp.scale(model, "head_out", jnp.ones((2, SEQ, 4)), layers=[1])
    base = interp.patch(base, clean, "resid_mid", layers=[0], weight=jnp.full((2, SEQ), 0.5))
    where = lambda m: (m.blocks[1].hooks.interventions[0].factor,  # noqa: E731
                       m.blocks[0].hooks.interventions[0].weight)

    @eqx.filter_jit
    def value_and_grad(leaves):
        def f(leaves):
            logits = eqx.tree_at(where, base, leaves).forward(CORRUPT, check_ids=False).logits
            return jax.nn.log_softmax(logits[0, position])[target]

        return jax.value_and_grad(f)(leaves)

    leaves = tuple(np.asarray(x) for x in where(base))
    _, grads = value_and_grad(tuple(jnp.asarray(x) for x in leaves))
    eps, rng = 1e-2, np.random.RandomState(1)
    for k, (leaf, grad, unit) in enumerate(zip(leaves, grads, [(0, 3, 1), (0, 2)], strict=True)):
        grad = np.asarray(grad)
        assert (grad[1] == 0).all() and (grad[0, position + 1:] == 0).all()
        assert np.abs(grad[0, position]).max() > 1e-3
        one_unit = np.zeros(leaf.shape, np.float32)
        one_unit[unit] = 1
        for d in (one_unit, rng.randn(*leaf.shape).astype(np.float32)):
            def at(step, k=k, d=d):
                moved = [jnp.asarray(x) for x in leaves]
                moved[k] = jnp.asarray(leaves[k] + step * d)
                return float(value_and_grad(tuple(moved))[0])

            np.testing.assert_allclose((at(eps) - at(-eps)) / (2 * eps), float((grad * d).sum()),
                                       rtol=2e-2, atol=2e-4)


def test_rewire_reads_another_row():
    family = "gemma1"
    model = model_of(family)
    clean_logits, clean = captured(family, "clean")
    heads_out = site(clean, "head_out", 1)

    def run(first, second):
        m = intervene(model, Rewire("resid_pre", source=jnp.asarray(first)), layers=[0])
        m = intervene(m, Rewire("head_out", source=jnp.asarray(second), heads=(2,)), layers=[1])
        m = intervene(m, Record("head_out"), layers=[1])
        logits, cache = interp.run_with_records(m, CLEAN)
        return np.asarray(logits), site(cache, "head_out", 1)

    # The whole input of row i read from row source[i]: the rows swap.
    logits, recorded = run([1, 0], [0, 1])
    np.testing.assert_allclose(logits, clean_logits[[1, 0]], atol=1e-5)
    np.testing.assert_allclose(recorded, heads_out[[1, 0]], atol=1e-5)
    # Head 2 of layer 1 in row 0 read from row 1; everything else is the row's own.
    logits, recorded = run([0, 1], [1, 1])
    expected = heads_out.copy()
    expected[0, :, 2] = heads_out[1, :, 2]
    np.testing.assert_allclose(recorded, expected, atol=1e-5)
    np.testing.assert_allclose(logits[1], clean_logits[1], atol=1e-5)
    assert np.abs(logits[0] - clean_logits[0]).max() > 1e-3


def test_linearized_mlp_is_exact_at_its_point_and_first_order_elsewhere():
    family, layer = "gemma1", 1
    model = model_of(family)
    clean_logits, clean = captured(family, "clean")
    mlp = model.blocks[layer].mlp

    def run(around, at):
        lin = Linearized(mlp, jnp.asarray(around), jnp.asarray(at))
        m = eqx.tree_at(lambda m: m.blocks[layer].mlp, model, lin)
        logits, cache = interp.run_with_records(
            intervene(m, Record("mlp_out"), layers=[layer]), CLEAN)
        return np.asarray(logits), site(cache, "mlp_out", layer)

    logits, _ = run([0, 1], [0, 1])
    np.testing.assert_allclose(logits, clean_logits, atol=1e-5)

    # Row i: f(x[around[i]]) + J_f(x[around[i]]) (x[at[i]] - x[around[i]]), by hand.
    _, out = run([1, 0], [0, 1])
    x = np_rms(site(clean, "resid_mid", layer), model.blocks[layer].pre_ffw_norm.scale,
               model.config.norm_eps)
    w = np_weights(model.blocks[layer])
    w_gate, w_up, w_down = w["mlp.w_gating"][0], w["mlp.w_gating"][1], w["mlp.w_linear"]
    a, b = x[[1, 0]], x
    gate, up = a @ w_gate, a @ w_up
    tangent_gate, tangent_up = (b - a) @ w_gate, (b - a) @ w_up
    primal = (np_gelu(gate) * up) @ w_down
    tangent = (np_gelu_grad(gate) * tangent_gate * up + np_gelu(gate) * tangent_up) @ w_down
    np.testing.assert_allclose(out, primal + tangent, atol=2e-5)
    exact = site(clean, "mlp_out", layer)
    assert np.abs(out - exact).max() > 1e-3  # the MLP is not linear: first order differs


def test_new_values_do_not_retrace_and_the_original_is_untouched():
    family = "gemma1"
    model = model_of(family)
    _, clean = captured(family, "clean")
    _, corrupt = captured(family, "corrupt")
    before = {path: leaf for path, leaf in leaf_paths(model).items()}
    traces = []

    @eqx.filter_jit
    def run(m, tokens):
        traces.append(1)
        return m(tokens)

    outputs = []
    for source, factor, rows in ((clean, 0.5, [1, 0]), (corrupt, 2.0, [0, 0])):
        m = interp.patch(model, source, "head_out", layers=[1], heads=[2])
        m = interp.scale(m, "v", factor, layers=[0])
        m = intervene(m, Rewire("mlp_out", source=jnp.asarray(rows)), layers=[1])
        outputs.append(np.asarray(run(m, CORRUPT)))
    assert len(traces) == 1
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-3

    # The original holds no interventions; the new model shares its weights (same objects).
    assert installed(model) == [] and model.hooks.interventions == ()
    assert [(layer, type(i).__name__, i.site) for layer, i in installed(m)] == [
        (0, "Scale", "v"), (1, "Replace", "head_out"), (1, "Rewire", "mlp_out")]
    ours, theirs = leaf_paths(model), leaf_paths(m)
    assert set(ours) < set(theirs) and ours.keys() == before.keys()
    for path, leaf in ours.items():
        assert theirs[path] is leaf is before[path], path
    cleared = clear_interventions(m)
    assert installed(cleared) == []
    for path, leaf in leaf_paths(cleared).items():
        assert leaf is before[path], path
    assert [type(i).__name__ for _, i in installed(clear_interventions(m, ["v"]))] == [
        "Replace", "Rewire"]
    np.testing.assert_array_equal(np.asarray(forward(cleared, CORRUPT)),
                                  np.asarray(forward(model, CORRUPT)))


def test_interventions_act_in_order_and_a_record_shows_what_the_layer_used():
    family, layer = "gemma1", 0
    model = model_of(family)
    _, clean = captured(family, "clean")
    m = intervene(model, Record("v"), layers=[layer])
    m = interp.scale(m, "v", 2.0, layers=[layer])
    m = add_interventions(m, {layer: Scale("v", factor=jnp.asarray(3.0), heads=(1,))})
    assert [type(i).__name__ for _, i in installed(m)] == ["Scale", "Scale", "Record"]
    _, cache = interp.run_with_records(m, CLEAN)
    expected = 2 * site(clean, "v", layer)
    expected[:, :, 1] *= 3
    np.testing.assert_allclose(site(cache, "v", layer), expected, rtol=1e-6)
    # A predicate picks layers by their attention: the local layers of Gemma 3.
    g3 = model_of("gemma3")
    local = interp.intervene(g3, Record("v"), layers=lambda i, attn: attn.sliding_window)
    assert [layer for layer, _ in installed(local)] == [0, 1]


# -------------------------------------------------------------------------- 7. bad input


def test_bad_input_is_refused_with_a_clear_message(typecheck_mode):
    family = "gemma1"
    model = model_of(family)
    _, clean = captured(family, "clean")

    with pytest.raises(ValueError, match="unknown site 'resid'; valid sites are: embed, "
                                         "resid_pre, q, k, v, k_per_head"):
        interp.capture(model, CLEAN, sites=["resid"])
    with pytest.raises(ValueError, match="unknown site 'attn'"):
        interp.patch(model, clean, "attn")
    with pytest.raises(ValueError, match="unknown site 'nope'"):
        intervene(model, Record("nope"))

    # A patch recorded on another input shape, or a filtered record, is not the site's shape.
    with pytest.raises(ValueError, match=re.escape(
            "a patch for site resid_pre of layer 0 must have shape [batch seq embed] = "
            "(1, 12, 32); got (2, 12, 32)")):
        interp.run(interp.patch(model, clean, "resid_pre", layers=[0]), CLEAN[:1])
    partial = ActivationCache({"blocks.1.resid_pre": clean["resid_pre", 1][:, :2]},
                              model.config, (2, SEQ))
    with pytest.raises(ValueError, match=re.escape("(2, 12, 32); got (2, 2, 32)")):
        interp.run(interp.patch(model, partial, "resid_pre", layers=[1]), CLEAN)

    with pytest.raises(ValueError, match="head index 4 is out of range for 4 heads"):
        interp.patch(model, clean, "head_out", layers=[0], heads=[4])
    with pytest.raises(ValueError, match="head index 2 is out of range for 2 heads"):
        interp.patch(model, clean, "v", layers=[0], heads=[2])  # 2 kv heads
    with pytest.raises(ValueError, match="head index 4 is out of range for 4 heads"):
        interp.capture(model, CLEAN, sites=["pattern"], heads=[4])
    with pytest.raises(ValueError, match="position 12 is out of range for site resid_pre of "
                                         "layer 0 with 12 positions"):
        interp.run(interp.patch(model, clean, "resid_pre", layers=[0], positions=[12]), CLEAN)
    with pytest.raises(ValueError, match="position 12 is out of range for site pattern"):
        interp.capture(model, CLEAN, sites=["pattern"], positions=[3, 12])

    with pytest.raises(ValueError, match="layer index 2 is out of range for 2 layers"):
        interp.patch(model, clean, "resid_pre", layers=[2])
    with pytest.raises(ValueError, match="layer index -3 is out of range for 2 layers"):
        interp.capture(model, CLEAN, layers=[-3])
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        clean["resid_pre", 5]
    with pytest.raises(KeyError, match="recorded per layer: use cache"):
        clean["resid_pre"]

    other = captured("gemma2", "clean")[1]
    with pytest.raises(ValueError, match=r"recorded from a different model \(name: 'tiny2' vs "
                                         r"'tiny1'"):
        interp.patch(model, other, "resid_pre", layers=[0])

    with pytest.raises(ValueError, match=re.escape(
            "per-unit weights for site head_out must have shape [batch seq heads] = "
            "(2, 12, 4) for this input; got (2, 12)")):
        interp.run(interp.patch(model, clean, "head_out", layers=[0],
                                weight=jnp.ones((2, SEQ))), CLEAN)
    with pytest.raises(ValueError, match=re.escape(
            "per-unit weights for site pattern must have shape [batch seq heads] = "
            "(2, 12, 4) for this input; got (2, 4, 12)")):
        interp.run(interp.scale(model, "pattern", jnp.ones((2, 4, SEQ)), layers=[0]), CLEAN)

    bad = np.array(clean["resid_pre", 0])
    bad[1, 3, 7] = np.nan
    with pytest.raises(NonFiniteError, match=r"Replace at resid_pre: value holds nan at "
                                             r"\[1, 3, 7\]"):
        intervene(model, Replace("resid_pre", value=jnp.asarray(bad)), layers=[0])
    weight = np.ones((2, SEQ), np.float32)
    weight[0, 4] = np.inf
    with pytest.raises(NonFiniteError, match="weight holds inf"):
        interp.patch(model, clean, "resid_pre", layers=[0], weight=jnp.asarray(weight))
    with pytest.raises(NonFiniteError, match="factor"):
        interp.scale(model, "v", float("nan"))

    with pytest.raises(ValueError, match="site resid_pre has no heads axis"):
        interp.run(interp.patch(model, clean, "resid_pre", layers=[0], heads=[0]), CLEAN)
    with pytest.raises(ValueError, match="site embed is a site of the whole model"):
        add_interventions(model, {0: Record("embed")})
    with pytest.raises(ValueError, match=re.escape("source must have shape [batch] = (2,)")):
        interp.run(intervene(model, Rewire("v", source=jnp.asarray([0, 1, 1])), layers=[0]),
                   CLEAN)
    with pytest.raises(TypeError, match="must be an integer array of batch rows; got float32"
                       if typecheck_mode == "plain"
                       else "parameter 'source'"):
        intervene(model, Rewire("v", source=jnp.asarray([0.0, 1.0])), layers=[0])
    with pytest.raises(ValueError, match=re.escape("returned shape (2, 12)")):
        interp.run(interp.apply_fn(model, "resid_pre", lambda x: x.sum(-1), layers=[0]), CLEAN)
    with pytest.raises(ValueError, match="how must be 'zero', 'mean' or 'resample'"):
        interp.ablate(model, "v", how="median")
    with pytest.raises(ValueError, match="mean-ablation needs a reference"):
        interp.ablate(model, "v", how="mean")
