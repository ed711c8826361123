"""The induction-head study (experiments 1-7): one function per experiment, typed results.

`run_study(model, tokenizer)` runs them all, as `gemma-eqx induction` reports them:
`behaviour` on repeated random digits (capturing attention too), `score_heads`, `knockout` of
the top heads (and of as many heads that score low on every pattern, as a control) on the
study's examples, `attribution` gradients at two mask points, `minimal_set`, the smallest
set of heads whose knock-out breaks copying, `path_analysis` (experiment 6: worlds that restore
the heads' paths one kind at a time), `counterfactual_patching` (experiment 7: the heads'
values, pattern or output taken from another input) and `patching_maps` (clean -> corrupted
activation patching of every head and of the residual stream). Each takes a `DigitTask`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gemma_eqx.checks import check_length
from gemma_eqx.modules import Transformer
from gemma_eqx.multihost import to_host
from gemma_eqx.runtime import CompileLog
from gemma_eqx.tokenizer import TokenizerLike

from . import analyses, examples, patching
from .interventions import run
from .surgery import forward_with_records, knock_out, knockout_mask, record_attention
from .worlds import Worlds, knock_out_in, linearize, rewire

Progress = Callable[[str], None]
Head = tuple[int, int]  # (layer, head)
CHANCE = 0.1  # ten digits


def elapsed_printer() -> Progress:
    """A `Progress` that prints `[   12.3s] message` to stderr, timed from its creation (on
    process 0 only, in a multi-process cluster)."""
    from gemma_eqx.multihost import is_lead

    start = time.perf_counter()

    def say(message: str) -> None:
        if is_lead():
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr,
                  flush=True)

    return say


def _rounded(x: Any) -> Any:
    """JSON-ready: arrays and floats rounded to 6 decimals, tuples as lists, dataclasses as
    dicts (fields marked `json=False` left out)."""
    if dataclasses.is_dataclass(x):
        return {f.name: _rounded(getattr(x, f.name)) for f in dataclasses.fields(x)
                if f.metadata.get("json", True)}
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            return x.tolist()
        return _rounded(x.astype(np.float64).tolist())
    if isinstance(x, float):
        return round(x, 6) if np.isfinite(x) else None  # JSON has no NaN
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
class WorldScore:
    world: str
    description: str
    relative_logit: float  # mean over strings and scored positions


@dataclasses.dataclass(frozen=True)
class PathAnalysis:
    """Experiment 6: the relative logit of the correct digit (its logit minus the mean logit
    of the ten digits, which equals the same difference of log-probs) over the second
    repetition, in worlds that restore the ablated heads' paths one kind at a time."""

    heads: tuple[Head, ...]
    worlds: tuple[WorldScore, ...]
    per_position: np.ndarray  # [worlds, seq - 1] mean over strings (NaN where not scored)


@dataclasses.dataclass(frozen=True)
class CounterfactualPatch:
    """One patching of experiment 7. In the patched world, at each scored position: the mean
    probability of the digit the heads would copy under the patch (`copy_target`) and how
    often it is the argmax over the vocabulary; the same for the unpatched world that reads
    the same input (the baseline); and the patched world's probability of its own input's
    correct next digit."""

    name: str
    description: str
    copy_target: str
    copy_prob: float
    copy_accuracy: float
    baseline_copy_prob: float
    baseline_copy_accuracy: float
    correct_prob: float
    # Probability of each digit 0-9 at the scored positions of the first string: [scored, 10].
    digit_probs: np.ndarray = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class CounterfactualPatching:
    """Experiment 7: the heads' values, pattern, or both, taken from another input."""

    heads: tuple[Head, ...]
    counterfactual: tuple[str, ...]  # the non-repeating digits of the first string
    patches: tuple[CounterfactualPatch, ...]


@dataclasses.dataclass(frozen=True)
class PatchingMaps:
    """Clean -> corrupted activation patching (clean = BOS + A + A, corrupted = BOS + B + A)
    of the first string: the metric (mean log-prob of A's digits over the second repetition)
    after patching one head's output (`heads`, [layers, heads]) or the residual stream entering
    a layer at one position (`residual`, [layers, seq]), normalised so 0 is the corrupted run
    and 1 the clean run."""

    clean: float
    corrupted: float
    heads: np.ndarray
    residual: np.ndarray
    residual_layers: tuple[int, ...]
    compilations: int


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
    path_analysis: PathAnalysis
    counterfactual: CounterfactualPatching
    patching: PatchingMaps
    timings: Mapping[str, float]
    # Per step: programs compiled (or loaded from the persistent cache), cache hits, seconds.
    compilation: Mapping[str, Mapping[str, int | float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return _rounded(self)


# ------------------------------------------------------------------------------ experiments


def check_top(top: int, model: Transformer, *, name: str = "top") -> None:
    """`top` heads are knocked out and as many other heads are the control: together they
    must be distinct heads of the model, or the control would repeat the top set."""
    heads = len(model.blocks) * model.config.num_heads
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {top!r}")
    if 2 * top > heads:
        raise ValueError(f"{name} {top} needs {2 * top} distinct heads (the top set and a "
                         f"control set as large); {model.config.name} has {heads}: use "
                         f"{name} {heads // 2} or fewer")


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
    return Repetitions(tuple(to_host(stats.logprob).astype(np.float64).tolist()),
                       tuple(to_host(stats.accuracy).astype(np.float64).tolist()))


def behaviour(
    model: Transformer, task: DigitTask
) -> tuple[Behaviour, Float[Array, "layers batch heads query key"]]:
    """Experiment 1, and the attention patterns of every layer for experiments 2-3 (one
    forward pass gives both)."""
    tokens = jnp.asarray(task.tokens)
    logits, records = forward_with_records(record_attention(model), tokens)
    patterns = jnp.stack([records[i] for i in range(len(model.blocks))])
    logprobs = analyses.correct_token_logprobs(logits, tokens)
    return Behaviour(to_host(logprobs), _repetitions(logprobs, logits, task)), patterns


def score_heads(
    patterns: Float[Array, "layers batch heads query key"], task: DigitTask, *, shown: int = 6
) -> HeadScores:
    """Experiments 2-3: head scores from the patterns `behaviour` captured."""
    induction = analyses.induction_scores(patterns, task.period)
    ranked = tuple(RankedHead(layer, head, score)
                   for layer, head, score in analyses.rank_heads(induction))
    top_patterns = np.stack([to_host(patterns[h.layer, 0, h.head]) for h in ranked[:shown]])
    return HeadScores(
        induction=to_host(induction),
        previous_token=to_host(analyses.previous_token_scores(patterns)),
        duplicate_token=to_host(analyses.duplicate_token_scores(patterns, task.period)),
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

    host = {label: analyses.KnockoutResult(*map(to_host, r)) for label, r in results.items()}

    def scores(label: str, i: int) -> ExampleScores:
        r = host[label]
        return ExampleScores(float(r.logprob[i]), float(r.accuracy[i]), int(r.count[i]))

    return Knockout(
        heads=tuple(map(tuple, heads)), control_heads=tuple(map(tuple, control_heads)),
        logprobs=to_host(logprobs), repetitions=_repetitions(logprobs, logits, task),
        examples=tuple(ExampleKnockout(name, *(scores(label, i) for label in results))
                       for i, name in enumerate(batch.names)),
    )


def attribution(model: Transformer, task: DigitTask, heads: Sequence[Head]) -> Attribution:
    """Experiment 5: attribution gradients at all heads on and at `heads` knocked out."""
    tokens, eval_mask = jnp.asarray(task.tokens), jnp.asarray(task.eval_mask)
    return Attribution(*(
        to_host(analyses.attribution_gradient(model, tokens, eval_mask, mask))
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


def _scored_positions(task: DigitTask) -> np.ndarray:
    """Prediction positions whose target is scored (`task.eval_mask` shifted by one)."""
    return np.flatnonzero(task.eval_mask[0, 1:])


PATH_WORLDS = (
    ("fully_ablated", "the heads knocked out"),
    ("restore_direct", "+ their direct effect on the logits"),
    ("restore_values", "+ their effect on later attention values"),
    ("restore_patterns", "+ their effect on later attention patterns (queries and keys)"),
    ("linear_mlps", "+ the linear part of their effect through the MLPs"),
    ("original", "the original model"),
)


def path_analysis(
    model: Transformer, tokenizer: TokenizerLike, task: DigitTask, heads: Sequence[Head]
) -> PathAnalysis:
    """Experiment 6, as in the Penzai tutorial: six worlds side by side. `heads` are knocked
    out in `fully_ablated` only. The final norm is linearised around `fully_ablated`'s input
    in every world, so the worlds differ in what reaches the logits only through the paths
    each restores: `restore_direct` reads every later attention query, key and value and every
    MLP input from `fully_ablated` (only the heads' direct write to the final stream differs);
    `restore_values` reads its own values; `restore_patterns` its own queries and keys too;
    `linear_mlps` gets the MLPs' first-order response (a JVP around `fully_ablated`); the
    original gets the exact MLPs."""
    names = tuple(name for name, _ in PATH_WORLDS)
    strings = task.tokens.shape[0]
    worlds = Worlds(names, strings)
    ablated = "fully_ablated"
    m = knock_out_in(model, worlds, heads, [ablated])
    m = linearize(m, worlds, "final_norm", {w: ablated for w in names})
    frozen_qk = {w: ablated for w in ("restore_direct", "restore_values")}
    m = rewire(m, worlds, "q", frozen_qk)
    m = rewire(m, worlds, "k", frozen_qk)
    m = rewire(m, worlds, "v", {"restore_direct": ablated})
    m = linearize(m, worlds, "mlp", {w: ablated for w in names if w != "original"},
                  {w: ablated for w in names[:4]})
    scored = _scored_positions(task)
    at = jnp.broadcast_to(jnp.asarray(scored), (worlds.rows, len(scored)))
    logits = run(m, worlds.tokens(task.tokens), logits_at=at).astype(jnp.float32)
    logits = worlds.split(logits)  # [W, S, scored, vocab]
    ids = jnp.asarray(analyses.digit_ids(tokenizer))
    targets = jnp.asarray(task.tokens[:, scored + 1])
    correct = jnp.take_along_axis(logits, targets[None, :, :, None], axis=-1)[..., 0]
    relative = to_host(correct - logits[..., ids].mean(axis=-1))  # [W, S, scored]
    per_position = np.full((len(names), task.tokens.shape[1] - 1), np.nan)
    per_position[:, scored] = relative.mean(axis=1)
    return PathAnalysis(
        heads=tuple(map(tuple, heads)),
        worlds=tuple(WorldScore(name, text, float(relative[w].mean()))
                     for w, (name, text) in enumerate(PATH_WORLDS)),
        per_position=per_position,
    )


def nonrepeating_digits(tokenizer: TokenizerLike, task: DigitTask, *, seed: int) -> np.ndarray:
    """BOS + 2P random digits per string, drawn independently of the task (the counterfactual
    input of experiment 7 and the corrupted input of the patching maps)."""
    ids = np.asarray(analyses.digit_ids(tokenizer))
    strings, seq = task.tokens.shape
    rows = np.random.default_rng([seed, 7]).integers(0, 10, (strings, seq - 1))
    return np.concatenate([task.tokens[:, :1], ids[rows]], axis=1).astype(np.int32)


def _per_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


def counterfactual_patching(
    model: Transformer, tokenizer: TokenizerLike, task: DigitTask, heads: Sequence[Head],
    *, seed: int = 0,
) -> CounterfactualPatching:
    """Experiment 7, as in the Penzai tutorial: worlds `original` (the repeated digits A),
    `nonrepeating` (random digits B) and three patched worlds, all in one forward: the
    heads' values (as each query head reads them) from B into A (do they now copy B's
    digits?), their attention pattern from A into B (does the induction pattern alone copy B's
    earlier digits?), and pattern and values from A into B (their whole output: do they copy
    A's?)."""
    period = task.period
    counterfactual = nonrepeating_digits(tokenizer, task, seed=seed)
    ids = np.asarray(analyses.digit_ids(tokenizer))
    # (name, description, input, {site: source world}, copy target text, copy target, the
    # unpatched world reading the same input)
    plans = (
        ("values", "the heads' values (as each query head reads them) from B into A",
         task.tokens, {"v_per_head": "nonrepeating"},
         "B's digit after the earlier occurrence", counterfactual, "original"),
        ("pattern", "the heads' attention pattern from A into B",
         counterfactual, {"pattern": "original"},
         "B's digit after the earlier occurrence", counterfactual, "nonrepeating"),
        ("output", "the heads' pattern and values (their whole output) from A into B",
         counterfactual, {"pattern": "original", "v_per_head": "original"},
         "A's digit (what the original copies)", task.tokens, "nonrepeating"),
    )
    worlds = Worlds(("original", "nonrepeating", *(plan[0] for plan in plans)),
                    task.tokens.shape[0])
    tokens = worlds.tokens({"original": task.tokens, "nonrepeating": counterfactual,
                            **{plan[0]: plan[2] for plan in plans}})
    seq, num_heads = task.tokens.shape[1], model.config.num_heads
    m = model
    for layer, layer_heads in _per_layer(heads).items():
        for site in ("pattern", "v_per_head"):
            taking = {plan[0]: plan[3][site] for plan in plans if site in plan[3]}
            weight = np.zeros((worlds.rows, seq, num_heads), np.float32)
            for world in taking:
                w = worlds.index(world)
                weight[w * worlds.batch:(w + 1) * worlds.batch, :, layer_heads] = 1
            m = rewire(m, worlds, site, taking, layers=[layer], weight=jnp.asarray(weight))
    scored = _scored_positions(task)
    at = jnp.broadcast_to(jnp.asarray(scored), (worlds.rows, len(scored)))
    logits = run(m, tokens, logits_at=at)
    # Every target below is a digit: the digits' probabilities and the argmax say it all.
    digit_probs, argmax = (to_host(a) for a in _digit_summary(logits, jnp.asarray(ids)))
    digit_probs, argmax = worlds.split(digit_probs), worlds.split(argmax)  # [W, S, scored...]
    digit_of = np.full(int(ids.max()) + 1, -1)
    digit_of[ids] = np.arange(10)

    # What an induction head at position q copies: the token after the earlier occurrence,
    # at q - P + 1, of the input whose values it reads.
    def copied(source: np.ndarray) -> np.ndarray:
        return source[:, scored - period + 1]  # [S, scored]

    def stats(world: str, target: np.ndarray) -> tuple[float, float]:
        w = worlds.index(world)
        p = np.take_along_axis(digit_probs[w], digit_of[target][..., None], axis=-1)[..., 0]
        return float(p.mean()), float((argmax[w] == target).mean())

    patches = []
    for name, text, own, _, target_text, source, baseline in plans:
        target = copied(source)
        copy_p, copy_acc = stats(name, target)
        base_p, base_acc = stats(baseline, target)
        correct_p, _ = stats(name, own[:, scored + 1])
        patches.append(CounterfactualPatch(
            name, text, target_text, copy_p, copy_acc, base_p, base_acc, correct_p,
            digit_probs[worlds.index(name), 0]))
    return CounterfactualPatching(
        tuple(map(tuple, heads)),
        tuple(tokenizer.id_to_piece(int(t)) for t in counterfactual[0, 1:period + 1]),
        tuple(patches))


@jax.jit
def _digit_summary(
    logits: Float[Array, "rows k vocab"], ids: Array
) -> tuple[Float[Array, "rows k 10"], Array]:
    """Probabilities of the ten digits and the argmax token at each scored position."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.exp(logits[..., ids] - lse), jnp.argmax(logits, axis=-1)


def every_nth_layer(num_layers: int, stride: int = 3) -> list[int]:
    """Layers 0, stride, 2 stride, ... and the last: where the residual-stream map patches
    (each layer costs one forward per position)."""
    if stride < 1:
        raise ValueError(f"residual_stride must be >= 1; got {stride}")
    return sorted({*range(0, num_layers, stride), num_layers - 1})


def patching_maps(
    model: Transformer,
    tokenizer: TokenizerLike,
    task: DigitTask,
    *,
    seed: int = 0,
    residual_layers: Sequence[int] | None = None,
) -> PatchingMaps:
    """Clean -> corrupted activation patching of every head's output and of the residual
    stream at each (layer, position) on the first string (see `PatchingMaps`); the residual
    stream at `residual_layers` (default: `every_nth_layer(layers, 3)`, as `run_study`)."""
    period = task.period
    clean = task.tokens[:1]
    other = nonrepeating_digits(tokenizer, task, seed=seed)[:1]
    corrupted = np.concatenate([other[:, :period + 1], clean[:, period + 1:]], axis=1)
    scored = _scored_positions(task)
    metric = patching.mean_logprob(clean[0, scored + 1], scored)
    heads = patching.activation_patching(model, corrupted, clean, "head_out", metric,
                                         per="layer_head")
    layers = every_nth_layer(len(model.blocks)) if residual_layers is None else list(
        residual_layers)
    residual = patching.activation_patching(model, corrupted, clean, "resid_pre", metric,
                                            per="layer_position", layers=layers)
    return PatchingMaps(heads.source, heads.target, heads.normalized, residual.normalized,
                        tuple(layers), heads.compilations + residual.compilations)


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
    residual_stride: int = 3,
    verbose: bool = False,
) -> StudyResult:
    """Experiments 1-7 on BOS + random digit strings repeated twice, one function each.

    `digits` fixes the first string (its length sets the period); `strings` random strings in
    all are scored so head rankings and accuracies are not one sample's. Heads are ranked by
    induction score; the top `top` are knocked out, and as a control as many heads that score
    lowest on all three patterns. Experiments 6 and 7 study the critical heads: the smallest
    breaking set when one was found, else the top `top`. The residual-stream patching map
    covers every `residual_stride`-th layer and the last (1: every layer; each layer costs
    one forward per position). `verbose` prints each step as it starts, with the seconds
    since the start (what `gemma-eqx induction` shows); `progress` receives the same lines.
    """
    say = progress or (elapsed_printer() if verbose else (lambda _: None))
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    compiles = CompileLog()
    compiles.start("capture")
    steps = iter(["scores", "knockout", "attribution", "search", "paths", "counterfactual",
                  "patching"])

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now
        following = next(steps, None)
        if following is None:
            compiles.close()
        else:
            compiles.start(following)

    check_top(top, model)
    residual_layers = every_nth_layer(len(model.blocks), residual_stride)
    try:
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
        critical = list(smallest.heads) if smallest.broken else scores.top(top)
        say(f"path analysis: six worlds around {len(critical)} critical head(s)")
        paths = path_analysis(model, tokenizer, task, critical)
        lap("paths")
        say("patching the critical heads' values, pattern and output between inputs")
        counterfactual = counterfactual_patching(model, tokenizer, task, critical, seed=seed)
        lap("counterfactual")
        say("activation patching: every head, and the residual stream per layer and position")
        maps = patching_maps(model, tokenizer, task, seed=seed, residual_layers=residual_layers)
        lap("patching")
    finally:
        compiles.close()
    return StudyResult(model_name, model.config.name, task, behaved, scores, knocked,
                       attributed, smallest, paths, counterfactual, maps, timings,
                       compiles.as_dict())
