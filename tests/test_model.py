"""The Transformer's behaviour on tiny configs: padding, masks, dtypes, sizes and bad input.

Numerical parity with Hugging Face lives in test_hf_parity.py; here the references are
published parameter counts, numpy formulas and properties every correct model must have.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import gemma_eqx
from factories import random_arrays, random_model, tiny
from gemma_eqx import (
    Embedder,
    GemmaConfig,
    RMSNorm,
    Transformer,
    count_params,
    get_preset,
)
from gemma_eqx.model.modules import apply_rope
from gemma_eqx.model.sites import Intervention, SiteHooks
from gemma_eqx.model.weights import abstract_model, leaf_paths, model_from_arrays

VOCAB = 61  # factories.tiny's vocabulary


# Gemma 1/2/3-shaped tiny configs; every local window is shorter than the test sequences.
G1 = tiny(("global", "global"), num_kv_heads=1)
G2 = tiny(
    ("local", "global", "local"), attn_logit_softcap=2.0, final_logit_softcap=3.0,
    use_post_norms=True, query_pre_attn_scalar=12.0,
)
G3 = tiny(
    ("local", "local", "global"), use_qk_norm=True, use_post_norms=True, global_rope_base=1e6,
    global_rope_scale=8.0,
)


@eqx.filter_jit
def logits_of(model: Transformer, tokens: jax.Array, padding_mask: jax.Array | None = None):
    """`model(tokens)`, compiled once per config and shape (eager dispatch is far slower)."""
    return model(tokens, padding_mask=padding_mask)


def ids(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.RandomState(seed).randint(0, VOCAB, shape), jnp.int32)


@pytest.fixture(scope="module")
def g3_model() -> Transformer:
    return random_model(G3)


# ---------------------------------------------------------------------------------------------
# Published sizes: abstract shapes only, nothing allocated.

# Hugging Face's published parameter counts. Gemma 1 and 2 checkpoints there have 256000
# embedding rows where the Kaggle ones (and our presets) have 256128.
HF_COUNTS = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_099_328,  # the language model of the 4B (no vision tower)
    "gemma3-12b": 11_765_788_416,
    "gemma3-27b": 27_009_002_240,
}


def test_every_preset_has_a_published_count():
    assert set(HF_COUNTS) == set(gemma_eqx.PRESETS)


@functools.cache
def abstract_preset(name: str) -> Transformer:
    """The preset with bf16 weights and float32 activations, as shapes only."""
    return eqx.filter_eval_shape(
        Transformer, get_preset(name), key=jax.random.key(0), dtype=jnp.bfloat16,
        activation_dtype=jnp.float32,
    )


@pytest.mark.parametrize("name", list(HF_COUNTS))
def test_parameter_count_matches_published(name):
    config = get_preset(name)
    model = abstract_preset(name)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaf_paths(model).values())
    assert count_params(abstract_model(config)) == count_params(model)  # dtype-independent
    count = count_params(model)
    if config.vocab_size == 256_128:
        count -= (256_128 - 256_000) * config.embed_dim
    assert count == HF_COUNTS[name]


@pytest.mark.parametrize("name", [  # tracing the forward of 28-62 unrolled layers: 1-2 s each
    pytest.param(name, marks=pytest.mark.slow) if get_preset(name).num_layers > 26 else name
    for name in HF_COUNTS])
def test_filter_eval_shape_of_every_preset(name):
    """Build and run every preset on abstract values: shapes and dtypes line up end to end."""
    config = get_preset(name)
    model = abstract_preset(name)
    assert model.embedder.embedding.shape == (config.vocab_size, config.embed_dim)
    assert model.embedder.embedding.dtype == jnp.bfloat16
    assert len(model.blocks) == config.num_layers
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    logits = eqx.filter_eval_shape(lambda m, t: m(t), model, tokens)
    assert (logits.shape, logits.dtype) == ((2, 8, config.vocab_size), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Building blocks against numpy float64 formulas (also checks float64 stays float64).


def test_rmsnorm_matches_formula_in_float64():
    rng = np.random.RandomState(0)
    x, scale = rng.randn(3, 5, 16) * 3.0, rng.randn(16)
    expected = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (1 + scale)
    with jax.enable_x64(True):
        got = RMSNorm(jnp.asarray(scale), 1e-6)(jnp.asarray(x))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12)


def test_rope_matches_formula_in_float64():
    """Split-half RoPE: channel i turns with channel i + H/2 by pos / scale / base^(2i/H)."""
    rng = np.random.RandomState(0)
    x, pos = rng.randn(2, 7, 3, 8), rng.randint(0, 1000, (2, 7))
    base, scale = 10_000.0, 8.0
    angle = pos[..., None, None] / scale / base ** (np.arange(4) * 2 / 8)
    a, b = x[..., :4], x[..., 4:]
    expected = np.concatenate(
        [a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], axis=-1
    )
    with jax.enable_x64(True):
        got = apply_rope(jnp.asarray(x), jnp.asarray(pos), base, scale)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Padding: a padded batch computes each real token exactly as the sequence alone would.


class RecordPositions(Intervention):
    """Passes the attention weights through and records the positions the layer was given."""

    def __call__(self, weights, context):
        return weights, (context.positions, context.key_valid)


@eqx.filter_jit
def forward_of(model: Transformer, tokens: jax.Array, padding_mask: jax.Array | None = None):
    return model.forward(tokens, padding_mask=padding_mask)


@pytest.mark.parametrize("config", [G1, G2, G3], ids=["gemma1", "gemma2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded(config, side):
    model = eqx.tree_at(lambda m: m.blocks[0].hooks, random_model(config),
                        SiteHooks((RecordPositions("pattern"),)))
    lengths, width = (11, 6), 11  # both longer than the window of 4
    rng = np.random.RandomState(1)
    # Padding slots hold arbitrary valid ids: their content must not leak into real tokens.
    tokens = rng.randint(0, VOCAB, (len(lengths), width))
    mask = np.zeros(tokens.shape, bool)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = True
    if side == "right":
        tokens, mask = tokens[:, ::-1].copy(), mask[:, ::-1].copy()
    out = forward_of(model, jnp.asarray(tokens), jnp.asarray(mask))
    batched = np.asarray(out.logits)
    assert np.isfinite(batched).all()  # pad queries that see nothing stay finite too
    positions, valid = (np.asarray(a) for a in out.records["blocks.0.pattern"])
    np.testing.assert_array_equal(valid, mask)
    for row, n in enumerate(lengths):
        # Positions count real tokens only (RoPE alone could not tell: it is shift-invariant).
        np.testing.assert_array_equal(positions[row][mask[row]], np.arange(n))
        alone = np.asarray(forward_of(model, jnp.asarray(tokens[row][mask[row]][None])).logits)
        np.testing.assert_allclose(batched[row][mask[row]], alone[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masks: causality and the exact reach of sliding windows.


def _changed_positions(model: Transformer, tokens: jax.Array, at: int) -> np.ndarray:
    """Positions whose logits move when the token at `at` is replaced by another id."""
    other = tokens.at[0, at].set((tokens[0, at] + 1) % VOCAB)
    delta = np.abs(np.asarray(logits_of(model, other)) - np.asarray(logits_of(model, tokens)))
    delta = delta[0].max(axis=-1)
    moved, still = delta > 1e-4, delta == 0
    assert (moved | still).all(), f"logits moved by a marginal amount: {delta}"
    return np.flatnonzero(moved)


@pytest.mark.parametrize("at", [0, 6, 12])
def test_causality(g3_model, at):
    """Changing a token moves the logits at its position and later, never earlier."""
    tokens = ids(1, 13)
    np.testing.assert_array_equal(_changed_positions(g3_model, tokens, at), np.arange(at, 13))


@pytest.mark.parametrize("layers", [1, 2])
def test_sliding_window_reach(layers):
    """In a local-only model a query at q sees keys q - window < k <= q, so a token at p reaches
    exactly positions p .. p + layers * (window - 1); one layer: nothing `window` or more
    positions later. The same weights with global attention reach every later position."""
    window, seq, at = 4, 16, 2
    local = random_model(tiny(("local",) * layers, sliding_window=window))
    tokens = ids(1, seq)
    reach = np.arange(at, at + layers * (window - 1) + 1)
    np.testing.assert_array_equal(_changed_positions(local, tokens, at), reach)
    glob = model_from_arrays(tiny(("global",) * layers), leaf_paths(local))
    np.testing.assert_array_equal(_changed_positions(glob, tokens, at), np.arange(at, seq))


# ---------------------------------------------------------------------------------------------
# Parameter dtype is separate from activation dtype.


def _bf16_and_f32_twins(config: GemmaConfig) -> tuple[Transformer, Transformer]:
    """The same bf16-rounded weights, stored as bf16 (run in f32) and as float32."""
    rounded = {p: a.astype(jnp.bfloat16) for p, a in random_arrays(config).items()}
    bf16 = model_from_arrays(
        config, {p: jnp.asarray(a) for p, a in rounded.items()}, activation_dtype=jnp.float32
    )
    f32 = model_from_arrays(
        config, {p: jnp.asarray(a.astype(np.float32)) for p, a in rounded.items()}
    )
    return bf16, f32


def test_bf16_weights_with_float32_activations():
    config = G3.replace(embed_dim=64)  # sqrt(64) = 8 is exact in bf16: the twins agree
    bf16, f32 = _bf16_and_f32_twins(config)
    assert {a.dtype for a in leaf_paths(bf16).values()} == {jnp.dtype(jnp.bfloat16)}
    assert bf16.activation_dtype == jnp.float32
    tokens = ids(2, 9)
    got, expected = logits_of(bf16, tokens), logits_of(f32, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
    # Running the same weights in bf16 really is a different computation.
    low = logits_of(bf16.with_activation_dtype(jnp.bfloat16), tokens)
    assert low.dtype == jnp.bfloat16
    assert np.abs(np.asarray(low, np.float32) - np.asarray(expected)).max() > 1e-3


def test_with_activation_dtype_shares_weights():
    model = random_model(G2, dtype=jnp.bfloat16)
    assert model.activation_dtype == jnp.bfloat16
    f32 = model.with_activation_dtype(jnp.float32)
    assert f32.activation_dtype == jnp.float32 and model.activation_dtype == jnp.bfloat16
    before, after = leaf_paths(model), leaf_paths(f32)
    assert before.keys() == after.keys()
    assert all(after[p] is before[p] for p in before)  # the very same buffers, not copies
    assert logits_of(f32, ids(1, 5)).dtype == jnp.float32
    assert logits_of(model, ids(1, 5)).dtype == jnp.bfloat16


def test_embedding_normalizer_rounded_to_parameter_dtype_7b_width():
    """The official code's sqrt(D) for gemma-7b in bf16 is 55.5, not 55.43."""
    embedder = Embedder(jnp.ones((2, 3072), jnp.bfloat16))
    x = embedder.encode(jnp.zeros((1, 1), jnp.int32), jnp.float32)
    assert x.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(x), 55.5)


def test_embedding_normalizer_rounded_in_the_model():
    """With bf16 weights and D = 48, the model scales embeddings by bf16(sqrt(48)) = 6.9375
    even though it computes in float32. Replaying the forward pass block by block shows the
    rounded factor reproduces the logits and the exact sqrt(48) = 6.928 does not."""
    config = G2.replace(embed_dim=48)
    rounded = float(np.float32(math.sqrt(48)).astype(jnp.bfloat16))
    assert rounded == 6.9375 != math.sqrt(48)
    model, _ = _bf16_and_f32_twins(config)
    tokens = ids(2, 9)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    valid = jnp.ones((2, 9), bool)

    @eqx.filter_jit
    def replay(normalizer: jax.Array) -> jax.Array:
        x = model.embedder.embedding.astype(jnp.float32)[tokens] * normalizer
        for block in model.blocks:
            x, _ = block(x, positions, valid)
        logits = model.embedder.decode(model.final_norm(x))
        cap = config.final_logit_softcap
        return jnp.tanh(logits / cap) * cap

    logits = np.asarray(logits_of(model, tokens))
    np.testing.assert_allclose(logits, replay(jnp.float32(rounded)), rtol=0, atol=1e-5)
    assert np.abs(logits - replay(jnp.float32(math.sqrt(48)))).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the culprit.


@pytest.fixture(params=["runtime-typechecked", "plain"])
def typecheck_mode(request):
    """Tests run under jaxtyping+beartype; users usually don't. Check both paths' errors."""
    jaxtyping.config.update("jaxtyping_disable", request.param == "plain")
    yield request.param
    jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="module")
def small_model() -> Transformer:
    return random_model(G1)


@pytest.mark.parametrize(
    ("shape", "dtype", "plain_error", "plain_message"),
    [
        ((5,), np.int32, ValueError, r"2-D integer array \[batch, seq\]; got shape \(5,\)"),
        ((1, 2, 3), np.int32, ValueError, r"got shape \(1, 2, 3\)"),
        ((1, 3), np.float32, TypeError, "integer dtype; got float32"),
    ],
    ids=["rank1", "rank3", "float"],
)
def test_malformed_tokens(small_model, typecheck_mode, shape, dtype, plain_error, plain_message):
    tokens = jnp.asarray(np.ones(shape, dtype))
    if typecheck_mode == "plain":
        with pytest.raises(plain_error, match=plain_message):
            small_model(tokens)
    else:
        with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'tokens'"):
            small_model(tokens)


@pytest.mark.parametrize(("bad", "where"), [(-1, (0, 3)), (VOCAB, (1, 0)), (10**6, (1, 4))])
def test_out_of_vocabulary_tokens(small_model, typecheck_mode, bad, where):
    tokens = ids(2, 5).at[where].set(bad)
    message = (
        rf"token id {bad} at \[batch {where[0]}, position {where[1]}\] is outside the "
        rf"vocabulary \[0, {VOCAB}\)"
    )
    with pytest.raises(ValueError, match=message):
        small_model(tokens)


def test_vocabulary_edges_are_valid(small_model):
    logits = small_model(ids(2, 5).at[0, 0].set(0).at[1, 4].set(VOCAB - 1))
    assert logits.shape == (2, 5, VOCAB) and np.isfinite(np.asarray(logits)).all()


def test_out_of_vocabulary_tokens_under_jit(small_model):
    good = ids(2, 5)
    np.testing.assert_allclose(
        np.asarray(logits_of(small_model, good)), np.asarray(small_model(good)), rtol=0, atol=1e-5
    )
    for bad in (-1, VOCAB):
        with pytest.raises(eqx.EquinoxRuntimeError, match=rf"outside the vocabulary \[0, {VOCAB}"):
            jax.block_until_ready(logits_of(small_model, good.at[1, 2].set(bad)))


def test_config_rejects_wrong_number_of_attention_kinds():
    with pytest.raises(ValueError, match="'tiny': attention_kinds has 2 entries for 3 layers"):
        tiny(("global", "global"), num_layers=3)


def test_config_rejects_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        tiny(num_heads=6, num_kv_heads=4)


def test_config_rejects_local_layers_without_window():
    with pytest.raises(ValueError, match="local layers need a sliding_window"):
        tiny(("local", "global"), sliding_window=None)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown Gemma preset 'gemma4-1b'.*gemma3-270m"):
        get_preset("gemma4-1b")
    assert get_preset("gemma3-270m") is gemma_eqx.PRESETS["gemma3-270m"]


def test_logits_at_selected_positions_equal_the_full_logits():
    import gemma_eqx

    config = gemma_eqx.get_preset("gemma2-2b").replace(
        num_layers=2, attention_kinds=("local", "global"), embed_dim=32, hidden_dim=64,
        head_dim=16, num_heads=4, num_kv_heads=2, vocab_size=64, sliding_window=4,
    )
    model = gemma_eqx.Transformer(config, key=jax.random.key(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    at = jnp.asarray([[8, 0, 3], [5, 5, 1]], jnp.int32)
    full = model.forward(tokens).logits
    picked = model.forward(tokens, logits_at=at).logits
    assert picked.shape == (2, 3, 64)
    np.testing.assert_allclose(picked, jnp.take_along_axis(full, at[:, :, None], axis=1),
                               atol=1e-6)


@pytest.mark.parametrize("rows", [(1, 1), (2, 8), (1, 17), (3, 41)])
def test_project_equals_the_einsum_on_both_sides_of_its_few_rows_path(rows):
    """`project` takes a batched matmul up to `_FEW_ROWS` rows and an einsum above; both are
    `x @ w[i]` for each matrix of the stack, against float64 numpy."""
    from gemma_eqx.model.modules import _FEW_ROWS, project

    rng = np.random.default_rng(1)
    x = rng.normal(size=(*rows, 24)).astype(np.float32)
    w = rng.normal(size=(3, 24, 5)).astype(np.float32)
    got = project(jnp.asarray(x), jnp.asarray(w))
    want = np.einsum("bsd,kdh->bskh", x.astype(np.float64), w.astype(np.float64))
    assert got.shape == (*rows, 3, 5)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert (rows[0] * rows[1] <= _FEW_ROWS) == (rows in [(1, 1), (2, 8)])


def test_one_decode_step_equals_the_full_forward_at_that_position():
    """The few-rows path (one token per row against a cache) gives the logits of the whole
    sequence's forward at the same position."""
    from gemma_eqx.model.generate import decode_step, init_cache, prefill

    config = gemma_eqx.get_preset("gemma3-270m").replace(
        num_layers=2, attention_kinds=("local", "global"), embed_dim=32, hidden_dim=64,
        head_dim=16, num_heads=4, num_kv_heads=1, vocab_size=64, sliding_window=4,
    )
    model = gemma_eqx.Transformer(config, key=jax.random.key(5))
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, 9)), jnp.int32)
    full = model(tokens)
    cache = init_cache(model, 2, 9)
    _, cache = prefill(model, tokens[:, :8], jnp.ones((2, 8), bool), cache)
    logits, _ = decode_step(model, tokens[:, 8], jnp.full((2,), 8), jnp.ones((2,), bool), cache,
                            jnp.asarray(8))
    np.testing.assert_allclose(logits, full[:, 8], atol=1e-5)
