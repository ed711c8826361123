"""The study's analyses on a tiny model trained to copy, whose induction head is known by
construction (see tests/induction_model.py), and on hand-made inputs with known answers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factories import CharTokenizer
from induction_model import BOS_ID, INDUCTION_HEAD, PAD_ID, VOCAB, VOCAB_LOW, trained
from interp import staged
from interp.analyses import (
    attribution_gradient,
    correct_token_logprobs,
    duplicate_token_scores,
    expected_pattern_mass,
    induction_pattern,
    induction_scores,
    knockout_eval,
    knockout_sweep,
    minimal_breaking_set,
    previous_token_scores,
    rank_heads,
    repeated_digits,
    repeated_random_tokens,
    repetition_stats,
    single_head_masks,
)
from interp.examples import Example, study_examples, tokenize_examples
from interp.surgery import attention_patterns, forward_with_records, knock_out, knockout_mask

P, REPEATS, BATCH = 12, 3, 48
CHANCE = 1 / (VOCAB - VOCAB_LOW)


@pytest.fixture(scope="module")
def model():
    result = trained()
    print(f"\ntiny induction model: trained in {result.seconds:.1f} s, copy loss "
          f"{result.final_loss:.3f} nats")
    return result.model


@pytest.fixture(scope="module")
def tokens():
    return repeated_random_tokens(jax.random.key(7), batch=BATCH, period=P, repeats=REPEATS,
                                  vocab_low=VOCAB_LOW, vocab_high=VOCAB, bos_id=BOS_ID)


@pytest.fixture(scope="module")
def patterns(model, tokens):
    return attention_patterns(model, tokens)


@pytest.fixture(scope="module")
def padded():
    """Two periods (12 and 9) in one left-padded batch; eval = repetitions 2.. of each row."""
    a = repeated_random_tokens(jax.random.key(8), batch=8, period=12, repeats=2,
                               vocab_low=VOCAB_LOW, vocab_high=VOCAB, bos_id=BOS_ID)
    b = repeated_random_tokens(jax.random.key(9), batch=8, period=9, repeats=2,
                               vocab_low=VOCAB_LOW, vocab_high=VOCAB, bos_id=BOS_ID)
    pad = a.shape[1] - b.shape[1]
    tokens = jnp.concatenate([a, jnp.pad(b, ((0, 0), (pad, 0)), constant_values=PAD_ID)])
    real = jnp.arange(a.shape[1])[None] >= jnp.array([0] * 8 + [pad] * 8)[:, None]
    start = jnp.array([1 + 12 + 1] * 8 + [pad + 1 + 9 + 1] * 8)[:, None]
    eval_mask = jnp.arange(a.shape[1])[None] >= start  # second repetition, from its 2nd token
    return tokens, real, eval_mask


def _second_rep_mask(tokens, period):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]) >= 2 + period, tokens.shape)


# ------------------------------------------------------------------------------------ inputs


def test_repeated_random_tokens_layout(tokens):
    t = np.asarray(tokens)
    assert t.shape == (BATCH, 1 + P * REPEATS) and t.dtype == np.int32
    assert (t[:, 0] == BOS_ID).all() and (t[:, 1:] >= VOCAB_LOW).all() and (t < VOCAB).all()
    for r in range(1, REPEATS):
        np.testing.assert_array_equal(t[:, 1 + r * P: 1 + (r + 1) * P], t[:, 1:1 + P])
    assert len({tuple(row) for row in t[:, 1:1 + P]}) == BATCH  # different strings per row


class MergingTokenizer(CharTokenizer):
    def encode(self, text):
        return [10 + ord(c) for c in text] if len(text) == 1 else [999]


def test_repeated_digits_through_a_tokenizer():
    t = np.asarray(repeated_digits(CharTokenizer(offset=10), np.random.default_rng(0), batch=3))
    assert t.shape == (3, 41) and (t[:, 0] == 2).all()
    digits = t[:, 1:] - 10 - ord("0")
    assert ((digits >= 0) & (digits <= 9)).all()
    np.testing.assert_array_equal(t[:, 1:21], t[:, 21:])
    with pytest.raises(ValueError, match="one token per digit"):
        repeated_digits(MergingTokenizer(offset=10), 0, batch=1)


def test_examples_tokenize_into_one_padded_batch():
    tiny = Example("tiny", (("ab", False), ("a", False), ("b", True)))
    examples = study_examples(seed=3) + [tiny]
    batch = tokenize_examples(examples, CharTokenizer(offset=10))
    tokens, real, scored = (np.asarray(x) for x in batch[:3])
    assert batch.names[:2] == ["random digits", "repeated words"] and tokens.shape[0] == 6
    assert real[:, -1].all() and not real[-1, 0]  # left padding
    for i, ex in enumerate(examples):
        row = tokens[i][real[i]]
        assert row[0] == 2 and "".join(chr(c - 10) for c in row[1:]) == ex.text
        assert not (scored[i] & ~real[i]).any()
        # Every scored character continues a bigram seen earlier: copying can predict it.
        text = ex.text
        for pos in np.flatnonzero(scored[i]):
            k = pos - (len(tokens[i]) - len(row)) - 1  # index of the scored char in the text
            assert text[k - 1:k + 1] in text[:k], (ex.name, text[k - 1:k + 1])
    assert scored[-1].sum() == 1 and tokens[-1, scored[-1]] == 10 + ord("b")
    right = tokenize_examples(examples, CharTokenizer(offset=10), pad_side="right")
    assert np.asarray(right.padding_mask)[:, 0].all()


@pytest.mark.slow
def test_examples_with_the_real_gemma_tokenizer(gguf_path):
    """Digits are single tokens, and every scored token continues a token bigram seen earlier
    in its row (so the evaluation positions are ones copying can predict)."""
    from gemma_eqx.formats.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf_path)
    digits = np.asarray(repeated_digits(tok, 0, batch=2))
    assert digits.shape == (2, 41) and (digits[:, 0] == tok.bos_id).all()
    np.testing.assert_array_equal(digits[:, 1:21], digits[:, 21:])
    batch = tokenize_examples(study_examples(), tok)
    tokens, scored = np.asarray(batch.tokens), np.asarray(batch.eval_mask)
    for i, name in enumerate(batch.names):
        row = tokens[i].tolist()
        seen = set()
        for pos in range(1, len(row)):
            if scored[i, pos]:
                assert (row[pos - 1], row[pos]) in seen, (name, tok.id_to_piece(row[pos]))
            seen.add((row[pos - 1], row[pos]))
        assert scored[i].sum() >= 10, name


# --------------------------------------------------------------------------------- behaviour


def test_logprobs_and_repetition_stats(model, tokens):
    logits, _ = forward_with_records(model, tokens)
    lp = correct_token_logprobs(logits, tokens)
    ref = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    t = np.asarray(tokens)
    expected = np.take_along_axis(np.asarray(ref)[:, :-1], t[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lp, expected, atol=1e-5)
    stats = repetition_stats(lp, logits, tokens, P, REPEATS)
    hits = np.asarray(logits).argmax(-1)[:, :-1] == t[:, 1:]
    # Repetition r: the predictions of its tokens after the first (targets 2 + rP .. (r+1)P).
    for r in range(REPEATS):
        np.testing.assert_allclose(stats.accuracy[r], hits[:, r * P + 1:(r + 1) * P].mean(),
                                   1e-6)
        np.testing.assert_allclose(stats.logprob[r],
                                   expected[:, r * P + 1:(r + 1) * P].mean(), 1e-4)
    np.testing.assert_allclose(
        stats.later_accuracy, np.concatenate(
            [hits[:, r * P + 1:(r + 1) * P] for r in range(1, REPEATS)], 1).mean(), 1e-6)
    # The trained model copies: chance in the first repetition, near perfect afterwards.
    print(f"accuracy per repetition {np.round(np.asarray(stats.accuracy), 3)}")
    assert stats.accuracy[0] < 3 * CHANCE
    assert stats.accuracy[1] > 0.9 and stats.later_accuracy > 0.9
    assert stats.later_logprob > -0.5 > -3 > stats.logprob[0]


# ------------------------------------------------------------------------------- head scores


def test_head_scores_against_direct_indexing(patterns):
    p = np.asarray(patterns, np.float64)
    seq = p.shape[-1]
    q = np.arange(1 + P, seq)
    np.testing.assert_allclose(induction_scores(patterns, P),
                               p[..., q, q - P + 1].mean(axis=(1, 3)), atol=1e-6)
    np.testing.assert_allclose(duplicate_token_scores(patterns, P),
                               p[..., q, q - P].mean(axis=(1, 3)), atol=1e-6)
    q = np.arange(2, seq)
    np.testing.assert_allclose(previous_token_scores(patterns),
                               p[..., q, q - 1].mean(axis=(1, 3)), atol=1e-6)
    ranked = rank_heads(jnp.asarray([[0.1, 0.5], [0.9, 0.3]]))
    assert [(layer, head) for layer, head, _ in ranked] == [(1, 0), (0, 1), (1, 1), (0, 0)]
    assert rank_heads(jnp.asarray([[0.1, 0.5], [0.9, 0.3]]), top=1) == [(1, 0, pytest.approx(0.9))]


def test_induction_head_is_ranked_first(patterns):
    ind = induction_scores(patterns, P)
    ranked = rank_heads(ind)
    print(f"induction scores\n{np.round(np.asarray(ind), 3)}")
    assert ranked[0][:2] == INDUCTION_HEAD
    assert ranked[0][2] > 0.6 and ranked[1][2] < 0.3
    # Its partners: layer-0 heads that favour the previous token over the other two keys of
    # their 3-token window (uniform would give 1/3); no layer-1 head looks at q - 1.
    prev = np.asarray(previous_token_scores(patterns))
    print(f"previous-token scores\n{np.round(prev, 3)}")
    assert prev[0].max() > 0.5 and prev[1].max() < 0.2


def test_pattern_mass_on_a_padded_batch(model, padded):
    """Per-example expected masks (shifted by the padding) give each row its own score."""
    tokens, real, _ = padded
    pats = attention_patterns(model, tokens, padding_mask=real)
    seq = tokens.shape[1]
    pad = seq - (1 + 2 * 9)
    masks = np.stack([induction_pattern(seq, 12)] * 8 + [np.pad(
        induction_pattern(seq - pad, 9), ((pad, 0), (pad, 0)))] * 8)
    scores = expected_pattern_mass(pats, masks)
    alone = induction_scores(attention_patterns(model, tokens[8:, pad:]), 9)
    top = induction_scores(pats[:, :8], 12)
    np.testing.assert_allclose(scores, (alone + top) / 2, atol=1e-5)


# --------------------------------------------------------------------------------- knock-out


def test_knockout_of_the_induction_head_breaks_copying(model, padded):
    tokens, real, eval_mask = padded
    clean = knockout_eval(model, tokens, knockout_mask(model), eval_mask, padding_mask=real)
    other = (INDUCTION_HEAD[0], (INDUCTION_HEAD[1] + 1) % 4)
    knocked = knockout_eval(model, tokens, knockout_mask(model, [INDUCTION_HEAD]), eval_mask,
                            padding_mask=real)
    spared = knockout_eval(model, tokens, knockout_mask(model, [other]), eval_mask,
                           padding_mask=real)
    print(f"second-repetition accuracy: clean {float(clean.accuracy.mean()):.3f}, induction "
          f"head knocked out {float(knocked.accuracy.mean()):.3f}, head {other} knocked out "
          f"{float(spared.accuracy.mean()):.3f}")
    np.testing.assert_array_equal(clean.count, [12 - 1] * 8 + [9 - 1] * 8)
    assert clean.accuracy.mean() > 0.85
    assert knocked.accuracy.mean() < 3 * CHANCE and knocked.logprob.mean() < -3
    assert spared.accuracy.mean() > clean.accuracy.mean() - 0.05
    # Per example, against an independent computation with the head's pattern pinned to BOS.
    logits, _ = forward_with_records(knock_out(model, knockout_mask(model, [other])), tokens,
                                     padding_mask=real)
    hits = (np.asarray(logits).argmax(-1)[:, :-1] == np.asarray(tokens)[:, 1:])
    w = np.asarray(eval_mask)[:, 1:]
    np.testing.assert_allclose(spared.accuracy, (hits * w).sum(1) / w.sum(1), atol=1e-6)


def test_sweep_over_every_head(model, padded):
    """The staged sweep (layers below a mask's first knocked-out head shared, logits at the
    eval positions only, the vocabulary streamed) equals one knock-out at a time."""
    tokens, real, eval_mask = padded
    masks = single_head_masks(model)
    sweep = knockout_sweep(model, tokens, masks, eval_mask, padding_mask=real)
    assert sweep.accuracy.shape == (8, 16)
    for i in range(len(masks)):
        one = knockout_eval(model, tokens, masks[i], eval_mask, padding_mask=real)
        np.testing.assert_allclose(sweep.logprob[i], one.logprob, atol=1e-5)
        np.testing.assert_allclose(sweep.accuracy[i], one.accuracy, atol=1e-6)
        np.testing.assert_array_equal(sweep.count[i], one.count)
    worst = int(np.argmin(np.asarray(sweep.accuracy.mean(1))))
    assert divmod(worst, 4) == INDUCTION_HEAD

    # Masks of several heads, soft values, nothing knocked out; split 2 per program (padded
    # to one schedule: a single compilation).
    mixed = np.ones((5, 2, 4), np.float32)
    mixed[0, 1, 3] = 0
    mixed[1, 0, 1], mixed[1, 1, 2] = 0.5, 0
    mixed[3, 0] = 0
    mixed[4, 1, 0] = 0.25
    before = staged.compilations()
    chunked = knockout_sweep(model, tokens, jnp.asarray(mixed), eval_mask, padding_mask=real,
                             chunk=2)
    assert staged.compilations() - before == 1
    for i, mask in enumerate(mixed):
        one = knockout_eval(model, tokens, jnp.asarray(mask), eval_mask, padding_mask=real)
        np.testing.assert_allclose(chunked.logprob[i], one.logprob, atol=1e-5)
        np.testing.assert_allclose(chunked.accuracy[i], one.accuracy, atol=1e-6)


def test_attribution_gradient_points_at_the_induction_head(model, tokens, patterns):
    """From the point where the top induction-score heads are knocked out, the gradient picks
    out the induction head by far. At all ones the gradients are small (the head's pattern is
    saturated, and the other heads' first-order effects have either sign, as in the study);
    there the induction head is still the one whose removal hurts most to first order."""
    eval_mask = _second_rep_mask(tokens, P)
    ones = knockout_mask(model)
    grad = attribution_gradient(model, tokens, eval_mask, ones)
    print(f"attribution at all ones\n{np.round(np.asarray(grad), 3)}")
    assert rank_heads(grad)[0][:2] == INDUCTION_HEAD and grad[INDUCTION_HEAD] > 0
    top2 = [h[:2] for h in rank_heads(induction_scores(patterns, P), 2)]
    at = knockout_mask(model, top2)
    grad_k = attribution_gradient(model, tokens, eval_mask, at)
    print(f"attribution with {top2} knocked out\n{np.round(np.asarray(grad_k), 3)}")
    (layer, head, largest), (_, _, second) = rank_heads(jnp.abs(grad_k), 2)
    assert (layer, head) == INDUCTION_HEAD and largest > 10 * second
    # It is the derivative of the objective knockout_eval measures (central difference).
    def objective(mask):
        r = knockout_eval(model, tokens, mask, eval_mask)
        return float((r.logprob * r.count).sum() / r.count.sum())

    eps = 1e-2
    e = jnp.zeros_like(ones).at[INDUCTION_HEAD].set(eps)
    fd = (objective(at + e) - objective(at - e)) / (2 * eps)
    np.testing.assert_allclose(grad_k[INDUCTION_HEAD], fd, rtol=2e-2)


def test_minimal_breaking_set(model, tokens, patterns):
    eval_mask = _second_rep_mask(tokens, P)
    ranked = rank_heads(induction_scores(patterns, P))
    found = minimal_breaking_set(model, tokens, eval_mask, ranked, chance_accuracy=CHANCE,
                                 threshold=0.1)
    print(f"minimal breaking set {found.heads}: accuracy {found.baseline:.3f} -> "
          f"{found.accuracy:.3f}; trail {found.trail}")
    assert found.heads == [INDUCTION_HEAD] and found.broken
    assert found.baseline > 0.9 and found.accuracy < CHANCE + 0.1
    # A bad order: three other heads first. Pruning removes them again.
    others = [(1, h) for h in range(4) if (1, h) != INDUCTION_HEAD]
    found = minimal_breaking_set(model, tokens, eval_mask, others + [INDUCTION_HEAD],
                                 chance_accuracy=CHANCE, threshold=0.1)
    assert found.heads == [INDUCTION_HEAD] and found.broken
    assert [step[0] for step in found.trail] == ["add"] * 4 + ["drop"] * 3 + ["keep"]
    assert all(acc > 0.5 for _, _, acc in found.trail[:3])
    # Candidates that cannot break it are all returned, flagged unbroken.
    found = minimal_breaking_set(model, tokens, eval_mask, others[:1], chance_accuracy=CHANCE,
                                 threshold=0.1)
    assert not found.broken and found.heads == others[:1]


def test_compile_log_counts_programs_per_step_and_cache_hits(tmp_path):
    """`CompileLog` counts each new program in the step that compiled it, not a cached call;
    a persistent compilation cache turns a fresh process's compilations into hits."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, jax, jax.numpy as jnp
        from gemma_eqx.core.runtime import CompileLog, enable_compilation_cache
        enable_compilation_cache({str(tmp_path / "xla")!r})
        log = CompileLog()
        f = jax.jit(lambda x: jnp.sin(x) * 3)
        log.start("first")
        f(jnp.ones(3)); f(jnp.ones(3) * 2)
        log.start("second")
        f(jnp.ones(3)); f(jnp.ones(4))
        log.close()
        f(jnp.ones(5))  # after close: not counted
        print(json.dumps(log.as_dict()))
    """)
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                      text=True, check=True).stdout) for _ in range(2)]
    for run in runs:
        assert run["first"]["programs"] >= 1 and run["second"]["programs"] >= 1
    first, second = runs
    assert first["first"]["cache_hits"] == 0 and first["second"]["cache_hits"] == 0
    assert second["first"]["cache_hits"] == second["first"]["programs"]
    assert second["second"]["cache_hits"] == second["second"]["programs"]
