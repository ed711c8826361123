"""Feature dashboards as the field draws them (SAEDashboard, Neuronpedia): for each latent its
top-activating contexts with the activating token marked, the histogram of its nonzero
activations, its density, and the tokens its decoder direction most raises and lowers when
read straight through the final norm's gain and the unembedding (`effects.logit_weights`).
Written as one self-contained `dashboard.html` (no network) and `dashboard.json` beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gemma_eqx.core.atomic import replace_file
from gemma_eqx.model.modules import Transformer

from ..install import add_interventions
from ..interventions import Record
from .dictionary import SparseDictionary
from .effects import logit_weights
from .splice import check_fits

CONTEXT = 8  # tokens shown on each side of the activating one


@dataclasses.dataclass(frozen=True)
class LatentCard:
    """One latent's dashboard: `examples` are `(activation, left tokens, token, right
    tokens)` strings, best first; `histogram` `(counts, edges)` of its nonzero activations;
    `logits` the top `(token, effect)` pairs raised and lowered."""

    latent: int
    density: float
    max_activation: float
    examples: list[tuple[float, str, str, str]]
    histogram: tuple[list[int], list[float]]
    raised: list[tuple[str, float]]
    lowered: list[tuple[str, float]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@eqx.filter_jit
def _features(recorded: Transformer, dictionary: SparseDictionary, tokens: jax.Array):
    out = recorded.forward(tokens, check_ids=False)
    x = out.records[f"blocks.{dictionary.reads.layer}.{dictionary.reads.site}"]
    return dictionary.encode(x)


def build_cards(model: Transformer, tokenizer: Any, dictionary: SparseDictionary,
                batches: Iterable[np.ndarray], latents: Sequence[int], *, top: int = 10,
                bins: int = 30, logit_tokens: int = 10) -> list[LatentCard]:
    """Cards of `latents` over `batches` of token windows (the first position of each window,
    its BOS, is left out)."""
    check_fits(model, dictionary)
    latents = [int(i) for i in latents]
    for i in latents:
        if not 0 <= i < dictionary.width:
            raise ValueError(f"latent {i} is not one of the dictionary's {dictionary.width}")
    recorded = add_interventions(model, {dictionary.reads.layer: Record(dictionary.reads.site)})
    chosen = jnp.asarray(latents)
    best: list[list[tuple[float, int, int]]] = [[] for _ in latents]
    values: list[list[np.ndarray]] = [[] for _ in latents]
    windows: list[np.ndarray] = []
    fired, count = np.zeros(len(latents)), 0
    for tokens in batches:
        tokens = np.asarray(tokens)
        acts = np.array(_features(recorded, dictionary, jnp.asarray(tokens))[..., chosen])
        acts[:, 0] = 0  # BOS
        base = sum(len(w) for w in windows)
        windows.append(tokens)
        count += tokens.shape[0] * (tokens.shape[1] - 1)
        for j in range(len(latents)):
            a = acts[..., j]
            nonzero = a[a != 0]
            fired[j] += nonzero.size
            values[j].append(nonzero)
            flat = np.argsort(a, axis=None)[::-1][:top]
            for index in flat:
                row, pos = np.unravel_index(index, a.shape)
                if a[row, pos] > 0:
                    best[j].append((float(a[row, pos]), base + int(row), int(pos)))
            best[j] = sorted(best[j], reverse=True)[:top]
    all_windows = np.concatenate(windows) if windows else np.zeros((0, 0), np.int32)
    effects = None
    if dictionary.writes.site not in ("mlp_in", "mlp_hidden"):  # else no direct effect
        effects = logit_weights(model, dictionary, latents)
    piece = lambda ids: tokenizer.decode([int(t) for t in ids])  # noqa: E731
    cards = []
    for j, latent in enumerate(latents):
        nonzero = np.concatenate(values[j]) if values[j] else np.zeros(0)
        counts, edges = np.histogram(nonzero, bins=bins) if nonzero.size else (np.zeros(0), [])
        examples = []
        for value, row, pos in best[j]:
            w = all_windows[row]
            examples.append((value, piece(w[max(1, pos - CONTEXT):pos]), piece(w[pos:pos + 1]),
                             piece(w[pos + 1:pos + 1 + CONTEXT])))
        raised = lowered = []
        if effects is not None:
            order = np.argsort(effects[j])
            raised = [(piece([t]), float(effects[j][t])) for t in order[::-1][:logit_tokens]]
            lowered = [(piece([t]), float(effects[j][t])) for t in order[:logit_tokens]]
        cards.append(LatentCard(latent, float(fired[j] / max(count, 1)),
                                float(nonzero.max()) if nonzero.size else 0.0, examples,
                                ([int(c) for c in counts], [float(e) for e in edges]),
                                raised, lowered))
    return cards


def _histogram_png(card: LatentCard) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, edges = card.histogram
    fig, ax = plt.subplots(figsize=(4, 1.6), dpi=80)
    if counts:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#3b7dd8")
    ax.set_xlabel("activation")
    ax.set_yticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def write_dashboard(cards: Sequence[LatentCard], out: str | Path, *, title: str) -> Path:
    """`dashboard.html` (self-contained) and `dashboard.json` in `out`; returns the page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:auto}"
             ".card{border:1px solid #ccc;margin:1em 0;padding:.5em 1em}"
             "mark{background:#ffd54f;font-weight:bold}td{padding:0 .5em}"
             ".ctx{font-family:monospace;white-space:pre-wrap}</style>",
             f"<h1>{e(title)}</h1>"]
    for card in cards:
        rows = "".join(f"<tr><td>{v:.3g}</td><td class='ctx'>{e(left)}<mark>{e(tok)}</mark>"
                       f"{e(right)}</td></tr>" for v, left, tok, right in card.examples)
        logit_rows = "".join(
            f"<tr><td class='ctx'>{e(a)}</td><td>{x:+.3g}</td><td class='ctx'>{e(b)}</td>"
            f"<td>{y:+.3g}</td></tr>" for (a, x), (b, y) in zip(card.raised, card.lowered,
                                                               strict=False))
        parts.append(
            f"<div class='card'><h2>latent {card.latent}</h2><p>density {card.density:.3%}, "
            f"largest activation {card.max_activation:.3g}</p>"
            f"<img alt='activation histogram' src='data:image/png;base64,"
            f"{_histogram_png(card)}'><h3>top activations</h3><table>{rows}</table>"
            + (f"<h3>logit effects (raised | lowered)</h3><table>{logit_rows}</table>"
               if logit_rows else "") + "</div>")
    page = out / "dashboard.html"
    with replace_file(page) as tmp:
        tmp.write_text("".join(parts))
    with replace_file(out / "dashboard.json") as tmp:
        tmp.write_text(json.dumps({"title": title, "latents": [c.to_json() for c in cards]},
                                  indent=1))
    return page


__all__ = ["LatentCard", "build_cards", "write_dashboard"]
