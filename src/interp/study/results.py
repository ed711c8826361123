"""The study's typed results: one frozen dataclass per experiment, all of them in one
`StudyResult` whose `to_json()` is `report.json`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import analyses

Head = tuple[int, int]  # (layer, head)


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
class InductionLatent:
    """One latent of experiment 8: its mean activation (and how often it fires) on the first
    occurrence of the digits (positions 1..P) and on their second occurrence (P+1..2P), and
    the knock-out metric with it zero-ablated at every position."""

    latent: int
    first: float
    second: float
    fires_first: float
    fires_second: float
    ablated_logprob: float
    ablated_accuracy: float


@dataclasses.dataclass(frozen=True)
class FeatureExperiment:
    """Experiment 8 (`--dictionary`): an SAE spliced (with its error term) at `site` of
    `layer`; the latents most active on the second occurrence of a repeated digit relative to
    its first, and what ablating each of them, and all of them, costs the mean log-prob and
    accuracy of the correct digit over the second repetition (the knock-out's metric, mean
    over strings; `baseline` with nothing ablated, which is the model's own)."""

    dictionary: str
    site: str
    layer: int
    width: int
    head_layers: tuple[int, ...]  # the layers of the critical heads
    baseline_logprob: float
    baseline_accuracy: float
    all_ablated_logprob: float
    all_ablated_accuracy: float
    latents: tuple[InductionLatent, ...]


@dataclasses.dataclass(frozen=True)
class CircuitEdge:
    """An edge of experiment 9: its EAP-IG score (the estimated change of the metric when it
    alone is patched) and, in the circuit, its minimality (F(circuit) - F(circuit without it),
    F the metric normalised: 0 corrupted, 1 clean; NaN outside the circuit)."""

    sender: str
    receiver: str
    eap_ig: float
    minimality: float = float("nan")


@dataclasses.dataclass(frozen=True)
class CircuitClaim:
    """"Head `sender` feeds head `receiver` through the key", from an edge of the circuit,
    checked by path patching: `path_fraction` is how much of the model's clean-corrupted
    difference of the metric the sender's corrupted output moves when it reaches only the
    receiver's key, `path_rank` its rank among the `path_senders` heads below the receiver.
    The ranks of the two heads by the hand-found scores of experiments 2-3 stand beside."""

    edge: str
    sender: Head
    receiver: Head
    eap_ig: float
    in_circuit: bool  # False: ACDC kept no key edge and this is EAP-IG's
    previous_token_score: float
    previous_token_rank: int
    induction_score: float
    induction_rank: int
    path_fraction: float
    path_rank: int
    path_senders: int
    holds: bool


@dataclasses.dataclass(frozen=True)
class GraphSummary:
    """Experiment 9's attribution graph (with `--transcoder`): the prompt (BOS + the first
    string's first `period` digits twice), the transcoder's layer, how many features were
    active and kept after pruning, the logit targets, how exactly the edges reproduce the
    model's values, and the most influential features (position, token, feature,
    activation). `file` is circuit-tracer's graph JSON (written as graph.json)."""

    transcoder: str
    layer: int
    prompt: tuple[str, ...]
    active_features: int
    kept_features: int
    kept_errors: int
    kept_edges: int
    logit_targets: tuple[str, ...]
    logit_probabilities: tuple[float, ...]
    reconstruction_error: float
    top_features: tuple[tuple[int, str, int, float], ...]
    file: dict = dataclasses.field(repr=False, metadata={"json": False})
    pruned: Any = dataclasses.field(repr=False, metadata={"json": False})


@dataclasses.dataclass(frozen=True)
class CircuitExperiment:
    """Experiment 9 (`--circuit`): EAP-IG over the component graph on BOS + A + A against
    BOS + B + A (`strings` of them), the faithfulness of its top-n edges (`sizes`), ACDC's
    circuit from the top `start` (KL `threshold`) with its faithfulness, minimality and
    completeness (per random half of the circuit removed: |F(circuit) - F(model)|, 0 =
    complete), and its key edges checked by path patching (`claims`)."""

    strings: int
    steps: int
    layers: int
    heads: int
    kv_heads: int
    edges: int
    clean: float
    corrupted: float
    method: str
    eap_ig_seconds: float
    top_edges: tuple[CircuitEdge, ...]
    sizes: tuple[int, ...]
    faithfulness: np.ndarray
    area: float
    threshold: float
    start: int
    acdc_runs: int
    acdc_seconds: float
    circuit: tuple[CircuitEdge, ...]
    circuit_faithfulness: float
    completeness: np.ndarray
    claims: tuple[CircuitClaim, ...]
    induction_heads: tuple[Head, ...]  # hand-found (experiments 2-3), for the drawing
    previous_token_heads: tuple[Head, ...]
    graph: GraphSummary | None = None  # with a transcoder


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
    features: FeatureExperiment | None = None  # experiment 8, with a dictionary
    circuit: CircuitExperiment | None = None  # experiment 9, with --circuit

    def to_json(self) -> dict[str, Any]:
        return _rounded(self)


# ------------------------------------------------------------------------------ experiments
