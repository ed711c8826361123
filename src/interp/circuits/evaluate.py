"""How good a circuit or a ranking of edges is: faithfulness over the number of edges kept and
its area; a circuit's faithfulness, minimality and completeness (Wang et al. 2022); and the
rank agreement of an attribution method with exact patching.

Every number here is a metric normalised by the model's own effect:
`F(circuit) = (metric(circuit) - metric(corrupted)) / (metric(clean) - metric(corrupted))`,
1 = the circuit does what the model does, 0 = what the corrupted input does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gemma_eqx.model.modules import Transformer

from .edges import circuit_metrics
from .scores import EdgeScores


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of `a` and `b` over the entries where both are finite
    (ties take their average rank, as scipy's `spearmanr`)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two vectors of one length; got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        raise ValueError("spearman needs at least two entries finite in both vectors")
    return float(np.corrcoef(_ranks(a[keep]), _ranks(b[keep]))[0, 1])


@dataclass(frozen=True)
class FaithfulnessCurve:
    """`faithfulness[i]`: (metric of the circuit of the top `sizes[i]` edges - metric
    corrupted) / (metric clean - metric corrupted); 1 = the circuit does what the model does, 0 =
    what the corrupted input does. `area` is the curve's area over the fraction of edges kept
    (trapezoids from (0, 0) to the last size)."""

    sizes: tuple[int, ...]
    faithfulness: np.ndarray
    metric: np.ndarray
    clean: float
    corrupted: float
    num_edges: int

    @property
    def area(self) -> float:
        x = np.concatenate([[0.0], np.asarray(self.sizes) / self.num_edges])
        y = np.concatenate([[0.0], self.faithfulness])
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def ranked_edges(scores: EdgeScores, by: str = "magnitude") -> np.ndarray:
    """Edge indices, best first: largest |score| (`by` "magnitude") or most negative score
    ("value"); NaN scores last."""
    if by not in ("value", "magnitude"):
        raise ValueError(f"by must be 'value' or 'magnitude'; got {by!r}")
    key = scores.scores if by == "value" else -np.abs(scores.scores)
    return np.argsort(np.where(np.isfinite(key), key, np.inf), kind="stable")


def faithfulness_curve(model: Transformer, clean: Any, corrupted: Any, metric: Any,
                       scores: EdgeScores, sizes: Sequence[int], *, how: str = "corrupted",
                       by: str = "magnitude", chunk: int = 8) -> FaithfulnessCurve:
    """The faithfulness of circuits made of the top `sizes` edges of `scores` (`by`
    "magnitude": largest |score| first; "value": the most negative first, the edges whose
    patching lowers the metric most), each run exactly in one program."""
    num = scores.graph.num_edges
    sizes = tuple(int(n) for n in sizes)
    if not sizes or any(not 1 <= n <= num for n in sizes):
        raise ValueError(f"sizes must be between 1 and the graph's {num} edges; got {sizes}")
    order = ranked_edges(scores, by)
    weights = np.zeros((len(sizes) + 2, num), np.float32)
    for i, n in enumerate(sizes):
        weights[i, order[:n]] = 1
    weights[-2] = 1
    values = circuit_metrics(model, clean, corrupted, metric, weights, how=how, chunk=chunk)
    clean_value, corrupt_value = float(values[-2]), float(values[-1])
    faithfulness = (values[:-2] - corrupt_value) / (clean_value - corrupt_value)
    return FaithfulnessCurve(sizes, faithfulness, values[:-2], clean_value, corrupt_value, num)


@dataclass(frozen=True)
class CircuitEvaluation:
    """A circuit (`edges`, indices into `graph.edges`) judged on one task; every value is an
    `F` of the module docstring.

    - `faithfulness`: F(C).
    - `minimality[i]`: F(C) - F(C without edges[i]), what the edge carries inside the circuit
      (Wang et al.'s minimality: a needed edge's removal costs the circuit).
    - `completeness[j]`: |F(C without K_j) - F(M without K_j)| for `subsets[j]` (K_j: a random
      half of the circuit's edges; M: the whole model): 0 when the model, like the circuit,
      relies on nothing outside it (Wang et al.'s completeness)."""

    edges: tuple[int, ...]
    faithfulness: float
    minimality: np.ndarray
    completeness: np.ndarray
    subsets: tuple[tuple[int, ...], ...]
    clean: float
    corrupted: float


def evaluate_circuit(model: Transformer, clean: Any, corrupted: Any, metric: Any,
                     circuit: Any, *, subsets: int = 8, seed: int = 0, how: str = "corrupted",
                     chunk: int = 8) -> CircuitEvaluation:
    """Faithfulness, minimality and completeness of `circuit` (edge names or indices, or a 0/1
    vector over the edges) on `clean` vs `corrupted`, all circuits run exactly in one program
    (`subsets` random halves for completeness, drawn with `seed`)."""
    from .graph import component_graph

    graph = component_graph(model)
    if isinstance(circuit, np.ndarray) and circuit.dtype == bool:
        if circuit.shape != (graph.num_edges,):
            raise ValueError(f"a circuit given as a mask must have one entry per edge "
                             f"({graph.num_edges}); got shape {circuit.shape}")
        circuit = np.flatnonzero(circuit).tolist()
    inside = np.flatnonzero(graph.circuit_weights(circuit))  # refuses an empty circuit
    if subsets < 0:
        raise ValueError(f"subsets must be >= 0; got {subsets}")
    base = np.zeros(graph.num_edges, np.float32)
    base[inside] = 1
    rng = np.random.default_rng(seed)
    halves = [tuple(sorted(rng.choice(inside, max(1, len(inside) // 2), replace=False)))
              for _ in range(subsets)]
    rows = [base]
    for e in inside:
        row = base.copy()
        row[e] = 0
        rows.append(row)
    for half in halves:
        row = base.copy()
        row[list(half)] = 0
        rows.append(row)
    for half in halves:
        row = np.ones(graph.num_edges, np.float32)
        row[list(half)] = 0
        rows.append(row)
    rows += [np.ones(graph.num_edges, np.float32), np.zeros(graph.num_edges, np.float32)]
    values = circuit_metrics(model, clean, corrupted, metric, np.stack(rows), how=how,
                             chunk=chunk)
    clean_value, corrupt_value = float(values[-2]), float(values[-1])
    f = (values[:-2] - corrupt_value) / (clean_value - corrupt_value)
    n, k = len(inside), len(halves)
    return CircuitEvaluation(
        edges=tuple(int(e) for e in inside), faithfulness=float(f[0]),
        minimality=f[0] - f[1:1 + n],
        completeness=np.abs(f[1 + n:1 + n + k] - f[1 + n + k:1 + n + 2 * k]),
        subsets=tuple(tuple(int(e) for e in h) for h in halves),
        clean=clean_value, corrupted=corrupt_value)


__all__ = ["CircuitEvaluation", "FaithfulnessCurve", "evaluate_circuit", "faithfulness_curve",
           "ranked_edges", "spearman"]
