"""Attention surgery on tiny models: recording, knock-out, overrides, hooks that compose.

References: Hugging Face transformers' eager attention weights (`output_attentions=True`) for
the recorded patterns; for the rest, properties that hold independently of our hook code
(zeroed query weights give uniform attention, the knock-out formula on a recorded pattern,
finite differences for gradients, a compile counter for jit reuse).
"""

from __future__ import annotations

import contextlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factories import tiny
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import SiteHooks
from gemma_eqx.model.weights import leaf_paths
from interp.install import clear_interventions
from interp.interventions import KnockOut, Record
from interp.surgery import (
    attention_patterns,
    forward_with_records,
    knock_out,
    knockout_mask,
    override_attention,
    record_attention,
    set_knockout_mask,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemma_eqx.formats.hf import from_hf  # noqa: E402

VOCAB, SEQ, PAD = 53, 11, 3

# A Gemma-3-like tiny config (grouped queries, QK-norm, a sliding window that bites); layer 0
# is global so that zeroing its queries gives exactly uniform causal attention.
TINY = tiny(("global", "local", "global"), name="tiny-surgery", vocab_size=VOCAB,
            use_qk_norm=True, use_post_norms=True)


@pytest.fixture(scope="module")
def model():
    m = Transformer(TINY, key=jax.random.key(0))
    # Random norm scales, so QK-norm and the `1 + scale` convention carry signal.
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        if "scale" in jax.tree_util.keystr(p) else x, m)


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, SEQ), 0, VOCAB)


# ------------------------------------------------------------------------------ HF reference


def _hf_model(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, attn_implementation="eager")
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**common, num_hidden_layers=3, sliding_window=4,
                                        query_pre_attn_scalar=8, attn_logit_softcapping=2.0)
        cls = transformers.Gemma2ForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(**common, num_hidden_layers=7, sliding_window=4,
                                            query_pre_attn_scalar=8)
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 1 else
                                                           p.shape[1] ** -0.5))
    return hf


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_patterns_match_hf_output_attentions(kind):
    """Every layer's recorded pattern equals HF's eager attention weights, on a batch with one
    left-padded row (HF given the same positions; compared on real queries and keys)."""
    hf = _hf_model(kind)
    ours = from_hf(hf)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, VOCAB, (2, SEQ))
    real = np.ones((2, SEQ), bool)
    real[1, :PAD] = False
    tokens[1, :PAD] = 0
    positions = np.maximum(np.cumsum(real, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=torch.tensor(real.astype(np.int64)),
                 position_ids=torch.tensor(positions), output_attentions=True)
    reference = np.stack([a.numpy() for a in out.attentions])  # [layers, batch, heads, q, k]
    got = np.asarray(attention_patterns(ours, jnp.asarray(tokens), padding_mask=jnp.asarray(real)))
    assert got.shape == reference.shape == (ours.config.num_layers, 2, 4, SEQ, SEQ)
    assert got.dtype == np.float32
    both = real[None, :, None, :, None] & real[None, :, None, None, :]
    np.testing.assert_allclose(np.where(both, got, 0), np.where(both, reference, 0), atol=2e-5)
    # Non-trivial: the sliding window zeroes keys HF zeroes too, and heads differ.
    assert (got[0, 0, :, -1, : SEQ - 4] == 0).all() and got[0, 0, :, -1, -1].std() > 1e-3


def test_padded_rows_give_the_unpadded_patterns(model, tokens):
    """A left-padded row has, on its real tokens, the patterns of the same sequence alone."""
    row = tokens[1, PAD:][None]
    padded = jnp.concatenate([jnp.zeros((1, PAD), tokens.dtype), row], axis=1)
    mask = jnp.arange(SEQ)[None] >= PAD
    got = attention_patterns(model, jnp.concatenate([tokens[:1], padded]),
                             padding_mask=jnp.concatenate([jnp.ones((1, SEQ), bool), mask]))
    alone = attention_patterns(model, row)
    np.testing.assert_allclose(got[:, 1, :, PAD:, PAD:], alone[:, 0], atol=1e-6)
    assert np.asarray(got[:, 1, :, PAD:, :PAD]).max() == 0  # nothing attends to padding


# ---------------------------------------------------------------------------------- recording


def test_record_selected_heads_and_queries(model, tokens):
    full = attention_patterns(model, tokens)
    recorded = record_attention(model, layers=lambda i, attn: i != 1, heads=[3, 1], queries=[5, 0])
    _, records = forward_with_records(recorded, tokens)
    assert sorted(records) == [0, 2]
    for layer in (0, 2):
        assert records[layer].shape == (2, 2, 2, SEQ)
        np.testing.assert_allclose(records[layer], full[layer][:, [3, 1]][:, :, [5, 0]], atol=1e-6)
    # Two records of one site on one layer would be ambiguous: refused with the site's key.
    both = SiteHooks((Record("pattern", heads=(0,)), Record("pattern", heads=(2,))))
    hooked = eqx.tree_at(lambda m: m.blocks[2].hooks, model, both)
    with pytest.raises(ValueError, match="two interventions record site blocks.2.pattern"):
        forward_with_records(hooked, tokens)


def test_surgery_leaves_the_original_and_shares_weights(model, tokens):
    before = np.asarray(model(tokens))
    changed = record_attention(knock_out(model, knockout_mask(model, [(0, 1)])), layers=[2])
    changed = override_attention(changed, [1], fn=lambda w: w, heads=[0])
    assert all(b.hooks.interventions == () for b in model.blocks)
    ours, theirs = leaf_paths(model), leaf_paths(changed)
    assert set(ours) < set(theirs)  # only hook leaves were added
    for path, leaf in ours.items():
        assert theirs[path] is leaf, path  # the same array object: shared, not copied
    np.testing.assert_array_equal(np.asarray(model(tokens)), before)
    assert not np.allclose(np.asarray(changed(tokens)), before)
    np.testing.assert_array_equal(np.asarray(clear_interventions(changed)(tokens)), before)


def test_hook_chain_order_and_replacement(model):
    m = record_attention(model, heads=[0])
    m = knock_out(m, jnp.ones((3, 4)))
    m = record_attention(m, heads=[1])  # replaces the first record
    m = knock_out(m, jnp.zeros((3, 4)))  # replaces the first knock-out
    hooks = m.blocks[0].hooks.interventions
    assert [type(h) for h in hooks] == [KnockOut, Record]
    assert hooks[1].heads == (1,) and float(hooks[0].mask.sum()) == 0


# ---------------------------------------------------------------------------------- knock-out


def test_knockout_sends_attention_to_bos_even_with_padding(model, tokens):
    """Recorded after a knock-out: a knocked head attends only to BOS, found by position in a
    left-padded row; a half-knocked head is `bos + m (w - bos)` of the clean pattern (layer 0,
    whose input the knock-out cannot change)."""
    mask = knockout_mask(model, [(1, 2)]).at[0, 1].set(0.25)
    padding = jnp.ones((2, SEQ), bool).at[1, :PAD].set(False)
    clean = attention_patterns(model, tokens, padding_mask=padding)
    knocked = attention_patterns(knock_out(model, mask), tokens, padding_mask=padding)
    bos = np.zeros((2, SEQ))
    bos[0, 0] = bos[1, PAD] = 1
    for b, start in ((0, 0), (1, PAD)):
        np.testing.assert_array_equal(knocked[1, b, 2, start:], np.broadcast_to(
            bos[b], (SEQ - start, SEQ)))
    expected = bos[:, None, :] + 0.25 * (clean[0, :, 1] - bos[:, None, :])
    np.testing.assert_allclose(knocked[0, :, 1], expected, atol=1e-6)
    np.testing.assert_allclose(knocked[0, :, [0, 2, 3]], clean[0, :, [0, 2, 3]], atol=1e-6)
    assert not np.allclose(knocked[1, :, 0], clean[1, :, 0])  # later layers see the change


def test_mask_change_does_not_recompile(model, tokens):
    """A jitted forward traces once across new mask values (set or re-installed)."""
    traces = []

    @eqx.filter_jit
    def run(m, t):
        traces.append(1)
        return m(t)

    knocked = knock_out(model, jnp.ones((3, 4)))
    outs = [run(knocked, tokens)]
    outs.append(run(set_knockout_mask(knocked, knockout_mask(model, [(2, 0)])), tokens))
    outs.append(run(knock_out(model, knockout_mask(model, [(1, 3)])), tokens))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
    np.testing.assert_allclose(outs[0], model(tokens), atol=1e-5)  # all ones = untouched


@contextlib.contextmanager
def count_compiles():
    events = []
    listener = lambda name, *_, **__: events.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_library_forward_compiles_once_for_new_masks(model, tokens):
    from interp.analyses import knockout_eval

    eval_mask = jnp.zeros((2, SEQ), bool).at[:, 5:].set(True)
    masks = [knockout_mask(model, [(i % 3, i % 4)]) for i in range(4)]
    knockout_eval(model, tokens, masks[0], eval_mask)  # warm-up
    with count_compiles() as events:
        results = [knockout_eval(model, tokens, m, eval_mask) for m in masks[1:]]
    assert "/jax/core/compile/backend_compile_duration" not in events
    assert len({round(float(r.logprob[0]), 5) for r in results}) == 3


def test_grad_reaches_the_mask(model, tokens):
    knocked = knock_out(model, jnp.ones((3, 4)))

    def objective(mask):
        logits = forward_with_records(set_knockout_mask(knocked, mask), tokens)[0]
        return jax.nn.log_softmax(logits)[:, :, 7].mean()

    at = jnp.full((3, 4), 0.8)
    grad = jax.grad(objective)(at)
    assert grad.shape == (3, 4) and np.abs(np.asarray(grad)).min() > 0
    eps = 1e-2
    for layer, head in [(0, 1), (2, 3)]:
        e = jnp.zeros((3, 4)).at[layer, head].set(eps)
        fd = (objective(at + e) - objective(at - e)) / (2 * eps)
        np.testing.assert_allclose(grad[layer, head], fd, rtol=2e-2, atol=1e-5)


def test_bad_masks_and_layers_are_named(model):
    with pytest.raises(ValueError, match=r"\[layers, heads\] = \(3, 4\); got \(4, 3\)"):
        knock_out(model, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="layer 0 has no KnockOut"):
        set_knockout_mask(model, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="layer index 5 is out of range"):
        record_attention(model, layers=[5])
    with pytest.raises(ValueError, match="head index 4 is out of range"):
        record_attention(model, heads=[4])
    with pytest.raises(ValueError, match="layer index 3 is out of range for 3 layers"):
        knockout_mask(model, [(3, 0)])
    with pytest.raises(ValueError, match="exactly one of"):
        override_attention(model, [0])


# ----------------------------------------------------------------------------------- override


def test_uniform_override_equals_zeroed_queries(model, tokens):
    """Overriding layer-0 heads with uniform causal attention gives the logits of the model
    whose layer-0 query weights for those heads are zero (all-zero scores: a uniform softmax)."""
    causal = jnp.tril(jnp.ones((SEQ, SEQ)))
    uniform = causal / causal.sum(-1, keepdims=True)
    for heads in (None, [1, 3]):
        idx = slice(None) if heads is None else jnp.asarray(heads)
        zeroed = eqx.tree_at(lambda m: m.blocks[0].attn.w_q, model,
                             model.blocks[0].attn.w_q.at[idx].set(0.0))
        reference = np.asarray(zeroed(tokens))
        by_pattern = override_attention(model, [0], pattern=uniform, heads=heads)
        by_fn = override_attention(
            model, [0], heads=heads,
            fn=lambda w: (w > 0) / (w > 0).sum(-1, keepdims=True),  # softmax > 0 where allowed
        )
        np.testing.assert_allclose(np.asarray(by_pattern(tokens)), reference, atol=2e-5)
        np.testing.assert_allclose(np.asarray(by_fn(tokens)), reference, atol=2e-5)
        assert np.abs(reference - np.asarray(model(tokens))).max() > 1e-2
