"""The induction-head study (experiments 1-5) in one call, returning plain data.

`run_study(model, tokenizer)` does what `gemma-eqx induction` reports: behaviour on repeated
random digits, attention capture, head scores, knock-out of the top heads (and of as many
heads that score low on every pattern, as a control) on the study's examples, attribution
gradients at two mask points, and the smallest set of heads whose knock-out breaks copying.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma_eqx.checks import check_length
from gemma_eqx.modules import Transformer

from . import analyses, examples
from .surgery import forward_with_records, knock_out, knockout_mask, record_attention

Progress = Callable[[str], None]


@dataclasses.dataclass
class StudyResult:
    """Everything the report shows; `to_json()` gives what `report.json` holds."""

    model_name: str
    preset: str
    period: int
    tokens: list[list[int]]  # [strings, 1 + 2 * period]: row 0 is the shown example
    token_pieces: list[str]  # row 0 as text pieces
    eval_positions: list[int]  # token indices scored as "copyable" (second repetition)
    logprobs: list[list[float]]  # [strings, seq - 1] correct-token log-probs, original
    knocked_logprobs: list[list[float]]  # the same with the top heads knocked out
    repetitions: dict[str, dict[str, list[float]]]  # {"original"|"knocked": {logprob, accuracy}}
    induction_scores: list[list[float]]  # [layers][heads]
    previous_token_scores: list[list[float]]
    duplicate_token_scores: list[list[float]]
    top_heads: list[dict[str, Any]]  # [{"layer", "head", "score"}] sorted by score
    knocked_heads: list[list[int]]  # the top `top` heads, knocked out together
    control_heads: list[list[int]]  # as many heads scoring lowest on all three patterns
    knockout_examples: list[dict[str, Any]]  # per example: original / knocked / control
    attribution_all_ones: list[list[float]]
    attribution_knocked: list[list[float]]
    minimal_set: dict[str, Any]
    timings: dict[str, float]
    top_patterns: np.ndarray = dataclasses.field(repr=False)  # [shown heads, seq, seq]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["top_patterns"]
        return out


def _digit_batch(tokenizer: Any, digits: str | None, period: int, strings: int, seed: int):
    ids = np.asarray(analyses.digit_ids(tokenizer))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 10, (strings, period))
    if digits is not None:
        rows[0] = [int(c) for c in digits]
    bos = np.full((strings, 1), tokenizer.bos_id)
    return jnp.asarray(np.concatenate([bos, ids[rows], ids[rows]], axis=1), jnp.int32)


def check_digits(digits: str, max_len: int) -> None:
    """A clear ValueError unless `digits` is a non-empty digit string that fits twice."""
    if not digits:
        raise ValueError("--text is empty; give a string of digits such as 01976954310149754605")
    if not digits.isdigit() or not digits.isascii():
        bad = next(c for c in digits if not (c.isascii() and c.isdigit()))
        raise ValueError(f"--text must contain only the digits 0-9; found {bad!r}")
    if 1 + 2 * len(digits) > max_len:
        raise ValueError(
            f"--text has {len(digits)} digits; repeated twice after BOS that is "
            f"{1 + 2 * len(digits)} tokens, more than the model's context of {max_len}"
        )
    if len(digits) < 2:
        raise ValueError("--text needs at least 2 digits for the second repetition to be scored")


def run_study(
    model: Transformer,
    tokenizer: Any,
    *,
    digits: str | None = None,
    period: int = 20,
    seed: int = 0,
    top: int = 10,
    strings: int = 8,
    shown_heads: int = 6,
    model_name: str = "",
    progress: Progress | None = None,
) -> StudyResult:
    """Run experiments 1-5 on BOS + random digit strings repeated twice.

    `digits` fixes the first string (its length sets the period); `strings` random strings in
    all are scored so head rankings and accuracies are not one sample's. Heads are ranked by
    induction score; the top `top` are knocked out, and as a control as many heads that score
    lowest on all three patterns (induction, previous-token, duplicate-token).
    """
    say = progress or (lambda _: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    if digits is not None:
        check_digits(digits, model.config.context_length)
        period = len(digits)
    check_length(1 + 2 * period, model.config.context_length,
                 f"period={period} (BOS and two repetitions)")
    tokens = _digit_batch(tokenizer, digits, period, strings, seed)
    seq = tokens.shape[1]
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, period + 2:] = True  # the second repetition, but its unpredictable first token
    eval_mask = jnp.asarray(eval_mask)
    chance = 0.1  # ten digits

    say(f"capturing attention of {len(model.blocks)} layers on {strings} sequences of {seq}")
    # One forward gives the logits and every layer's pattern [layers, batch, heads, q, k].
    logits, records = forward_with_records(record_attention(model), tokens)
    patterns = jnp.stack([records[i] for i in range(len(model.blocks))])
    logprobs = analyses.correct_token_logprobs(logits, tokens)
    original = analyses.repetition_stats(logprobs, logits, tokens, period, 2)
    lap("capture")

    say("scoring heads")
    induction = analyses.induction_scores(patterns, period)
    previous = analyses.previous_token_scores(patterns)
    duplicate = analyses.duplicate_token_scores(patterns, period)
    ranked = analyses.rank_heads(induction)
    knocked = [(layer, head) for layer, head, _ in ranked[:top]]
    # Control: the heads scoring lowest on every pattern. The lowest induction scores alone
    # include previous-token heads, the other half of the induction circuit.
    quiet = analyses.rank_heads(-jnp.maximum(jnp.maximum(induction, previous), duplicate))
    control = [(layer, head) for layer, head, _ in quiet[:top]]
    shown = [(layer, head) for layer, head, _ in ranked[:shown_heads]]
    top_patterns = np.stack([np.asarray(patterns[layer, 0, head]) for layer, head in shown])
    del patterns
    lap("scores")

    say(f"knocking out the top {top} heads (and {top} low-scoring heads as a control)")
    knocked_model = knock_out(model, knockout_mask(model, knocked))
    knocked_logits, _ = forward_with_records(knocked_model, tokens)
    knocked_logprobs = analyses.correct_token_logprobs(knocked_logits, tokens)
    knocked_stats = analyses.repetition_stats(knocked_logprobs, knocked_logits, tokens, period, 2)
    batch = examples.tokenize_examples(examples.study_examples(seed), tokenizer)
    per_example = {}
    for label, heads in (("original", []), ("knocked", knocked), ("control", control)):
        r = analyses.knockout_eval(model, batch.tokens, batch.padding_mask,
                                   knockout_mask(model, heads), batch.eval_mask)
        per_example[label] = r
    knockout_rows = [
        {"name": name, **{label: {"logprob": float(r.logprob[i]), "accuracy": float(r.accuracy[i]),
                                  "positions": int(r.count[i])}
                          for label, r in per_example.items()}}
        for i, name in enumerate(batch.names)
    ]
    lap("knockout")

    say("attribution gradients at all-ones and at the top heads knocked out")
    ones = knockout_mask(model)
    grad_ones = analyses.attribution_gradient(model, tokens, eval_mask, ones)
    grad_knocked = analyses.attribution_gradient(
        model, tokens, eval_mask, knockout_mask(model, knocked)
    )
    lap("attribution")

    say("searching the smallest set of heads whose knock-out breaks copying")
    found = analyses.minimal_breaking_set(
        model, tokens, eval_mask, ranked[:max(top, 1) * 2], chance_accuracy=chance,
        threshold=0.1,
    )
    lap("search")

    as_list = lambda x: np.asarray(x, np.float64).round(6).tolist()  # noqa: E731
    return StudyResult(
        model_name=model_name,
        preset=model.config.name,
        period=period,
        tokens=np.asarray(tokens).tolist(),
        token_pieces=[tokenizer.id_to_piece(int(t)) for t in np.asarray(tokens[0])],
        eval_positions=np.flatnonzero(np.asarray(eval_mask[0])).tolist(),
        logprobs=as_list(logprobs),
        knocked_logprobs=as_list(knocked_logprobs),
        repetitions={
            "original": {"logprob": as_list(original.logprob),
                         "accuracy": as_list(original.accuracy)},
            "knocked": {"logprob": as_list(knocked_stats.logprob),
                        "accuracy": as_list(knocked_stats.accuracy)},
        },
        induction_scores=as_list(induction),
        previous_token_scores=as_list(previous),
        duplicate_token_scores=as_list(duplicate),
        top_heads=[{"layer": layer, "head": head, "score": round(score, 6)}
                   for layer, head, score in ranked],
        knocked_heads=[list(h) for h in knocked],
        control_heads=[list(h) for h in control],
        knockout_examples=knockout_rows,
        attribution_all_ones=as_list(grad_ones),
        attribution_knocked=as_list(grad_knocked),
        minimal_set={
            "heads": [list(h) for h in found.heads],
            "broken": bool(found.broken),
            "accuracy": round(found.accuracy, 6),
            "baseline": round(found.baseline, 6),
            "chance": chance,
            "trail": [{"step": step, "layer": h[0], "head": h[1], "accuracy": round(acc, 6)}
                      for step, h, acc in found.trail],
        },
        timings=timings,
        top_patterns=top_patterns,
    )
