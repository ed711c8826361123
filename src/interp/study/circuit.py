"""Experiment 9 (`gemma-eqx induction --circuit`): the study finds its own circuit.

On BOS + A + A (clean) against BOS + B + A (corrupted; B the non-repeating digits of the
patching maps), with the mean log-prob of A's second copy as the metric:

1. EAP-IG scores every edge of the component graph (`interp.circuits`);
2. the faithfulness of the top-n edges, each circuit run exactly;
3. ACDC (KL from the clean model, exact at every step) prunes the top `start` edges to a
   circuit, whose faithfulness, minimality and completeness are measured;
4. each edge of that circuit from a head into a key input is a claim "head X feeds head Y
   through the key" (Y: the query head of that key head's group with the highest induction
   score), checked by path patching (`patching.path_patching`, Wang et al.): X's corrupted
   output reaching only Y's key. The claim holds when X's path alone moves the metric by at
   least `HOLDS_FRACTION` of the model's clean-corrupted difference and ranks among the
   `HOLDS_RANK` largest of every head below Y;
5. with a transcoder (of one layer's MLP), the attribution graph (`interp.circuits.
   attribution_graph`, circuit-tracer's) of BOS + the first string's first `GRAPH_PERIOD`
   digits twice, pruned, as circuit-tracer's graph JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_eqx.core.text import TokenizerLike
from gemma_eqx.model.modules import Transformer

from .. import analyses
from ..circuits import (
    acdc,
    component_graph,
    edge_attribution,
    evaluate_circuit,
    faithfulness_curve,
    ranked_edges,
)
from ..patching import Metric, path_patching
from .results import (
    CircuitClaim,
    CircuitEdge,
    CircuitExperiment,
    DigitTask,
    GraphSummary,
    Head,
    HeadScores,
)
from .task import nonrepeating_digits, scored_positions

HOLDS_FRACTION, HOLDS_RANK = 0.05, 3
GRAPH_PERIOD = 8
SIZES = (10, 20, 50, 100, 200, 500, 1000, 2000)


def copied_logprob(logits, targets):
    """Mean log-prob of `targets [strings, k]` under `logits [rows, k, vocab]`; sweeps tile the
    strings (rows a multiple of them), so the targets are tiled alike."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    targets = jnp.tile(targets, (logits.shape[0] // targets.shape[0], 1))
    return jnp.take_along_axis(lp, targets[..., None], -1)[..., 0].mean(-1)


def circuit_task(tokenizer: TokenizerLike, task: DigitTask, *, strings: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, Metric]:
    """The first `strings` of the task as clean (BOS + A + A), the same with the first copy
    replaced by non-repeating digits as corrupted (BOS + B + A), and the metric: the mean
    log-prob of A's digits over the second copy, first digit left out (per string)."""
    if not 1 <= strings <= len(task.tokens):
        raise ValueError(f"the circuit experiment scores 1 to {len(task.tokens)} strings (the "
                         f"task's); got {strings}")
    period = task.period
    clean = task.tokens[:strings]
    other = nonrepeating_digits(tokenizer, task, seed=seed)[:strings]
    corrupted = np.concatenate([other[:, :period + 1], clean[:, period + 1:]], axis=1)
    scored = scored_positions(task)
    metric = Metric(tuple(int(p) for p in scored), copied_logprob,
                    jnp.asarray(clean[:, scored + 1], jnp.int32),
                    "mean log-prob of the copied digits", data_are_token_ids=True)
    return clean, corrupted, metric


def _group_head(model: Transformer, scores: HeadScores, layer: int, kv_head: int) -> int:
    """The query head with the highest induction score among those reading `kv_head`."""
    group = model.config.num_heads // model.config.num_kv_heads
    heads = range(kv_head * group, (kv_head + 1) * group)
    return max(heads, key=lambda h: scores.induction[layer, h])


def _rank(values: np.ndarray, at: Head) -> int:
    """1 + how many entries of `values [layers, heads]` exceed the one `at`."""
    return 1 + int((values > values[at]).sum())


def circuit_experiment(
    model: Transformer,
    tokenizer: TokenizerLike,
    task: DigitTask,
    scores: HeadScores,
    *,
    strings: int = 4,
    steps: int = 8,
    start: int = 120,
    threshold: float = 0.02,
    top: int = 10,
    seed: int = 0,
    claims: int = 3,
    transcoder: Any = None,
) -> CircuitExperiment:
    """Experiment 9 (module docstring) on the first `strings` strings: EAP-IG with `steps`
    points, ACDC with KL `threshold` from the top `start` edges, and path patching of up to
    `claims` key edges. `scores` (experiments 2-3) name the hand-found heads: the top `top` by
    induction and by previous-token score. `transcoder`: a `SparseDictionary` reading `mlp_in`
    and writing `mlp_out_normed` of one layer, for the attribution graph."""
    if steps < 1 or start < 1 or claims < 0 or not threshold >= 0:
        raise ValueError(f"the circuit experiment needs steps >= 1, start >= 1, claims >= 0 "
                         f"and threshold >= 0; got {steps}, {start}, {claims}, {threshold}")
    clean, corrupted, metric = circuit_task(tokenizer, task, strings=strings, seed=seed)
    graph = component_graph(model)
    ig = edge_attribution(model, clean, corrupted, metric, steps=steps)
    order = ranked_edges(ig)
    found = acdc(model, clean, corrupted, threshold=threshold, positions=metric.positions,
                 start=[int(e) for e in order[:start]])
    sizes = tuple(n for n in SIZES if n < graph.num_edges) + (graph.num_edges,)
    curve = faithfulness_curve(model, clean, corrupted, metric, ig, sizes)
    kept = np.flatnonzero(found.kept)
    evaluation = (evaluate_circuit(model, clean, corrupted, metric, kept.tolist(), seed=seed)
                  if len(kept) else None)

    def edge(e: int, minimality: float = float("nan")) -> CircuitEdge:
        s, r = graph.edges[e]
        return CircuitEdge(graph.senders[s].name, graph.receivers[r].name, float(ig.scores[e]),
                           minimality)

    circuit = tuple(edge(int(e), float(m)) for e, m in zip(
        kept, [] if evaluation is None else evaluation.minimality, strict=True))
    # Claims: the circuit's edges from a head into a key input, largest |EAP-IG| first; if
    # ACDC kept none, EAP-IG's top such edges.
    def is_key_edge(e: int) -> bool:
        s, r = graph.edges[e]
        return graph.senders[s].kind == "head" and graph.receivers[r].kind == "k"

    from_circuit = [int(e) for e in order if found.kept[e] and is_key_edge(int(e))]
    chosen = (from_circuit or [int(e) for e in order if is_key_edge(int(e))])[:claims]
    induction_heads = tuple(scores.top(top))
    previous = [(la, h) for la, h, _ in analyses.rank_heads(
        jnp.asarray(scores.previous_token))]
    paths: dict[Head, tuple[np.ndarray, float, float]] = {}
    made = []
    for e in chosen:
        s, r = graph.edges[e]
        sender, receiver = graph.senders[s], graph.receivers[r]
        x: Head = (sender.layer, sender.index)
        y: Head = (receiver.layer, _group_head(model, scores, receiver.layer, receiver.index))
        if y not in paths:
            below = [(la, h) for la in range(y[0]) for h in range(model.config.num_heads)]
            result = path_patching(model, clean, corrupted, [y], "k", metric, senders=below)
            paths[y] = (result.normalized, result.target, result.source)
        effect, _, _ = paths[y]
        fraction = float(effect[x])
        rank = _rank(np.nan_to_num(effect, nan=-np.inf), x)
        made.append(CircuitClaim(
            edge=graph.edge_name(e), sender=x, receiver=y, eap_ig=float(ig.scores[e]),
            in_circuit=bool(found.kept[e]),
            previous_token_score=float(scores.previous_token[x]),
            previous_token_rank=previous.index(x) + 1,
            induction_score=float(scores.induction[y]),
            induction_rank=[(h.layer, h.head) for h in scores.ranked].index(y) + 1,
            path_fraction=fraction, path_rank=rank, path_senders=y[0] * model.config.num_heads,
            holds=fraction >= HOLDS_FRACTION and rank <= HOLDS_RANK))
    drawn = None if transcoder is None else graph_summary(model, tokenizer, task, transcoder)
    return CircuitExperiment(
        strings=strings, steps=steps, layers=graph.num_layers, heads=graph.num_heads,
        kv_heads=graph.num_kv_heads, edges=graph.num_edges, clean=curve.clean,
        corrupted=curve.corrupted, method=ig.method, eap_ig_seconds=ig.seconds,
        top_edges=tuple(edge(int(e)) for e in order[:20]),
        sizes=curve.sizes, faithfulness=curve.faithfulness, area=curve.area,
        threshold=float(threshold), start=min(start, graph.num_edges), acdc_runs=found.runs,
        acdc_seconds=found.seconds, circuit=circuit,
        circuit_faithfulness=float("nan") if evaluation is None else evaluation.faithfulness,
        completeness=np.zeros(0) if evaluation is None else evaluation.completeness,
        claims=tuple(made), induction_heads=induction_heads,
        previous_token_heads=tuple(previous[:top]), graph=drawn)


def graph_summary(model: Transformer, tokenizer: TokenizerLike, task: DigitTask,
                  transcoder: Any) -> GraphSummary:
    """The attribution graph of BOS + the first string's first `GRAPH_PERIOD` digits twice,
    over `transcoder`, pruned as circuit-tracer prunes."""
    from ..circuits import attribution_graph, graph_json, prune

    digits = task.tokens[0, 1:1 + min(GRAPH_PERIOD, task.period)]
    tokens = np.concatenate([task.tokens[0, :1], digits, digits])
    pieces = [tokenizer.id_to_piece(int(t)) for t in tokens]
    layer = transcoder.reads.layer
    graph = attribution_graph(model, tokens, {layer: transcoder})
    pruned = prune(graph)
    logit_pieces = [tokenizer.id_to_piece(int(t)) for t in graph.logit_tokens]
    rows = np.flatnonzero(~np.isnan(graph.values))
    error = graph.adjacency[rows].sum(1) + graph.constants[rows] - graph.values[rows]
    f = len(graph.features)
    kept = np.flatnonzero(pruned.node_mask[:f])
    top = kept[np.argsort(pruned.cumulative[kept], kind="stable")][:10]
    return GraphSummary(
        transcoder=transcoder.name, layer=layer, prompt=tuple(pieces), active_features=f,
        kept_features=len(kept),
        kept_errors=int(pruned.node_mask[f:f + graph.num_layers * graph.positions].sum()),
        kept_edges=int(pruned.edge_mask.sum()), logit_targets=tuple(logit_pieces),
        logit_probabilities=tuple(float(p) for p in graph.logit_probabilities),
        reconstruction_error=float(np.abs(error).max()) if len(rows) else 0.0,
        top_features=tuple((int(graph.features[i][1]), pieces[int(graph.features[i][1])],
                            int(graph.features[i][2]), float(graph.activations[i]))
                           for i in top),
        file=graph_json(pruned, slug="induction", scan=f"gemma-eqx-{transcoder.name}",
                        prompt="".join(pieces), prompt_tokens=pieces,
                        logit_pieces=logit_pieces),
        pruned=pruned)


__all__: Sequence[str] = ["circuit_experiment", "circuit_task", "copied_logprob", "graph_summary"]
