"""The study's analyses on the real Gemma 3 270M (float32, from the GGUF in the test session).

References: transformers' eager attention weights (`output_attentions`) for the recorded
patterns; the model's own argmax predictions for copying; a Python trace counter and JAX's
compile events for compile-once; the unsharded model for the sharded one; central finite
differences of the knock-out evaluation for the attribution gradient.

Measured here (seed 0; see the prints with `-s`): 8 random digit strings of period 20 are
copied with accuracy 0.10 in the first repetition and 0.89 in the second (a repetition's digits
after its first, as everywhere). The top induction heads are (5, 2), (11, 2), (5, 1), (5, 3),
(13, 3); knocking out the top 10 takes accuracy on the second repetition from 0.89 to 0.12,
knocking out 10 heads that no score implicates leaves 0.88. Two findings differ from the Gemma
7B tutorial: the 10 heads with the *lowest* induction score are no control on 270M (they
include its previous-token heads, e.g. (10, 1) and (1, 3), and knocking them out leaves 0.14),
and on the study's example the attribution gradient is large at all-ones (+0.33 at (11, 2)) and
small at the top-10-knocked point (at most 0.13, at (9, 3), outside the top 10), not the other
way round.
"""

from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_eqx.model.weights import leaf_paths
from gemma_eqx.parallel.sharding import DEFAULT_RULES, LAST_AXIS_RULES, default_mesh, shard_model
from interp.analyses import (
    attribution_gradient,
    correct_token_hits,
    correct_token_logprobs,
    duplicate_token_scores,
    induction_scores,
    knockout_eval,
    knockout_sweep,
    previous_token_scores,
    rank_heads,
    repeated_digits,
    repetition_stats,
    single_head_masks,
)
from interp.surgery import (
    attention_patterns,
    forward_with_records,
    knock_out,
    knockout_mask,
    record_attention,
    set_knockout_mask,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

DIGITS = "01976954310149754605"  # the study's example
PERIOD, STRINGS, TOP = 20, 8, 10
SEQ = 1 + 2 * PERIOD
LAYERS, HEADS = 18, 4
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _say(text: str) -> None:
    print(f"\n[270m] {text}", end="")


@contextlib.contextmanager
def _count_compiles():
    events: list[str] = []
    listener = lambda name, *_, **__: events.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _second_repetition(tokens):
    """Eval mask: the second repetition but its first token, which copying cannot predict."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]) >= PERIOD + 2, tokens.shape)


def _pooled(result) -> float:
    return float((result.accuracy * result.count).sum() / result.count.sum())


@pytest.fixture(scope="module")
def model(gemma270m):
    return gemma270m[0]


@pytest.fixture(scope="module")
def tokenizer(gemma270m):
    return gemma270m[1]


@pytest.fixture(scope="module")
def digits(tokenizer):
    """The study's example: BOS + the digit string twice, one token per digit."""
    ids = [tokenizer.bos_id] + tokenizer.encode(DIGITS * 2)
    assert len(ids) == SEQ
    return jnp.asarray([ids], jnp.int32)


@pytest.fixture(scope="module")
def digit_patterns(model, digits):
    return attention_patterns(model, digits)


@pytest.fixture(scope="module")
def study(model, tokenizer):
    """Logits, every layer's pattern and the head scores on 8 random digit strings."""
    tokens = repeated_digits(tokenizer, 0, batch=STRINGS, period=PERIOD)
    start = time.perf_counter()
    logits, records = forward_with_records(record_attention(model), tokens)
    patterns = jnp.stack([records[i] for i in range(LAYERS)])
    _say(f"forward + patterns of {STRINGS} x {SEQ} tokens: {time.perf_counter() - start:.1f} s")
    scores = {"induction": induction_scores(patterns, PERIOD),
              "previous": previous_token_scores(patterns),
              "duplicate": duplicate_token_scores(patterns, PERIOD)}
    ranked = rank_heads(scores["induction"])
    _say(f"top induction heads: {[(layer, head, round(s, 3)) for layer, head, s in ranked[:TOP]]}")
    return dict(tokens=tokens, logits=logits, patterns=patterns, scores=scores,
                ranked=ranked, top=[(layer, head) for layer, head, _ in ranked[:TOP]])


@pytest.fixture(scope="module")
def evaluate(model):
    """A jitted knock-out evaluation written here (not the library's) with a trace counter:
    `fn(knocked_model, tokens, eval_mask) -> (accuracy, mean log-prob)` over the eval mask;
    `knocked` is the model with an all-ones knock-out installed."""
    traces = []

    @eqx.filter_jit
    def fn(knocked, tokens, eval_mask):
        traces.append(1)
        logits = knocked(tokens)
        weight = eval_mask[:, 1:]
        hits = (correct_token_hits(logits, tokens) & weight).sum()
        logprob = jnp.where(weight, correct_token_logprobs(logits, tokens), 0.0).sum()
        return hits / weight.sum(), logprob / weight.sum()

    return SimpleNamespace(fn=fn, traces=traces, knocked=knock_out(model, knockout_mask(model)))


# --------------------------------------------------------------- 1. attention against HF


def _hf_attentions(hf, tokens, real):
    positions = np.maximum(np.cumsum(real, 1) - 1, 0)
    with torch.no_grad():
        out = hf(torch.tensor(np.asarray(tokens), dtype=torch.long),
                 attention_mask=torch.tensor(real.astype(np.int64)),
                 position_ids=torch.tensor(positions), output_attentions=True)
    return np.stack([a.numpy() for a in out.attentions])  # [layers, batch, heads, q, k]


def _padded_batch(tokenizer, digits):
    """The study's example, a 12-digit string repeated and a sentence, left-padded to 41."""
    rows = [
        np.asarray(digits[0]).tolist(),
        [tokenizer.bos_id] + tokenizer.encode("384729105563" * 2),
        [tokenizer.bos_id] + tokenizer.encode("The capital of France is Paris. The capital of "
                                              "France is"),
    ]
    tokens = np.full((len(rows), SEQ), tokenizer.pad_id, np.int32)
    real = np.zeros((len(rows), SEQ), bool)
    for i, row in enumerate(rows):
        assert len(row) <= SEQ
        tokens[i, SEQ - len(row):] = row
        real[i, SEQ - len(row):] = True
    assert real.sum(1).tolist() == [41, 25, len(rows[2])] and len(rows[2]) < 20
    return tokens, real


@pytest.mark.parametrize("case", ["digits", "left-padded"])
def test_attention_matches_hf_output_attentions(case, model, tokenizer, hf270m, digits,
                                                digit_patterns):
    """Every layer's recorded pattern equals transformers' eager attention weights, on the
    study's example alone and in a left-padded batch (real queries and keys compared)."""
    if case == "digits":
        tokens, real = np.asarray(digits), np.ones(digits.shape, bool)
        ours = np.asarray(digit_patterns)
    else:
        tokens, real = _padded_batch(tokenizer, digits)
        ours = np.asarray(attention_patterns(model, jnp.asarray(tokens),
                                             padding_mask=jnp.asarray(real)))
    theirs = _hf_attentions(hf270m, tokens, real)
    assert ours.shape == theirs.shape == (LAYERS, len(tokens), HEADS, SEQ, SEQ)
    both = real[None, :, None, :, None] & real[None, :, None, None, :]
    diff = np.abs(np.where(both, ours - theirs, 0))
    layer = np.unravel_index(diff.argmax(), diff.shape)[0]
    _say(f"{case}: max |pattern - HF| {diff.max():.2e} (layer {layer})")
    assert diff.max() <= 1e-4
    # Not vacuous: real rows are distributions, and heads attend to more than BOS.
    sums = np.where(real[None, :, None, :], ours.sum(-1), 1.0)
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert np.where(both, ours, 0)[..., 1:].max() > 0.9
    if case == "left-padded":
        # Row 0 (unpadded) is the study's example alone; no query attends to padding.
        np.testing.assert_allclose(ours[:, 0], np.asarray(digit_patterns)[:, 0], atol=1e-5)
        assert ours[:, 1:][np.broadcast_to(~real[None, 1:, None, None, :],
                                           ours[:, 1:].shape)].max() == 0


# ------------------------------------------------------------------ 2. copying and knock-out


def test_digits_are_copied_and_top_induction_heads_carry_it(model, study):
    """The second repetition is copied; knocking out the 10 top induction heads breaks that,
    knocking out 10 heads no pattern score implicates does not."""
    tokens, logits, scores = study["tokens"], study["logits"], study["scores"]
    stats = repetition_stats(correct_token_logprobs(logits, tokens), logits, tokens, PERIOD, 2)
    first, second = (float(a) for a in stats.accuracy)
    _say(f"accuracy by repetition {first:.3f} -> {second:.3f}; mean log-prob "
         f"{float(stats.logprob[0]):.2f} -> {float(stats.logprob[1]):.2f}")
    assert second >= 0.8 and first <= 0.3
    assert float(stats.logprob[1]) > float(stats.logprob[0]) + 1.0

    eval_mask = _second_repetition(tokens)
    ranked = study["ranked"]
    # A control of heads that no score implicates: lowest by the largest of their induction,
    # previous-token and duplicate-token scores.
    uninvolved = rank_heads(jnp.maximum(jnp.maximum(scores["induction"], scores["previous"]),
                                        scores["duplicate"]))[-TOP:]
    sets = {
        "none": [],
        "top-10 induction": study["top"],
        "bottom-10 induction": [(layer, head) for layer, head, _ in ranked[-TOP:]],
        "10 uninvolved": [(layer, head) for layer, head, _ in uninvolved],
    }
    start = time.perf_counter()
    acc = {name: _pooled(knockout_eval(model, tokens, knockout_mask(model, heads),
                                       eval_mask))
           for name, heads in sets.items()}
    _say(f"knock-out accuracy on the second repetition ({time.perf_counter() - start:.1f} s): "
         + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    _say(f"bottom-10 {sets['bottom-10 induction']}; uninvolved {sets['10 uninvolved']}")

    # All-ones knock-out is the plain model: its accuracy is the logits' own.
    hits = np.asarray(correct_token_hits(logits, tokens))[:, PERIOD + 1:]
    assert acc["none"] == pytest.approx(hits.mean(), abs=1e-6) and acc["none"] >= 0.8
    assert acc["top-10 induction"] < 0.35
    assert acc["10 uninvolved"] >= acc["none"] - 0.1
    # On 270M the lowest induction scores belong to, among others, strong previous-token heads
    # (which induction heads read), so that "control" breaks copying as well.
    previous = np.asarray(scores["previous"])
    assert max(previous[h] for h in sets["bottom-10 induction"]) > 0.5
    assert acc["bottom-10 induction"] < 0.35


# ------------------------------------------------------------ 3. a sweep that compiles once


def test_head_sweep_in_a_python_loop_compiles_once(model, digits, evaluate):
    """A jitted knock-out evaluation called in a Python loop over all 72 single-head masks,
    each installed with `set_knockout_mask`, traces and compiles once; its numbers are those
    of `knockout_sweep` (lax.map) for the same masks."""
    masks = list(single_head_masks(model))  # split before counting: slicing compiles too
    assert len(masks) == LAYERS * HEADS
    eval_mask = _second_repetition(digits)
    set_knockout_mask(evaluate.knocked, masks[0])  # its eager slicing compiles on first use
    first_use = not evaluate.traces
    start = time.perf_counter()
    with _count_compiles() as events:
        results = [evaluate.fn(set_knockout_mask(evaluate.knocked, m), digits, eval_mask)
                   for m in masks]
        accuracy = np.asarray([float(a) for a, _ in results])
        logprob = np.asarray([float(lp) for _, lp in results])
    compiles = events.count(COMPILE_EVENT)
    _say(f"python loop over 72 masks: {time.perf_counter() - start:.1f} s, "
         f"{len(evaluate.traces)} trace(s), {compiles} backend compile(s)")
    assert len(evaluate.traces) == 1
    assert compiles == (1 if first_use else 0)

    order = np.argsort(accuracy, kind="stable")
    _say("single-head knock-outs hurting most: "
         + ", ".join(f"{divmod(int(i), HEADS)} {accuracy[i]:.2f}" for i in order[:6])
         + f" (median {np.median(accuracy):.2f})")
    # Not vacuous: single heads matter unequally, and the loop saw each mask's own value.
    assert accuracy.min() < 0.5 < np.median(accuracy)

    # knockout_sweep on the 6 most damaging masks and 6 spread over the rest (all 72 would
    # cost another 72 forward passes for no new code path).
    rest = [int(i) for i in order[6:]]
    chosen = [int(i) for i in order[:6]] + rest[:: -(-len(rest) // 6)]
    start = time.perf_counter()
    swept = knockout_sweep(model, digits, jnp.stack([masks[i] for i in chosen]), eval_mask)
    _say(f"knockout_sweep over {len(chosen)} of the masks: {time.perf_counter() - start:.1f} s")
    np.testing.assert_allclose(np.asarray(swept.accuracy[:, 0]), accuracy[chosen], atol=1e-6)
    np.testing.assert_allclose(np.asarray(swept.logprob[:, 0]), logprob[chosen], atol=2e-5)


@pytest.fixture(scope="module")
def attribution(model, digits, study):
    """Attribution gradients on the study's example at all-ones and at the top 10 knocked."""
    eval_mask = _second_repetition(digits)
    start = time.perf_counter()
    grads = {"ones": attribution_gradient(model, digits, eval_mask, knockout_mask(model)),
             "knocked": attribution_gradient(model, digits, eval_mask,
                                             knockout_mask(model, study["top"]))}
    grads = {k: np.asarray(v) for k, v in grads.items()}
    _say(f"attribution gradients at two points: {time.perf_counter() - start:.1f} s")
    return grads


# ---------------------------------------------------------------------------- 4. sharding


@pytest.mark.parametrize("rules", [DEFAULT_RULES, LAST_AXIS_RULES], ids=["default", "last-axis"])
def test_analyses_on_a_model_sharded_over_8_devices(rules, model, digits, digit_patterns, study,
                                                    attribution, evaluate):
    """The analyses, unchanged, on the model sharded over 8 devices give the unsharded numbers
    (knock-out against this file's own jitted evaluation of the unsharded model)."""
    devices = set(jax.devices())
    assert len(devices) == 8
    sharded = shard_model(model, default_mesh(), rules)
    leaves = leaf_paths(sharded)
    split = {p for p, x in leaves.items() if x.sharding.shard_shape(x.shape) != x.shape}
    for path, x in leaves.items():
        assert {s.device for s in x.addressable_shards} == devices, path
    fraction = sum(leaves[p].size for p in split) / sum(x.size for x in leaves.values())
    _say(f"{len(split)}/{len(leaves)} leaves split, {fraction:.1%} of the parameters")
    embedding = leaves["embedder.embedding"]
    if rules is LAST_AXIS_RULES:
        assert split == set(leaves)
        assert embedding.sharding.shard_shape(embedding.shape) == (262_144, 640 // 8)
    else:
        assert embedding.sharding.shard_shape(embedding.shape) == (262_144 // 8, 640)
        assert {p for p in leaves if p.endswith(("w_gating", "w_linear"))} <= split
        assert fraction > 0.8

    eval_mask = _second_repetition(digits)
    mask = knockout_mask(model, study["top"])
    start = time.perf_counter()
    patterns = attention_patterns(sharded, digits)
    np.testing.assert_allclose(patterns, digit_patterns, atol=1e-5)
    np.testing.assert_allclose(induction_scores(patterns, PERIOD),
                               induction_scores(digit_patterns, PERIOD), atol=1e-6)
    got = knockout_eval(sharded, digits, mask, eval_mask)
    accuracy, logprob = evaluate.fn(set_knockout_mask(evaluate.knocked, mask), digits, eval_mask)
    assert float(got.accuracy[0]) == pytest.approx(float(accuracy), abs=1e-6)
    assert float(got.logprob[0]) == pytest.approx(float(logprob), abs=1e-5)
    grad = attribution_gradient(sharded, digits, eval_mask, mask)
    diff = float(np.abs(np.asarray(grad) - attribution["knocked"]).max())
    _say(f"sharded analyses: {time.perf_counter() - start:.1f} s; max |attribution diff| "
         f"{diff:.1e}")
    assert diff <= 1e-5


# ------------------------------------------------------------------------ 5. attribution


def test_attribution_gradient(model, digits, study, attribution, evaluate):
    """The gradient equals central differences of the knock-out evaluation; at all-ones it is
    largest at a top induction head; at the top-10-knocked point it is much smaller."""
    top = study["top"]
    eval_mask = _second_repetition(digits)
    is_top = np.zeros((LAYERS, HEADS), bool)
    is_top[tuple(np.asarray(top).T)] = True
    summary = {}
    for point, grad in attribution.items():
        magnitude = np.abs(grad)
        order = np.argsort(-magnitude, axis=None, kind="stable")
        summary[point] = dict(max=float(magnitude.max()), top=float(magnitude[is_top].mean()),
                              rest=float(magnitude[~is_top].mean()))
        _say(f"gradient at {point}: largest "
             + ", ".join(f"{divmod(int(i), HEADS)} {grad.flat[i]:+.3f}" for i in order[:5])
             + f"; mean |grad| top-10 {summary[point]['top']:.3f}, rest "
               f"{summary[point]['rest']:.3f}")

        # Central differences at the head with the largest gradient (a new mask value through
        # the already compiled `evaluate`).
        base = knockout_mask(model, [] if point == "ones" else top)
        layer, head = divmod(int(order[0]), HEADS)
        eps = 1e-2
        side = [
            float(evaluate.fn(set_knockout_mask(evaluate.knocked, base.at[layer, head].add(s)),
                              digits, eval_mask)[1])
            for s in (eps, -eps)
        ]
        numeric = (side[0] - side[1]) / (2 * eps)
        _say(f"  d/dm ({layer}, {head}): autodiff {grad[layer, head]:+.4f}, finite "
             f"differences {numeric:+.4f}")
        assert grad[layer, head] == pytest.approx(numeric, rel=2e-2, abs=2e-3)
    assert len(evaluate.traces) == 1

    ones, knocked = summary["ones"], summary["knocked"]
    largest = divmod(int(np.abs(attribution["ones"]).argmax()), HEADS)
    assert largest in top
    # Unlike the 7B tutorial ("near zero at all-ones, large for key heads once ablated"), on
    # 270M the all-ones gradient is the large one: no head compensates for a top head here.
    assert knocked["max"] < 0.5 * ones["max"]
