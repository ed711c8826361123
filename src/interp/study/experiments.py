"""Experiments 1-7 and the patching maps, one function each, on a `DigitTask`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gemma_eqx.core.multihost import to_host
from gemma_eqx.core.text import TokenizerLike
from gemma_eqx.model.modules import Transformer

from .. import analyses, examples, patching, staged
from ..surgery import forward_with_records, knock_out, knockout_mask, record_attention
from ..worlds import Worlds, knock_out_in, linearize, rewire
from .results import (
    Attribution,
    Behaviour,
    CounterfactualPatch,
    CounterfactualPatching,
    DigitTask,
    ExampleKnockout,
    ExampleScores,
    Head,
    HeadScores,
    Knockout,
    MinimalSet,
    PatchingMaps,
    PathAnalysis,
    RankedHead,
    Repetitions,
    SearchStep,
    WorldScore,
)
from .task import CHANCE, nonrepeating_digits, scored_positions


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
    labels = ("original", "knocked", "control")
    masks = jnp.stack([knockout_mask(model, knocked) for knocked in ([], heads, control_heads)])
    # One staged sweep: the knocked-out models run from their first changed layer on.
    swept = analyses.knockout_sweep(model, batch.tokens, masks, batch.eval_mask,
                                    padding_mask=batch.padding_mask)
    fields = [to_host(field) for field in swept]  # [label, ...] each, moved to the host once
    host = {label: analyses.KnockoutResult(*(field[i] for field in fields))
            for i, label in enumerate(labels)}

    def scores(label: str, i: int) -> ExampleScores:
        r = host[label]
        return ExampleScores(float(r.logprob[i]), float(r.accuracy[i]), int(r.count[i]))

    return Knockout(
        heads=tuple(map(tuple, heads)), control_heads=tuple(map(tuple, control_heads)),
        logprobs=to_host(logprobs), repetitions=_repetitions(logprobs, logits, task),
        examples=tuple(ExampleKnockout(name, *(scores(label, i) for label in labels))
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
    baseline: float | None = None,
) -> MinimalSet:
    """The smallest set among `candidates` (ranked) whose knock-out breaks copying;
    `baseline`, the accuracy with nothing knocked out, is `behaviour`'s second-repetition
    accuracy (computed when not given)."""
    found = analyses.minimal_breaking_set(
        model, jnp.asarray(task.tokens), jnp.asarray(task.eval_mask), candidates,
        chance_accuracy=chance, threshold=threshold, baseline=baseline,
    )
    return MinimalSet(
        heads=tuple(map(tuple, found.heads)), broken=bool(found.broken),
        accuracy=float(found.accuracy), baseline=float(found.baseline), chance=chance,
        trail=tuple(SearchStep(step, h[0], h[1], float(acc)) for step, h, acc in found.trail),
    )


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
    scored = scored_positions(task)
    ids = np.asarray(analyses.digit_ids(tokenizer))
    # Every target is a digit, and the score reads only the ten digits' logits: project
    # onto those ten rows of the vocabulary, not all of it.
    logits = _read_at(m, jnp.asarray(worlds.tokens(task.tokens)), jnp.asarray(scored),
                      _TokenLogits(jnp.asarray(ids))).astype(jnp.float32)
    logits = worlds.split(logits)  # [W, S, scored, 10]
    targets = jnp.asarray(_digit_index(ids)[task.tokens[:, scored + 1]])
    correct = jnp.take_along_axis(logits, targets[None, :, :, None], axis=-1)[..., 0]
    relative = to_host(correct - logits.mean(axis=-1))  # [W, S, scored]
    per_position = np.full((len(names), task.tokens.shape[1] - 1), np.nan)
    per_position[:, scored] = relative.mean(axis=1)
    return PathAnalysis(
        heads=tuple(map(tuple, heads)),
        worlds=tuple(WorldScore(name, text, float(relative[w].mean()))
                     for w, (name, text) in enumerate(PATH_WORLDS)),
        per_position=per_position,
    )


class _TokenLogits(eqx.Module):
    """A `_read_at` score: the logits of tokens `ids` from the final stream."""

    ids: Array
    can_stream = True

    def stream_score(self, model: Transformer, normed: Array) -> Array:
        return model.token_logits(normed, self.ids)


@eqx.filter_jit
def _read_at(model: Transformer, tokens: Array, positions: Array, score: eqx.Module) -> Any:
    """`score` (a `staged.scored_forward` score) at `positions` (the same for every row) of
    `model` with its interventions, from one forward pass."""
    return staged.scored_forward(model, tokens, jnp.ones(tokens.shape, bool), positions,
                                 score)[0]


def _digit_index(ids: np.ndarray) -> np.ndarray:
    """`index[token]`: which of the ten digits `ids` the token is (-1: none)."""
    index = np.full(int(ids.max()) + 1, -1)
    index[ids] = np.arange(len(ids))
    return index


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
    scored = scored_positions(task)
    # Every target below is a digit: the digits' probabilities and the argmax say it all.
    digit_probs, argmax = (to_host(a) for a in _read_at(
        m, jnp.asarray(tokens), jnp.asarray(scored), _DigitSummary(jnp.asarray(ids))))
    digit_probs, argmax = worlds.split(digit_probs), worlds.split(argmax)  # [W, S, scored...]
    digit_of = _digit_index(ids)

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


class _DigitSummary(eqx.Module):
    """A `_read_at` score: the probabilities of tokens `ids` and the argmax token, with the
    vocabulary streamed (`Transformer.target_logprobs`)."""

    ids: Array
    can_stream = True

    def stream_score(self, model: Transformer, normed: Array) -> tuple[Array, Array]:
        first = jnp.broadcast_to(self.ids[0], normed.shape[:-1])
        logprob, argmax = model.target_logprobs(normed, first)
        logits = model.token_logits(normed, self.ids)
        return jnp.exp(logits - (logits[..., :1] - logprob[..., None])), argmax


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
    scored = scored_positions(task)
    metric = patching.mean_logprob(clean[0, scored + 1], scored)
    heads = patching.activation_patching(model, corrupted, clean, "head_out", metric,
                                         per="layer_head")
    layers = every_nth_layer(len(model.blocks)) if residual_layers is None else list(
        residual_layers)
    residual = patching.activation_patching(model, corrupted, clean, "resid_pre", metric,
                                            per="layer_position", layers=layers)
    return PatchingMaps(heads.source, heads.target, heads.normalized, residual.normalized,
                        tuple(layers), heads.compilations + residual.compilations)
