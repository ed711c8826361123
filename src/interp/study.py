"""The induction-head study (experiments 1-5): one function per experiment, typed results.

`run_study(model, tokenizer)` runs them all, as `gemma-eqx induction` reports them:
`behaviour` on repeated random digits (capturing attention too), `score_heads`, `knockout` of
the top heads (and of as many heads that score low on every pattern, as a control) on the
study's examples, `attribution` gradients at two mask points, and `minimal_set`, the smallest
set of heads whose knock-out breaks copying. Each takes a `DigitTask` (`digit_task`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gemma_eqx.checks import check_length
from gemma_eqx.modules import Transformer
from gemma_eqx.tokenizer import TokenizerLike

from . import analyses, examples
from .surgery import forward_with_records, knock_out, knockout_mask, record_attention

Progress = Callable[[str], None]
Head = tuple[int, int]  # (layer, head)
CHANCE = 0.1  # ten digits


def _rounded(x: Any) -> Any:
    """JSON-ready: arrays and floats rounded to 6 decimals, tuples as lists, dataclasses as
    dicts (fields marked `json=False` left out)."""
    if dataclasses.is_dataclass(x):
        return {f.name: _rounded(getattr(x, f.name)) for f in dataclasses.fields(x)
                if f.metadata.get("json", True)}
    if isinstance(x, np.ndarray):
        return (np.round(x.astype(np.float64), 6).tolist() if x.dtype.kind == "f"
                else x.tolist())
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, tuple | list):
        return [_rounded(v) for v in x]
    if isinstance(x, Mapping):
        return {k: _rounded(v) for k, v in x.items()}
    return x


@dataclasses.dataclass(frozen=True)
class DigitTask:
    """BOS + `strings` random digit strings of `period` digits, each repeated twice."""

    tokens: np.ndarray  # int32 [strings, 1 + 2 * period]; row 0 is the one shown
    eval_mask: np.ndarray  # bool, the same shape: the second repetition but its first token
    period: int
    token_pieces: tuple[str, ...]  # row 0 as text pieces


@dataclasses.dataclass(frozen=True)
class Repetitions:
    """Mean correct-token log-prob and argmax accuracy per repetition, over all strings."""

    logprob: tuple[float, ...]
    accuracy: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """Experiment 1: how well the model predicts each digit."""

    logprobs: np.ndarray  # [strings, seq - 1] correct-token log-probs
    repetitions: Repetitions


@dataclasses.dataclass(frozen=True)
class RankedHead:
    layer: int
    head: int
    score: float


@dataclasses.dataclass(frozen=True)
class HeadScores:
    """Experiments 2-3: every head's mass on the induction, previous-token and
    duplicate-token patterns ([layers, heads]); heads ranked by induction score."""

    induction: np.ndarray
    previous_token: np.ndarray
    duplicate_token: np.ndarray
    ranked: tuple[RankedHead, ...]
    # Attention of the best `shown` heads on the shown string: [shown, seq, seq].
    top_patterns: np.ndarray = dataclasses.field(repr=False, metadata={"json": False})

    def top(self, k: int) -> list[Head]:
        return [(h.layer, h.head) for h in self.ranked[:k]]

    def quietest(self, k: int) -> list[Head]:
        """The `k` heads scoring lowest on all three patterns (the knock-out control; the
        lowest induction scores alone include previous-token heads, the other half of the
        induction circuit)."""
        loudest = np.maximum(np.maximum(self.induction, self.previous_token),
                             self.duplicate_token)
        return [(layer, head) for layer, head, _ in analyses.rank_heads(jnp.asarray(-loudest))[:k]]


@dataclasses.dataclass(frozen=True)
class ExampleScores:
    logprob: float  # mean correct-token log-prob over the example's scored tokens
    accuracy: float
    positions: int  # how many tokens are scored


@dataclasses.dataclass(frozen=True)
class ExampleKnockout:
    name: str
    original: ExampleScores
    knocked: ExampleScores  # the top heads knocked out
    control: ExampleScores  # as many quiet heads knocked out


@dataclasses.dataclass(frozen=True)
class Knockout:
    """Experiment 4: the top heads knocked out, on the digit task and the study's examples."""

    heads: tuple[Head, ...]
    control_heads: tuple[Head, ...]
    logprobs: np.ndarray  # [strings, seq - 1] on the digit task, heads knocked out
    repetitions: Repetitions
    examples: tuple[ExampleKnockout, ...]


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Experiment 5: gradient of the mean second-repetition log-prob with respect to the
    knock-out mask ([layers, heads]), at all heads on and at the top heads knocked out."""

    all_ones: np.ndarray
    knocked: np.ndarray


@dataclasses.dataclass(frozen=True)
class SearchStep:
    step: str  # "add" | "keep" | "drop"
    layer: int
    head: int
    accuracy: float


@dataclasses.dataclass(frozen=True)
class MinimalSet:
    """The smallest set of heads found whose knock-out brings second-repetition accuracy to
    within `threshold` of chance (see `analyses.minimal_breaking_set`)."""

    heads: tuple[Head, ...]
    broken: bool
    accuracy: float
    baseline: float
    chance: float
    trail: tuple[SearchStep, ...]


@dataclasses.dataclass(frozen=True)
class StudyResult:
    """Everything the report shows; `to_json()` gives what `report.json` holds."""

    model_name: str
    preset: str
    task: DigitTask
    behaviour: Behaviour
    scores: HeadScores
    knockout: Knockout
    attribution: Attribution
    minimal_set: MinimalSet
    timings: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return _rounded(self)


# ------------------------------------------------------------------------------ experiments


def check_digits(digits: str, max_len: int, *, name: str = "digits") -> None:
    """A clear ValueError unless `digits` is a non-empty digit string that fits twice after
    BOS in `max_len` positions (`name` is what the message calls it)."""
    if not digits:
        raise ValueError(f"{name} is empty; give a string of digits such as "
                         f"01976954310149754605")
    if not digits.isdigit() or not digits.isascii():
        bad = next(c for c in digits if not (c.isascii() and c.isdigit()))
        raise ValueError(f"{name} must contain only the digits 0-9; found {bad!r}")
    if 1 + 2 * len(digits) > max_len:
        raise ValueError(
            f"{name} has {len(digits)} digits; repeated twice after BOS that is "
            f"{1 + 2 * len(digits)} tokens, more than the model's context of {max_len}"
        )
    if len(digits) < 2:
        raise ValueError(f"{name} needs at least 2 digits for the second repetition to be "
                         f"scored")


def digit_task(
    model: Transformer,
    tokenizer: TokenizerLike,
    *,
    digits: str | None = None,
    period: int = 20,
    strings: int = 8,
    seed: int = 0,
) -> DigitTask:
    """`strings` random digit strings (the first is `digits` if given, whose length then sets
    the period), each after BOS and repeated twice, checked against the model's context."""
    context = model.config.context_length
    if digits is not None:
        check_digits(digits, context)
        period = len(digits)
    if period < 2 or strings < 1:
        raise ValueError(f"period must be >= 2 and strings >= 1; got {period}, {strings}")
    check_length(1 + 2 * period, context, f"period={period} (BOS and two repetitions)")
    ids = np.asarray(analyses.digit_ids(tokenizer))
    rows = np.random.default_rng(seed).integers(0, 10, (strings, period))
    if digits is not None:
        rows[0] = [int(c) for c in digits]
    bos = np.full((strings, 1), tokenizer.bos_id)
    tokens = np.concatenate([bos, ids[rows], ids[rows]], axis=1).astype(np.int32)
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, period + 2:] = True  # the second repetition, but its unpredictable first token
    return DigitTask(tokens, eval_mask, period,
                     tuple(tokenizer.id_to_piece(int(t)) for t in tokens[0]))


def _repetitions(logprobs: Array, logits: Array, task: DigitTask) -> Repetitions:
    stats = analyses.repetition_stats(logprobs, logits, jnp.asarray(task.tokens), task.period, 2)
    return Repetitions(tuple(np.asarray(stats.logprob, np.float64).tolist()),
                       tuple(np.asarray(stats.accuracy, np.float64).tolist()))


def behaviour(
    model: Transformer, task: DigitTask
) -> tuple[Behaviour, Float[Array, "layers batch heads query key"]]:
    """Experiment 1, and the attention patterns of every layer for experiments 2-3 (one
    forward pass gives both)."""
    tokens = jnp.asarray(task.tokens)
    logits, records = forward_with_records(record_attention(model), tokens)
    patterns = jnp.stack([records[i] for i in range(len(model.blocks))])
    logprobs = analyses.correct_token_logprobs(logits, tokens)
    return Behaviour(np.asarray(logprobs), _repetitions(logprobs, logits, task)), patterns


def score_heads(
    patterns: Float[Array, "layers batch heads query key"], task: DigitTask, *, shown: int = 6
) -> HeadScores:
    """Experiments 2-3: head scores from the patterns `behaviour` captured."""
    induction = analyses.induction_scores(patterns, task.period)
    ranked = tuple(RankedHead(layer, head, score)
                   for layer, head, score in analyses.rank_heads(induction))
    top_patterns = np.stack([np.asarray(patterns[h.layer, 0, h.head]) for h in ranked[:shown]])
    return HeadScores(
        induction=np.asarray(induction),
        previous_token=np.asarray(analyses.previous_token_scores(patterns)),
        duplicate_token=np.asarray(analyses.duplicate_token_scores(patterns, task.period)),
        ranked=ranked,
        top_patterns=top_patterns,
    )


def knockout(
    model: Transformer,
    tokenizer: TokenizerLike,
    task: DigitTask,
    heads: Sequence[Head],
    control_heads: Sequence[Head],
    *,
    seed: int = 0,
) -> Knockout:
    """Experiment 4: `heads` knocked out (attention sent to BOS) on the digit task, and on
    the study's examples next to the original model and `control_heads` knocked out."""
    tokens = jnp.asarray(task.tokens)
    logits, _ = forward_with_records(knock_out(model, knockout_mask(model, heads)), tokens)
    logprobs = analyses.correct_token_logprobs(logits, tokens)
    batch = examples.tokenize_examples(examples.study_examples(seed), tokenizer)
    results = {
        label: analyses.knockout_eval(model, batch.tokens, knockout_mask(model, knocked),
                                      batch.eval_mask, padding_mask=batch.padding_mask)
        for label, knocked in (("original", []), ("knocked", heads), ("control", control_heads))
    }

    def scores(label: str, i: int) -> ExampleScores:
        r = results[label]
        return ExampleScores(float(r.logprob[i]), float(r.accuracy[i]), int(r.count[i]))

    return Knockout(
        heads=tuple(map(tuple, heads)), control_heads=tuple(map(tuple, control_heads)),
        logprobs=np.asarray(logprobs), repetitions=_repetitions(logprobs, logits, task),
        examples=tuple(ExampleKnockout(name, *(scores(label, i) for label in results))
                       for i, name in enumerate(batch.names)),
    )


def attribution(model: Transformer, task: DigitTask, heads: Sequence[Head]) -> Attribution:
    """Experiment 5: attribution gradients at all heads on and at `heads` knocked out."""
    tokens, eval_mask = jnp.asarray(task.tokens), jnp.asarray(task.eval_mask)
    return Attribution(*(
        np.asarray(analyses.attribution_gradient(model, tokens, eval_mask, mask))
        for mask in (knockout_mask(model), knockout_mask(model, heads))
    ))


def minimal_set(
    model: Transformer,
    task: DigitTask,
    candidates: Sequence[Head],
    *,
    chance: float = CHANCE,
    threshold: float = 0.1,
) -> MinimalSet:
    """The smallest set among `candidates` (ranked) whose knock-out breaks copying."""
    found = analyses.minimal_breaking_set(
        model, jnp.asarray(task.tokens), jnp.asarray(task.eval_mask), candidates,
        chance_accuracy=chance, threshold=threshold,
    )
    return MinimalSet(
        heads=tuple(map(tuple, found.heads)), broken=bool(found.broken),
        accuracy=float(found.accuracy), baseline=float(found.baseline), chance=chance,
        trail=tuple(SearchStep(step, h[0], h[1], float(acc)) for step, h, acc in found.trail),
    )


def run_study(
    model: Transformer,
    tokenizer: TokenizerLike,
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
    """Experiments 1-5 on BOS + random digit strings repeated twice, one function each.

    `digits` fixes the first string (its length sets the period); `strings` random strings in
    all are scored so head rankings and accuracies are not one sample's. Heads are ranked by
    induction score; the top `top` are knocked out, and as a control as many heads that score
    lowest on all three patterns.
    """
    say = progress or (lambda _: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    if top < 1:
        raise ValueError(f"top must be >= 1; got {top}")
    task = digit_task(model, tokenizer, digits=digits, period=period, strings=strings,
                      seed=seed)
    say(f"capturing attention of {len(model.blocks)} layers on {strings} sequences of "
        f"{task.tokens.shape[1]}")
    behaved, patterns = behaviour(model, task)
    lap("capture")
    say("scoring heads")
    scores = score_heads(patterns, task, shown=shown_heads)
    del patterns
    lap("scores")
    say(f"knocking out the top {top} heads (and {top} low-scoring heads as a control)")
    knocked = knockout(model, tokenizer, task, scores.top(top), scores.quietest(top),
                       seed=seed)
    lap("knockout")
    say("attribution gradients at all-ones and at the top heads knocked out")
    attributed = attribution(model, task, scores.top(top))
    lap("attribution")
    say("searching the smallest set of heads whose knock-out breaks copying")
    smallest = minimal_set(model, task, scores.top(2 * top))
    lap("search")
    return StudyResult(model_name, model.config.name, task, behaved, scores, knocked,
                       attributed, smallest, timings)
