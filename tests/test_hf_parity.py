"""Logit parity with Hugging Face transformers on tiny random Gemma 1, 2 and 3 models.

The reference is transformers' eager PyTorch implementation in float32 on CPU. Every weight,
the norm scales included (HF initialises them to zero, i.e. `1 + 0`), is redrawn at random so
the `1 + scale` convention, QK-norm and the tied unembedding all carry signal. Each case is
sized so that the feature under test acts: sequences longer than the sliding window, soft-caps
that bite, several RoPE bases; `test_features_are_exercised` proves it by switching each
feature off and watching the logits move.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemma_eqx.core.config import gemma2_pattern, gemma3_pattern  # noqa: E402
from gemma_eqx.formats.hf import config_from_hf, from_hf  # noqa: E402
from gemma_eqx.model.weights import leaf_paths, model_from_arrays  # noqa: E402

VOCAB, SEQ, WINDOW = 97, 13, 5
TOL = 1e-4  # float32 on both sides; measured differences are ~4e-6

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
    attn_implementation="eager",
)

# name: (HF config class, HF model class, config overrides, config changes that must matter)
CASES = {
    "gemma1-multi-query": (
        "GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=3, num_key_value_heads=1), [],
    ),
    "gemma1-multi-head": (
        "GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=3, num_key_value_heads=4), [],
    ),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        # head_dim 8 but query scale (D/N)^-1/2 = 16^-1/2, as in Gemma 2 27B; small caps.
        dict(
            num_hidden_layers=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
            query_pre_attn_scalar=16, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
        ),
        [
            dict(attn_logit_softcap=None),
            dict(final_logit_softcap=None),
            dict(query_pre_attn_scalar=8.0),
            dict(attention_kinds=("global",) * 4),
            dict(attention_kinds=("global", "local") * 2),  # layer 0 global: the known mistake
        ],
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=7, num_key_value_heads=2, sliding_window=WINDOW,
            query_pre_attn_scalar=16, rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
        [
            dict(global_rope_scale=1.0),
            dict(local_rope_base=1e6),
            dict(global_rope_base=1e4),
            dict(attention_kinds=("global",) * 7),
        ],
    ),
}


def _randomise(hf_model) -> None:
    """Redraw every parameter: norm scales ~ N(0, 0.5^2), matrices ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf_model.parameters():
            std = 0.5 if p.ndim == 1 else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config_cls, model_cls, overrides, _ = CASES[request.param]
    hf_config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    hf_model = getattr(transformers, model_cls)(hf_config).eval()
    _randomise(hf_model)
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        reference = hf_model(torch.tensor(tokens)).logits.numpy()
    ours = from_hf(hf_model)
    logits = np.asarray(ours(jnp.asarray(tokens, jnp.int32)))
    return request.param, hf_model, ours, tokens, reference, logits


def test_logits_match_hf(case):
    name, _, _, _, reference, logits = case
    assert logits.shape == reference.shape == (2, SEQ, VOCAB)
    assert logits.dtype == np.float32
    assert np.abs(reference).max() > 1.0  # a non-degenerate reference
    np.testing.assert_allclose(logits, reference, rtol=0, atol=TOL, err_msg=name)


def test_converted_config(case):
    """The HF config maps onto ours with the features each case is meant to exercise."""
    name, hf_model, ours, *_ = case
    c = ours.config
    assert (c.num_heads, c.embed_dim, c.vocab_size) == (4, 64, VOCAB)
    if name == "gemma1-multi-query":
        assert c.num_kv_heads == 1 and set(c.attention_kinds) == {"global"}
    elif name == "gemma1-multi-head":
        assert c.num_kv_heads == c.num_heads == 4
    elif name == "gemma2":
        assert c.attention_kinds == gemma2_pattern(4) and c.attention_kinds[0] == "local"
        assert c.sliding_window == WINDOW < SEQ
        assert c.query_pre_attn_scalar == 16.0 and c.head_dim == 8
        assert (c.attn_logit_softcap, c.final_logit_softcap) == (1.0, 2.0)
        assert c.use_post_norms and not c.use_qk_norm
    else:
        assert c.attention_kinds == gemma3_pattern(7)
        assert c.attention_kinds.index("global") == 5 and c.attention_kinds[6] == "local"
        assert c.sliding_window == WINDOW < SEQ
        assert (c.local_rope_base, c.global_rope_base, c.global_rope_scale) == (1e4, 1e6, 8.0)
        assert c.use_qk_norm and c.use_post_norms
    # Conversion is a function of the config alone.
    assert config_from_hf(hf_model.config) == c


def test_features_are_exercised(case):
    """Each feature the case claims to test changes the logits when switched off, so parity
    with HF is evidence that we implement it the same way."""
    name, _, ours, tokens, _, logits = case
    arrays = leaf_paths(ours)
    for changes in CASES[name][3]:
        variant = model_from_arrays(ours.config.replace(**changes), arrays)
        moved = np.abs(np.asarray(variant(jnp.asarray(tokens, jnp.int32))) - logits).max()
        assert moved > 100 * TOL, f"{name}: {changes} left the logits unchanged ({moved})"


def test_interleaved_gqa_grouping_would_fail(case):
    """HF's grouping (query head n reads KV head n // (N / K)) is the one parity pins down: a
    model that grouped heads as n % K instead, i.e. ours with its query heads reordered to
    [0, 2, 1, 3], is far from the reference."""
    name, _, ours, tokens, reference, _ = case
    n, k = ours.config.num_heads, ours.config.num_kv_heads
    if k in (1, n):
        pytest.skip("with one KV head, or one per query head, there is no grouping to get wrong")
    order = np.array(sorted(range(n), key=lambda head: head % k))
    arrays = dict(leaf_paths(ours))
    for path in [p for p in arrays if p.endswith(("attn.w_q", "attn.w_o"))]:
        arrays[path] = arrays[path][order]
    interleaved = model_from_arrays(ours.config, arrays)
    got = np.asarray(interleaved(jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - reference).max() > 100 * TOL, name
