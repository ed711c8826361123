"""Cached generation against full forward passes without a cache, and against HF `generate`."""

from __future__ import annotations

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factories import VOCAB, WINDOW, CharTokenizer, varied_model
from gemma_eqx.model.generate import decode_step, generate, generate_text, init_cache, prefill

SEQ, NEW = 12, 20  # prompt length and new tokens of most tests


@eqx.filter_jit
def _full_logits(model, tokens, mask):
    return model(tokens, padding_mask=mask)


def forward_logits_along(model, tokens, mask, new):
    """Logits of a plain forward pass (no cache) over prompt + `new`, at each query that
    predicted a new token: row i's step-0 query is its last real prompt token."""
    tokens, mask, new = np.asarray(tokens), np.asarray(mask, bool), np.asarray(new)
    b, s = tokens.shape
    full = np.concatenate([tokens, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new, bool)], axis=1)
    logits = np.asarray(_full_logits(model, jnp.asarray(full), jnp.asarray(full_mask)))
    last_real = s - 1 - np.argmax(mask[:, ::-1], axis=1)
    later = np.broadcast_to(np.arange(s, s + new.shape[1] - 1), (b, new.shape[1] - 1))
    query = np.concatenate([last_real[:, None], later], axis=1)
    return logits[np.arange(b)[:, None], query]  # [batch, new, vocab]


def greedy_by_full_forward(model, tokens, mask, steps):
    """Greedy decoding with no cache: one full forward pass over the fixed-length buffer per
    step (future slots marked as padding, so one compilation serves every step)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    b, s = tokens.shape
    buf = np.zeros((b, s + steps), np.int32)
    buf_mask = np.zeros((b, s + steps), bool)
    buf[:, :s], buf_mask[:, :s] = tokens, mask
    query = s - 1 - np.argmax(mask[:, ::-1], axis=1)
    for t in range(steps):
        logits = np.asarray(_full_logits(model, jnp.asarray(buf), jnp.asarray(buf_mask)))
        buf[:, s + t] = logits[np.arange(b), query].argmax(-1)
        buf_mask[:, s + t] = True
        query = np.full(b, s + t)
    return buf[:, s:]


def padded_batch(lengths, seed=0, side="left"):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), SEQ), np.int32)
    mask = np.zeros((len(lengths), SEQ), bool)
    for i, n in enumerate(lengths):
        sl = slice(SEQ - n, SEQ) if side == "left" else slice(0, n)
        tokens[i, sl] = rng.integers(3, VOCAB, n)
        mask[i, sl] = True
    return jnp.asarray(tokens), jnp.asarray(mask)


# Every test uses [3, SEQ] prompts and NEW new tokens, so each family compiles `generate` (and
# the reference forward pass) once for the module, not once per test.


# --- against full forward passes -------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma1", "gemma2", "gemma3"])
def test_greedy_cache_matches_full_forward_past_window(family):
    model = varied_model(family)
    tokens, mask = padded_batch([12, 3, 7], seed=1)  # 12 + 20 tokens: well past the window of 8
    got = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW))
    want = greedy_by_full_forward(model, tokens, mask, NEW)
    np.testing.assert_array_equal(got, want)
    assert min(len(np.unique(r)) for r in want) > 3, "degenerate model: output barely varies"


def test_greedy_right_padding_matches_full_forward():
    model = varied_model("gemma3", seed=3)
    tokens, mask = padded_batch([4, 12, 9], seed=2, side="right")
    got = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW))
    np.testing.assert_array_equal(got, greedy_by_full_forward(model, tokens, mask, NEW))


def test_rows_do_not_depend_on_padding_or_neighbours():
    """Each prompt generates the same tokens left padded in one order as right padded in the
    reverse order."""
    model = varied_model("gemma2", seed=4)
    lengths = [12, 4, 7]
    left, left_mask = padded_batch(lengths, seed=5)
    right, right_mask = padded_batch(lengths, seed=5, side="right")
    a = np.asarray(generate(model, left, left_mask, max_new_tokens=NEW))
    b = np.asarray(generate(model, right[::-1], right_mask[::-1], max_new_tokens=NEW))
    np.testing.assert_array_equal(a, b[::-1])


def test_manual_prefill_and_decode_steps_match_generate():
    model = varied_model("gemma2", seed=21)
    tokens, mask = padded_batch([12, 5, 8], seed=22)
    steps = 6
    cache = init_cache(model, 3, SEQ + steps)
    logits, cache = prefill(model, tokens, mask, cache)
    token, positions = jnp.argmax(logits, -1).astype(jnp.int32), mask.sum(1).astype(jnp.int32)
    got = [token]
    for t in range(steps - 1):
        logits, cache = decode_step(
            model, token, positions, jnp.ones(3, bool), cache, jnp.asarray(SEQ + t)
        )
        token, positions = jnp.argmax(logits, -1).astype(jnp.int32), positions + 1
        got.append(token)
    want = greedy_by_full_forward(model, tokens, mask, NEW)[:, :steps]
    np.testing.assert_array_equal(np.stack(got, 1), want)
    with pytest.raises(ValueError, match="overflows the cache"):
        decode_step(model, token, positions, jnp.ones(3, bool), cache, jnp.asarray(SEQ + steps))
    with pytest.raises(ValueError, match="overflows the cache"):
        prefill(model, tokens, mask, init_cache(model, 3, SEQ - 1))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_ring_cache_decodes_like_a_full_cache_far_past_the_window(family):
    """Sliding-window layers get a ring of WINDOW slots; prefill (longer than the ring) and
    3 windows of decode steps give the tokens of the full cache and of cache-free forwards."""
    model = varied_model(family, seed=31)
    tokens, mask = padded_batch([12, 5, 9], seed=32)
    steps = 3 * WINDOW
    local = [block.attn.sliding_window is not None for block in model.blocks]
    assert any(local) and not all(local)

    def decode(cache):
        logits, cache = prefill(model, tokens, mask, cache)
        positions = mask.sum(1).astype(jnp.int32)
        out, all_logits = [], []
        for t in range(steps):
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            out.append(token)
            all_logits.append(logits)
            if t < steps - 1:
                logits, cache = decode_step(model, token, positions, jnp.ones(3, bool), cache,
                                            jnp.asarray(SEQ + t))
                positions = positions + 1
        return np.stack(out, 1), np.stack(all_logits, 1), cache

    ring = init_cache(model, 3, SEQ + steps)
    assert [c.ring for c in ring] == local
    assert [c.keys.shape[1] for c in ring] == [WINDOW if is_local else SEQ + steps
                                               for is_local in local]
    ring_tokens, ring_logits, ring = decode(ring)
    full_tokens, full_logits, _ = decode(init_cache(model, 3, SEQ + steps, ring=False))
    np.testing.assert_array_equal(ring_tokens, full_tokens)
    np.testing.assert_allclose(ring_logits, full_logits, atol=1e-5)
    np.testing.assert_array_equal(ring_tokens, greedy_by_full_forward(model, tokens, mask, steps))
    assert len(set(ring_tokens[0].tolist())) > 3  # the output varies: the check means something
    # The ring holds exactly the last WINDOW positions of each row.
    last = np.asarray(mask.sum(1)) + steps - 2
    for cache, is_local in zip(ring, local, strict=True):
        if is_local:
            held = np.sort(np.asarray(cache.positions), axis=1)
            np.testing.assert_array_equal(held, last[:, None] - np.arange(WINDOW)[::-1])


def test_init_cache_shapes():
    model = varied_model("gemma3")
    cache = init_cache(model, 2, 5, jnp.bfloat16)
    assert len(cache) == 3
    assert cache[0].keys.shape == (2, 5, 2, 16) and cache[0].keys.dtype == jnp.bfloat16
    assert cache[0].positions.shape == (2, 5) and not bool(cache[0].valid.any())


# --- sampling --------------------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    model = varied_model("gemma3", seed=6)
    tokens, mask = padded_batch([6, 12, 9], seed=7)
    greedy = generate(model, tokens, mask, max_new_tokens=NEW)
    sampled = generate(
        model, tokens, mask, max_new_tokens=NEW, temperature=2.0, top_k=1, key=jax.random.key(0)
    )
    np.testing.assert_array_equal(np.asarray(sampled), np.asarray(greedy))


def test_top_k_sampling_is_deterministic_and_stays_in_the_top_k():
    model = varied_model("gemma3", seed=10)
    tokens, mask = padded_batch([7, 12, 3], seed=11)
    k = 3
    kw = dict(max_new_tokens=NEW, temperature=3.0, top_k=k)
    new = np.asarray(generate(model, tokens, mask, key=jax.random.key(3), **kw))
    again = np.asarray(generate(model, tokens, mask, key=jax.random.key(3), **kw))
    other = np.asarray(generate(model, tokens, mask, key=jax.random.key(4), **kw))
    np.testing.assert_array_equal(new, again)
    assert (new != other).any()
    logits = forward_logits_along(model, tokens, mask, new)
    kth = np.sort(logits, axis=-1)[..., -k]
    chosen = np.take_along_axis(logits, new[..., None], axis=-1)[..., 0]
    assert (chosen >= kth - 1e-4).all()
    # At this temperature it does leave the top 1 (so the check above is not vacuous).
    assert (chosen < logits.max(-1) - 1e-4).any()


def test_top_p_only_emits_from_the_nucleus():
    model = varied_model("gemma1", seed=12)
    tokens, mask = padded_batch([8, 5, 12], seed=13)
    temperature, p = 1.5, 0.6
    new = np.asarray(
        generate(model, tokens, mask, max_new_tokens=NEW, temperature=temperature, top_p=p,
                 key=jax.random.key(4))
    )
    logits = forward_logits_along(model, tokens, mask, new) / temperature
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.take_along_axis(probs, new[..., None], axis=-1)
    mass_before = np.where(probs > chosen, probs, 0).sum(-1)  # mass of strictly likelier tokens
    assert (mass_before < p + 1e-5).all()
    assert (mass_before > 0).any(), "never left the top 1: the check above is vacuous"


# --- stopping --------------------------------------------------------------------------------


def test_stops_at_eos_per_sequence():
    model = varied_model("gemma3", seed=14)
    tokens, mask = padded_batch([6, 10, 12], seed=15)
    free = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW))
    # The eos: row 0's token at the first step t >= 2 that it did not emit before.
    t = next(t for t in range(2, NEW) if free[0, t] not in free[0, :t])
    eos, pad = int(free[0, t]), 5
    got = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW, eos_id=(eos,), pad_id=pad))
    want = free.copy()
    for row in want:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1:] = pad
    np.testing.assert_array_equal(got, want)
    assert (got[0, t + 1:] == pad).all()


def test_all_rows_stopping_early_pads_to_max_new_tokens():
    model = varied_model("gemma1", seed=16)
    one, one_mask = padded_batch([5], seed=17)
    tokens, mask = jnp.repeat(one, 3, axis=0), jnp.repeat(one_mask, 3, axis=0)
    first = int(generate(model, tokens, mask, max_new_tokens=NEW)[0, 0])
    got = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW, eos_id=first, pad_id=7))
    np.testing.assert_array_equal(got, [[first] + [7] * (NEW - 1)] * 3)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=5, top_p=0.0), "top_p"),
        (dict(max_new_tokens=5, top_p=1.5, temperature=1.0, key=jax.random.key(0)), "top_p"),
        (dict(max_new_tokens=5, temperature=1.0), "key"),
        (dict(max_new_tokens=5, top_k=0), "top_k"),
        (dict(max_new_tokens=5, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=5, cache_length=15), "cache"),
        (dict(max_new_tokens=5, eos_id=VOCAB), "eos_id"),
    ],
)
def test_bad_arguments_raise(kw, match):
    model = varied_model("gemma1")
    tokens, mask = padded_batch([4, 6])
    with pytest.raises(ValueError, match=match):
        generate(model, tokens, mask, **kw)


def test_empty_prompts_raise():
    model = varied_model("gemma1")
    with pytest.raises(ValueError, match="empty"):
        generate(model, jnp.zeros((2, 0), jnp.int32), max_new_tokens=3)
    tokens, mask = padded_batch([4, 6])
    with pytest.raises(ValueError, match="padding_mask row 1 marks no real token"):
        generate(model, tokens, mask.at[1].set(False), max_new_tokens=3)
    with pytest.raises(ValueError, match="token id 500"):
        generate(model, tokens.at[0, 3].set(500), mask, max_new_tokens=3)


# --- text API --------------------------------------------------------------------------------


def test_generate_text_decodes_up_to_eos():
    model = varied_model("gemma3", seed=18)
    tok = CharTokenizer()
    prompts = ["hello there", "ab", "xyz"]  # 12 tokens with BOS: the shared prompt shape
    tokens, mask = tok.encode_batch(prompts)
    free = greedy_by_full_forward(model, tokens, mask, NEW)
    tok.eos_id = int(free[1, 5])  # row 1 ends by step 5; the others maybe, maybe not
    want = []
    for row in free.tolist():
        stop = row.index(tok.eos_id) if tok.eos_id in row else len(row)
        want.append("".join(map(chr, row[:stop])))
    assert len(want[1]) <= 5
    assert generate_text(model, tok, prompts, max_new_tokens=NEW) == want
    # One string in, one string out (its own shape: compiled separately, but only 5 steps).
    assert generate_text(model, tok, "ab", max_new_tokens=5) == [want[1][:5]]


# --- against Hugging Face transformers -------------------------------------------------------


def _hf_tiny(family: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    shared = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attn_implementation="eager",
        bos_token_id=2, eos_token_id=None, pad_token_id=0,
    )
    if family == "gemma1":
        model = transformers.GemmaForCausalLM(
            transformers.GemmaConfig(num_hidden_layers=2, **shared)
        )
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(
                num_hidden_layers=2, sliding_window=WINDOW, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention"], **shared,
            )
        )
    else:
        model = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(
                num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                **shared,
            )
        )
    # HF initialises with std 0.02 and zero norms: greedy output would repeat one token.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("family", ["gemma1", "gemma2", "gemma3"])
def test_greedy_matches_hf_generate(family):
    torch = pytest.importorskip("torch")
    from gemma_eqx.formats.hf import from_hf

    hf_model = _hf_tiny(family)
    ours = from_hf(hf_model)
    prompts = np.random.default_rng(20).integers(3, VOCAB, (2, 9))
    with torch.no_grad():
        hf_out = hf_model.generate(
            torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False, max_new_tokens=30,
        )
    hf_new = hf_out[:, prompts.shape[1]:].numpy()
    got = np.asarray(generate(ours, jnp.asarray(prompts, jnp.int32), max_new_tokens=30))
    np.testing.assert_array_equal(got, hf_new)
    assert len(np.unique(hf_new)) > 5, "degenerate model: greedy output barely varies"


# --- the real Gemma 3 270M -------------------------------------------------------------------


@pytest.mark.slow
def test_real_270m_greedy_matches_hf_generate(gemma270m, hf270m):
    import torch

    ours, _ = gemma270m
    # BOS, then a random id sequence said one and a half times: the model should copy on.
    # One row: HF's generate is slow on CPU (~1 s a token here); batching is tested above.
    half = np.random.default_rng(0).integers(1000, 20_000, (1, 12))
    prompt = np.concatenate([[[2]], half, half[:, :6]], axis=1)
    config = copy.deepcopy(hf270m.generation_config)
    config.eos_token_id = None  # generate all 30 tokens, as ours does without eos_id
    with torch.no_grad():
        hf_out = hf270m.generate(
            torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            do_sample=False, max_new_tokens=30, generation_config=config,
        )
    hf_new = hf_out[:, prompt.shape[1]:].numpy()
    got = np.asarray(generate(ours, jnp.asarray(prompt, jnp.int32), max_new_tokens=30))
    np.testing.assert_array_equal(got, hf_new)
    # A pretrained model copies the rest of the repeated half.
    np.testing.assert_array_equal(got[0, :6], half[0, 6:])


@pytest.mark.slow
def test_real_270m_generate_text_counts_on(gemma270m):
    model, tokenizer = gemma270m
    texts = generate_text(model, tokenizer, ["1, 2, 3, 4, 5,", "Monday, Tuesday,"],
                          max_new_tokens=8)
    assert texts[0].startswith(" 6, 7"), texts
    assert texts[1].startswith(" Wednesday"), texts
