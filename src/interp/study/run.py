"""`run_study`: experiments 1-7 (8 and 9 when asked) in order, timed, their compilations
counted, into one `StudyResult`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from gemma_eqx.core.runtime import CompileLog
from gemma_eqx.core.text import TokenizerLike
from gemma_eqx.model.modules import Transformer

from .experiments import (
    attribution,
    behaviour,
    counterfactual_patching,
    every_nth_layer,
    knockout,
    minimal_set,
    patching_maps,
    path_analysis,
    score_heads,
)
from .results import StudyResult
from .task import check_top, digit_task

Progress = Callable[[str], None]


def elapsed_printer() -> Progress:
    """A `Progress` that prints `[   12.3s] message` to stderr, timed from its creation (on
    process 0 only, in a multi-process cluster)."""
    from gemma_eqx.core.multihost import is_lead

    start = time.perf_counter()

    def say(message: str) -> None:
        if is_lead():
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr,
                  flush=True)

    return say


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
    dictionary: Any = None,
    latents: int = 10,
    circuit: bool = False,
    transcoder: Any = None,
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
    With `dictionary` (an SAE, or a function of a layer giving one: it gets the top induction
    head's layer), experiment 8 (`features.feature_experiment`) follows, on `latents` latents.
    With `circuit`, experiment 9 (`circuit.circuit_experiment`): the circuit found by EAP-IG
    and ACDC on the first 4 strings (or all, if fewer), its key edges checked by path patching;
    with `transcoder` too (one layer's MLP), its attribution graph.
    """
    say = progress or (elapsed_printer() if verbose else (lambda _: None))
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    compiles = CompileLog()
    compiles.start("capture")
    steps = iter(["scores", "knockout", "attribution", "search", "paths", "counterfactual",
                  "patching"] + (["features"] if dictionary is not None else [])
                 + (["circuit"] if circuit else []))

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
    if transcoder is not None:
        if not circuit:
            raise ValueError("a transcoder draws experiment 9's attribution graph: it needs "
                             "circuit=True (--circuit)")
        from ..circuits.attribution_graph import check_transcoders

        check_transcoders(model, {transcoder.reads.layer: transcoder})  # before any work
    if dictionary is not None:
        from ..features import SparseDictionary, check_fits

        if latents < 1:
            raise ValueError(f"latents must be >= 1; got {latents}")
        if isinstance(dictionary, SparseDictionary):
            check_fits(model, dictionary)  # before any work
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
        smallest = minimal_set(model, task, scores.top(2 * top),
                               baseline=behaved.repetitions.accuracy[1])
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
        features = None
        if dictionary is not None:
            from .features import feature_experiment

            if not isinstance(dictionary, SparseDictionary):
                dictionary = dictionary(scores.ranked[0].layer)
            say(f"features: the {latents} latents of {dictionary.name} most active on the "
                f"second occurrence, each ablated")
            features = feature_experiment(model, task, dictionary, critical, count=latents)
            lap("features")
        found = None
        if circuit:
            from .circuit import circuit_experiment

            say("circuit: EAP-IG over every edge of the component graph, ACDC, path patching")
            found = circuit_experiment(model, tokenizer, task, scores,
                                       strings=min(4, strings), top=top, seed=seed,
                                       transcoder=transcoder)
            lap("circuit")
    finally:
        compiles.close()
    return StudyResult(model_name, model.config.name, task, behaved, scores, knocked,
                       attributed, smallest, paths, counterfactual, maps, timings,
                       compiles.as_dict(), features, found)
