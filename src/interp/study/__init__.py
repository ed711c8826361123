"""The induction-head study (experiments 1-7): one function per experiment, typed results.

`run_study(model, tokenizer)` runs them all, as `gemma-eqx induction` reports them:
`behaviour` on repeated random digits (capturing attention too), `score_heads`, `knockout` of
the top heads (and of as many heads that score low on every pattern, as a control) on the
study's examples, `attribution` gradients at two mask points, `minimal_set`, the smallest
set of heads whose knock-out breaks copying, `path_analysis` (experiment 6: worlds that restore
the heads' paths one kind at a time), `counterfactual_patching` (experiment 7: the heads'
values, pattern or output taken from another input) and `patching_maps` (clean -> corrupted
activation patching of every head and of the residual stream). Each takes a `DigitTask`.

With a dictionary, experiment 8 (`features`); with `circuit=True`, experiment 9 (`circuit`:
the circuit found automatically, `interp.circuits`). Both modules are imported only when used.

The package: `task` (the input and its checks), `experiments` (one function per experiment),
`results` (their typed results), `run` (`run_study`, all of them in order).
"""

from .experiments import (
    PATH_WORLDS,
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
from .results import (
    Attribution,
    Behaviour,
    CircuitClaim,
    CircuitEdge,
    CircuitExperiment,
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
    StudyResult,
    WorldScore,
)
from .run import Progress, elapsed_printer, run_study
from .task import CHANCE, check_digits, check_top, digit_task, nonrepeating_digits

__all__ = [
    "CHANCE", "PATH_WORLDS", "Attribution", "Behaviour", "CircuitClaim", "CircuitEdge",
    "CircuitExperiment", "CounterfactualPatch",
    "CounterfactualPatching", "DigitTask", "ExampleKnockout", "ExampleScores", "Head",
    "HeadScores", "Knockout", "MinimalSet", "PatchingMaps", "PathAnalysis", "Progress",
    "RankedHead", "Repetitions", "SearchStep", "StudyResult", "WorldScore", "attribution",
    "behaviour", "check_digits", "check_top", "counterfactual_patching", "digit_task",
    "elapsed_printer", "every_nth_layer", "knockout", "minimal_set", "nonrepeating_digits",
    "path_analysis", "patching_maps", "run_study", "score_heads",
]
