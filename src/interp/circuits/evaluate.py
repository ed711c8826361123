"""How good a circuit or a ranking of edges is: faithfulness over the number of edges kept,
its area, and the rank agreement of an attribution method with exact patching."""

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
    if by not in ("value", "magnitude"):
        raise ValueError(f"by must be 'value' or 'magnitude'; got {by!r}")
    key = scores.scores if by == "value" else -np.abs(scores.scores)
    order = np.argsort(np.where(np.isfinite(key), key, np.inf), kind="stable")
    weights = np.zeros((len(sizes) + 2, num), np.float32)
    for i, n in enumerate(sizes):
        weights[i, order[:n]] = 1
    weights[-2] = 1
    values = circuit_metrics(model, clean, corrupted, metric, weights, how=how, chunk=chunk)
    clean_value, corrupt_value = float(values[-2]), float(values[-1])
    faithfulness = (values[:-2] - corrupt_value) / (clean_value - corrupt_value)
    return FaithfulnessCurve(sizes, faithfulness, values[:-2], clean_value, corrupt_value, num)


__all__ = ["FaithfulnessCurve", "faithfulness_curve", "spearman"]
