"""The study's report: `report.json`, PNG figures and one self-contained `report.html`.

`write_report` writes each file under a temporary name and renames it into place, and touches
nothing in the output directory but the report's own files.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

import numpy as np

from gemma_eqx.core.atomic import (
    StorageError,
    is_partial,
    locked_directory,
    remove_partials,
    replace_file,
)

from .study import StudyResult

FIGURES = {
    "attention_top_heads.png": "Attention patterns of the top induction heads on the first "
    "sequence (rows: query token, columns: key token; grey cells are hidden by the causal "
    "mask). An induction head lights up the diagonal stripe one token right of the earlier "
    "occurrence of each query token.",
    "induction_scores.png": "Induction score of every head (layers down, heads across): the "
    "mean attention from the second repetition to the token after the earlier occurrence.",
    "token_probabilities.png": "Probability of the correct next token at each position, for "
    "the original model (top) and with the top heads knocked out (bottom); the dashed line "
    "marks the start of the second repetition.",
    "attribution.png": "Gradient of the mean correct-digit log-prob in the second repetition "
    "with respect to each head's knock-out mask, at all heads on (left) and at the top heads "
    "knocked out (right). Blue: removing the head hurts copying. Each panel has its own "
    "colour scale.",
    "path_analysis.png": "Experiment 6: relative logit of the correct digit (its logit minus "
    "the mean logit of the ten digits) over the second repetition, in six worlds computed "
    "side by side: the critical heads knocked out, then their paths restored one kind at a "
    "time, up to the original model.",
    "patching.png": "Activation patching, clean (BOS + A + A) into corrupted (BOS + B + A): "
    "the mean log-prob of A's digits over the second repetition after patching one head's "
    "output (left) or the residual stream entering a layer at one position (right), "
    "normalised so 0 is the corrupted run and 1 the clean run.",
}

# Written only when the study has the experiment (`--circuit`); removed from a directory whose
# earlier report had it, when a report without it replaces that one.
OPTIONAL_FIGURES = {
    "circuit.png": "Experiment 9. Left: the circuit ACDC kept (layers across, each layer's "
    "heads up the column and its MLP on top; the input at the left, the logits at the right), "
    "an edge from its sender to the head, key/value group, MLP or logits that reads it, "
    "coloured by what it feeds, its width by |EAP-IG|. Rings: the hand-found heads of "
    "experiments 2-3 (red: induction, blue: previous-token). Right: the faithfulness of the "
    "top-n edges by |EAP-IG| (0: the corrupted run, 1: the model), with ACDC's circuit.",
    "graph.png": "Experiment 9 with a transcoder: the attribution graph of the prompt "
    "(positions across, layers up), pruned as circuit-tracer prunes: features (dots), error "
    "nodes (squares), tokens and logits; an edge blue when it raises its target, red when it "
    "lowers it. graph.json holds it in circuit-tracer's format (Neuronpedia's graph viewer "
    "opens it).",
}
GRAPH_FILE = "graph.json"  # with a transcoder: circuit-tracer's graph file


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(piece: str) -> str:
    return piece.replace("\u2581", " ") or "?"


def plot_attention(result: StudyResult, path: Path) -> None:
    plt = _plt()
    patterns = result.scores.top_patterns
    heads = result.scores.ranked[: len(patterns)]
    cols = min(3, len(heads))
    rows = -(-len(heads) // cols)
    seq = patterns.shape[-1]
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 6.3 * rows), squeeze=False)
    labels = [_label(p) for p in result.task.token_pieces]
    causal = np.triu(np.ones((seq, seq), bool), 1)
    for ax, pattern, head in zip(axes.flat, patterns, heads, strict=False):
        shown = np.ma.masked_array(pattern, causal)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {head.layer}, head {head.head}  (score {head.score:.2f})")
        ax.set_xticks(range(seq), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(seq), labels, fontsize=8)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    for ax in list(axes.flat)[len(heads):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(ax, values: np.ndarray, title: str, cmap: str, symmetric: bool, fig) -> None:
    limit = float(np.abs(values).max()) or 1.0
    im = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest",
                   vmin=-limit if symmetric else 0, vmax=limit)
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    fig.colorbar(im, ax=ax, shrink=0.85)


def plot_scores(result: StudyResult, path: Path) -> None:
    plt = _plt()
    scores = result.scores.induction
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * scores.shape[1], 1.5 + 0.3 * scores.shape[0]))
    _heatmap(ax, scores, "induction score", "magma", False, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_token_probabilities(result: StudyResult, path: Path) -> None:
    plt = _plt()
    probs = np.exp([result.behaviour.logprobs[0], result.knockout.logprobs[0]])
    targets = [_label(p) for p in result.task.token_pieces[1:]]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(targets)), 2.8), sharex=True)
    for ax, row, name in zip(axes, probs, ["original", "top heads knocked out"], strict=True):
        ax.imshow(row[None], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.axvline(result.task.period - 0.5, color="k", ls="--", lw=1)
        ax.set_yticks([0], [name])
        for i, p in enumerate(row):
            ax.text(i, 0, f"{p:.2f}".lstrip("0"), ha="center", va="center", fontsize=7)
    axes[-1].set_xticks(range(len(targets)), targets, fontsize=8)
    axes[-1].set_xlabel("correct next token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attribution(result: StudyResult, path: Path) -> None:
    plt = _plt()
    a, b = result.attribution.all_ones, result.attribution.knocked
    fig, axes = plt.subplots(1, 2, figsize=(2 * (2.0 + 0.6 * a.shape[1]), 1.5 + 0.3 * a.shape[0]))
    # Knocked out, the gradients are several times smaller (270M: at most 0.16 against
    # 0.73): each panel has its own scale, and says so.
    _heatmap(axes[0], a, "gradient at all heads on\n(its own colour scale)", "RdBu", True, fig)
    _heatmap(axes[1], b, "gradient at top heads knocked out\n(its own colour scale)", "RdBu",
             True, fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_path_analysis(result: StudyResult, path: Path) -> None:
    plt = _plt()
    worlds = result.path_analysis.worlds
    fig, ax = plt.subplots(figsize=(8, 3.2))
    values = [w.relative_logit for w in worlds]
    ax.barh(range(len(worlds)), values, color=["#b2182b"] + ["#4393c3"] * (len(worlds) - 2)
            + ["#1a1a1a"])
    ax.set_yticks(range(len(worlds)), [w.description for w in worlds], fontsize=9)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    for i, v in enumerate(values):
        ax.text(max(v, 0), i, f" {v:.2f}", va="center", ha="left", fontsize=9)
    ax.set_xlabel("relative logit of the correct digit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_patching(result: StudyResult, path: Path) -> None:
    plt = _plt()
    maps = result.patching
    heads, residual = maps.heads, maps.residual
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.8 + 0.32 * heads.shape[0]),
                             gridspec_kw={"width_ratios": [1, 4]})
    limit = float(max(np.abs(heads).max(), np.abs(residual).max(), 1e-6))
    im = axes[0].imshow(heads, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto",
                        interpolation="nearest")
    axes[0].set_title("one head's output")
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    axes[0].set_xticks(range(heads.shape[1]))
    axes[0].set_yticks(range(heads.shape[0]))
    axes[1].imshow(residual, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto",
                   interpolation="nearest")
    axes[1].set_title("residual stream entering the layer, one position")
    labels = [_label(p) for p in result.task.token_pieces]
    axes[1].set_xticks(range(len(labels)), labels, fontsize=8)
    axes[1].set_xlabel("position (token of the clean input)")
    axes[1].set_yticks(range(len(maps.residual_layers)), maps.residual_layers)
    axes[1].set_ylabel("layer")
    fig.colorbar(im, ax=axes, shrink=0.85, label="normalised metric (one scale)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _compiled(stats: dict | None) -> list[str]:
    if not stats:
        return ["", "", ""]
    return [str(stats["programs"]), str(stats["cache_hits"]), f"{stats['seconds']:.1f}"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_NODE = re.compile(r"^(?:a(\d+)\.(?:h(\d+)|kv(\d+))|m(\d+))")
_KIND_COLOURS = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", "in": "tab:grey",
                 "logits": "tab:red"}


def _node_xy(name: str, c) -> tuple[float, float, str]:
    """Where the drawing puts a sender or receiver of experiment 9, and its kind."""
    if name == "input":
        return -1.0, (c.heads - 1) / 2, "input"
    if name == "logits":
        return float(c.layers), (c.heads - 1) / 2, "logits"
    kind = name[name.index("<") + 1:-1] if "<" in name else "out"
    a, h, g, m = _NODE.match(name).groups()
    if m is not None:
        return float(m) + 0.25, float(c.heads), kind
    # A head's inputs left of it: the query level with it, a key head's key above and value
    # below the middle of its group's query heads.
    if g is not None:
        group = c.heads // c.kv_heads
        middle = int(g) * group + (group - 1) / 2
        return float(a) - 0.18, middle + (0.2 if kind == "k" else -0.2), kind
    return float(a) - (0.3 if kind == "q" else 0.0), float(h), kind


def plot_circuit(result: StudyResult, path: Path) -> None:
    plt = _plt()
    c = result.circuit
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5),
                                      gridspec_kw={"width_ratios": [2.2, 1]})
    for layer in range(c.layers):
        left.scatter([layer] * c.heads, range(c.heads), s=25, c="#ccc", zorder=1)
        left.scatter([layer + 0.25], [c.heads], s=40, marker="s", c="#ccc", zorder=1)
    for heads, colour in ((c.induction_heads, "red"), (c.previous_token_heads, "blue")):
        left.scatter([h[0] for h in heads], [h[1] for h in heads], s=160, facecolors="none",
                     edgecolors=colour, linewidths=1.5, zorder=3)
    biggest = max([abs(e.eap_ig) for e in c.circuit] + [1e-9])
    for e in c.circuit:
        x0, y0, _ = _node_xy(e.sender, c)
        x1, y1, kind = _node_xy(e.receiver, c)
        left.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
            arrowstyle="-|>", color=_KIND_COLOURS.get(kind, "black"), alpha=0.8,
            lw=0.5 + 3 * abs(e.eap_ig) / biggest, shrinkA=3, shrinkB=3), zorder=2)
    for kind, colour in _KIND_COLOURS.items():
        left.plot([], [], color=colour, label={"in": "MLP input", "logits": "logits"}.get(
            kind, f"{kind} input"))
    left.legend(loc="upper left", fontsize=8, ncol=5)
    left.set_xticks(range(-1, c.layers + 1),
                    ["in"] + [str(i) for i in range(c.layers)] + ["logits"], fontsize=7)
    left.set_yticks(list(range(c.heads)) + [c.heads],
                    [f"h{i}" for i in range(c.heads)] + ["MLP"])
    left.set_ylim(-0.8, c.heads + 1.8)
    left.set_xlabel("layer")
    left.set_title(f"ACDC's circuit: {len(c.circuit)} edges, faithfulness "
                   f"{c.circuit_faithfulness:.2f}")
    right.plot(c.sizes, c.faithfulness, "o-", label="top-n edges by |EAP-IG|")
    if c.circuit:
        right.plot([len(c.circuit)], [c.circuit_faithfulness], "r*", ms=12,
                   label="ACDC's circuit")
    right.axhline(1, color="grey", lw=0.8, ls="--")
    right.set_xscale("log")
    right.set_xlabel(f"edges kept (of {c.edges})")
    right.set_ylabel("faithfulness")
    right.set_title(f"area {c.area:.2f}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def path_rows(result: StudyResult) -> list[list[str]]:
    """Experiment 6: world, what it restores, relative logit."""
    return [[w.world, w.description, f"{w.relative_logit:.2f}"]
            for w in result.path_analysis.worlds]


def counterfactual_rows(result: StudyResult) -> list[list[str]]:
    """Experiment 7: per patch, copy-target accuracy and probability, patched and not."""
    return [[p.description, p.copy_target, f"{p.copy_accuracy:.2f}", f"{p.copy_prob:.2f}",
             f"{p.baseline_copy_accuracy:.2f}", f"{p.baseline_copy_prob:.2f}"]
            for p in result.counterfactual.patches]


def feature_rows(result: StudyResult) -> list[list[str]]:
    """Experiment 8: per latent, mean activation first / second occurrence, how often it fires
    there, and the metric with it ablated."""
    if result.features is None:
        return []
    return [[str(f.latent), f"{f.first:.3f}", f"{f.second:.3f}", f"{f.fires_first:.2f}",
             f"{f.fires_second:.2f}", f"{f.ablated_logprob:.3f}", f"{f.ablated_accuracy:.2f}"]
            for f in result.features.latents]


def _features_html(result: StudyResult) -> str:
    f = result.features
    if f is None:
        return ""
    at_heads = ("at a layer of the critical heads" if f.layer in f.head_layers else
                f"not at a layer of the critical heads ({', '.join(map(str, f.head_layers))})")
    return f"""<h2>8. Features of a sparse dictionary</h2>
<p><code>{html.escape(f.dictionary)}</code> ({f.width} latents) spliced with its error term at
<code>{html.escape(f.site)}</code> of layer {f.layer}, {at_heads}. Its latents ranked by mean
activation on the second occurrence of the digits (positions P+1..2P) minus that on their
first (1..P), over all strings; each zero-ablated at every position (the rest of the model and
the error term unchanged), then all of them. Mean log-prob of the correct digit over the second
repetition: <b>{f.baseline_logprob:.3f}</b> as is (accuracy {f.baseline_accuracy:.2f}),
<b>{f.all_ablated_logprob:.3f}</b> with all {len(f.latents)} ablated (accuracy
{f.all_ablated_accuracy:.2f}).</p>
{_table(["latent", "mean, first", "mean, second", "fires, first", "fires, second",
         "log-prob ablated", "accuracy ablated"], feature_rows(result))}
"""


def claim_rows(result: StudyResult) -> list[list[str]]:
    """Experiment 9: per claim, the edge, the heads' hand-found ranks, path patching."""
    if result.circuit is None:
        return []
    return [[x.edge + ("" if x.in_circuit else " (EAP-IG)"), f"{x.eap_ig:.3f}",
             f"({x.sender[0]}, {x.sender[1]}): #{x.previous_token_rank} "
             f"({x.previous_token_score:.2f})",
             f"({x.receiver[0]}, {x.receiver[1]}): #{x.induction_rank} "
             f"({x.induction_score:.2f})",
             f"{x.path_fraction:.3f}", f"#{x.path_rank} of {x.path_senders}",
             "holds" if x.holds else "not confirmed"] for x in result.circuit.claims]


def _circuit_html(result: StudyResult, img) -> str:
    c = result.circuit
    if c is None:
        return ""
    from .study.circuit import HOLDS_FRACTION, HOLDS_RANK

    top = [[f"{e.sender} -> {e.receiver}", f"{e.eap_ig:.3f}"] for e in c.top_edges[:10]]
    kept = ", ".join(f"{e.sender} -> {e.receiver}" for e in c.circuit) or "none"
    needed = sum(e.minimality > 0.01 for e in c.circuit)
    worst = float(np.max(c.completeness)) if len(c.completeness) else float("nan")
    return f"""<h2>9. The circuit, found automatically</h2>
<p>Every edge of the component graph ({c.edges} edges: the input, each head and each MLP to
each later query, key and value input, MLP input and the logits) scored by {html.escape(
c.method)} in {c.eap_ig_seconds:.1f} s, on {c.strings} strings of BOS + A + A (clean) against
BOS + B + A (corrupted). The metric, the mean log-prob of A's second copy, is {c.clean:.2f}
clean and {c.corrupted:.2f} corrupted. Faithfulness: (metric of the circuit, every edge outside
it carrying the corrupted input - corrupted) / (clean - corrupted). Top edges:</p>
{_table(["edge", "EAP-IG"], top)}
<p>ACDC (KL from the clean model, threshold {c.threshold}, exact at every step) from the top
{c.start} edges: {c.acdc_runs} runs in {c.acdc_seconds:.0f} s kept <b>{len(c.circuit)}</b>
edges, faithfulness <b>{c.circuit_faithfulness:.2f}</b>. Minimality: {needed} of its edges
each carry more than 0.01 of the model's effect within it. Completeness: with a random half
of the circuit removed from both, the circuit and the model differ by at most {worst:.3f}
(of the model's effect; 0 = complete) over {len(c.completeness)} halves. The circuit:
{html.escape(kept)}.</p>
{img("circuit.png")}
<p>Claims "head X feeds head Y through the key" (the circuit's edges into a key input; Y the
query head of that key head's group with the highest induction score) checked by path
patching: X's corrupted output reaching only Y's key, as a fraction of the model's clean -
corrupted difference, ranked among every head below Y. A claim holds when that fraction is at
least {HOLDS_FRACTION} and X ranks in the top {HOLDS_RANK}. Beside: X's rank by
previous-token score and Y's by induction score (experiments 2-3).</p>
{_table(["edge", "EAP-IG", "X: previous-token rank", "Y: induction rank", "path patching",
         "rank", "claim"], claim_rows(result))}
{_graph_html(c, img)}"""


def _graph_html(c, img) -> str:
    g = c.graph
    if g is None:
        return ""
    targets = ", ".join(f"{html.escape(_label(t))} ({p:.2f})"
                        for t, p in zip(g.logit_targets, g.logit_probabilities, strict=True))
    top = [[str(pos), html.escape(_label(piece)), str(feature), f"{act:.2f}"]
           for pos, piece, feature, act in g.top_features]
    return f"""<h3>Attribution graph</h3>
<p>The MLP of layer {g.layer} replaced by <code>{html.escape(g.transcoder)}</code> (every other
MLP an error node per position), attention patterns and norm statistics frozen on
<code>{html.escape("".join(_label(p) for p in g.prompt))}</code>: {g.active_features} active
features; the edges plus their constants reproduce the model's values to
{g.reconstruction_error:.1e}. Pruned as circuit-tracer prunes (0.8 of the influence in nodes,
0.98 in edges): {g.kept_features} features, {g.kept_errors} error nodes, {g.kept_edges} edges.
Logit targets: {targets}. <code>graph.json</code> beside this report is circuit-tracer's graph
file. The most influential features:</p>
{_table(["position", "token", "feature", "activation"], top)}
{img("graph.png")}
"""


def summary_rows(result: StudyResult) -> list[list[str]]:
    """Per example: accuracy original / top heads knocked out / control knocked out."""
    return [[row.name, f"{row.original.accuracy:.2f}", f"{row.knocked.accuracy:.2f}",
             f"{row.control.accuracy:.2f}"] for row in result.knockout.examples]


_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;color:#222}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}
img{max-width:100%}
figcaption{color:#555;font-size:.92em}
code{background:#f2f2f2;padding:0 .2em}
"""


def render_html(result: StudyResult, directory: Path) -> str:
    def img(name: str) -> str:
        data = base64.b64encode((directory / name).read_bytes()).decode()
        caption = FIGURES.get(name) or OPTIONAL_FIGURES[name]
        return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    original, knocked = result.behaviour.repetitions, result.knockout.repetitions
    top = ", ".join(f"({layer}, {head})" for layer, head in result.knockout.heads)
    minimal = result.minimal_set
    minimal_text = ", ".join(f"({layer}, {head})" for layer, head in minimal.heads)
    trail = [[s.step, f"({s.layer}, {s.head})", f"{s.accuracy:.2f}"] for s in minimal.trail]
    critical = ", ".join(f"({layer}, {head})" for layer, head in result.path_analysis.heads)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Induction heads in {html.escape(result.preset)}</title><style>{_CSS}</style></head><body>
<h1>Induction heads in {html.escape(result.preset)}</h1>
<p>Model <code>{html.escape(result.model_name)}</code> (preset {html.escape(result.preset)}) read
BOS followed by {len(result.task.tokens)} random strings of {result.task.period} digits, each
repeated twice
(the first is shown below). An induction head, at a digit seen before, attends to the digit that
followed its earlier occurrence and copies it.</p>
<h2>1. Behaviour</h2>
<p>A repetition's <i>accuracy</i> is the fraction of its digits, after the first, that the
model's argmax predicts (nothing before a repetition predicts its first digit); the
knock-outs, the breaking-set search and the patching below score the same positions.
<b>{original.accuracy[0]:.2f}</b> in the first repetition, <b>{original.accuracy[1]:.2f}</b> in
the second. With the top
{len(result.knockout.heads)} induction heads knocked out (attention sent to BOS):
{knocked.accuracy[0]:.2f} and <b>{knocked.accuracy[1]:.2f}</b>.</p>
{img("token_probabilities.png")}
<h2>2-3. Attention patterns and induction scores</h2>
<p>Top heads by induction score (layer, head): {top}.</p>
{img("induction_scores.png")}
{img("attention_top_heads.png")}
<h2>4. Knock-out on other examples</h2>
<p>Accuracy on the scored (second-occurrence) tokens of each example (one sequence each; the
random digits are another string than section 1's, scored the same way), for the original model,
with the top heads knocked out, and with as many control heads knocked out: those scoring lowest
on the induction, previous-token and duplicate-token patterns alike (the lowest induction scores
alone include previous-token heads, the other half of the induction circuit).</p>
{_table(["example", "original", "top heads out", "control heads out"], summary_rows(result))}
<h2>5. Attribution patching and the smallest breaking set</h2>
{img("attribution.png")}
<p>Smallest set found whose knock-out brings second-repetition accuracy to within 0.1 of chance
({minimal.chance:.1f}): <b>{minimal_text or "none"}</b> (accuracy {minimal.accuracy:.2f},
from {minimal.baseline:.2f} with nothing knocked out; {"broken" if minimal.broken else
"not broken"}). The search knocks out the top heads one by one in ranked order until copying
breaks (<i>add</i>: the accuracy with the set so far knocked out). It then tries restoring each
chosen head, in the order added; the accuracy shown is with that head restored: <i>drop</i>
means copying stays broken without it, so it leaves the set; <i>keep</i> means restoring it
brings copying back, so it stays.</p>
{_table(["step", "head", "accuracy"], trail)}
<h2>6. Path analysis with worlds</h2>
<p>Six worlds of the same inputs run side by side in one batch; the critical heads
({critical}) are knocked out in the first only. Each later world restores one more kind of path
from those heads to the logits (the final norm is linearised around the first world in all of
them, so only the restored paths differ). Relative logit of the correct digit (its logit
minus the mean of the ten digits' logits), mean over the second repetition and all strings:</p>
{_table(["world", "restores", "relative logit"], path_rows(result))}
{img("path_analysis.png")}
<p>What the tutorial saw on Gemma 7B (four critical heads), step by step: the direct effect
about +1.5, later values +1.1, later patterns -0.9, the linear part of the MLPs +3.7, their
non-linear part -1.7: the heads' effect there runs mostly through the MLPs.</p>
<h2>7. Activation patching between inputs</h2>
<p>Worlds: the repeated digits A, random non-repeating digits B (first string:
{html.escape("".join(result.counterfactual.counterfactual))}...), and a patched world. Over
the second repetition: how often the argmax is the digit the critical heads would copy
under the patch (and its mean probability), against the unpatched world with the same
input.</p>
{_table(["patch", "the digit copied would be", "patched: argmax", "patched: prob",
         "unpatched: argmax", "unpatched: prob"], counterfactual_rows(result))}
<p>What the tutorial saw on Gemma 7B: with the values patched, the model confidently copies
the counterfactual's digits; with only the pattern patched, a very faint copy; with pattern
and values (the heads' whole output), still no copying (on 2B a slightly stronger, unconfident
copy), which it read as later MLPs gating what the heads write.</p>
<h2>Activation patching of every head and of the residual stream</h2>
<p>Clean BOS + A + A, corrupted BOS + B + A (first string); the metric, the mean log-prob of
A's digits over the second repetition, is {result.patching.clean:.2f} clean and
{result.patching.corrupted:.2f} corrupted. Residual stream at layers
{", ".join(map(str, result.patching.residual_layers))}.</p>
{img("patching.png")}
{_features_html(result)}{_circuit_html(result, img)}<h2>Timings</h2>
{_table(["step", "seconds", "programs compiled", "from the compile cache", "compile seconds"],
        [[k, f"{v:.1f}", *_compiled(result.compilation.get(k))]
         for k, v in result.timings.items()])}
<p>The numbers behind every figure are in <code>report.json</code>.</p>
<script>
// Lets a headless browser confirm that every figure decoded (see the report's tests).
window.addEventListener("load", () => {{
  const images = [...document.images];
  document.body.dataset.figuresLoaded = images.filter(i => i.naturalWidth > 0).length;
  document.body.dataset.figures = images.length;
}});
</script>
</body></html>
"""


REPORT_FILES = ("report.json", *FIGURES, "report.html")  # what every report writes
OPTIONAL_FILES = (*OPTIONAL_FIGURES, GRAPH_FILE)  # with experiment 9 (and its graph)
GENERATOR = "gemma-eqx induction"  # report.json's "generator": marks a directory as a report


class ReportDirectoryError(ValueError):
    """The output directory holds files that are not a report; nothing was written."""


def _is_report(directory: Path) -> bool:
    try:
        data = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        return False
    # Reports written before the marker existed carry these keys.
    return isinstance(data, dict) and (
        data.get("generator") == GENERATOR
        or {"preset", "top_heads", "induction_scores", "minimal_set"} <= data.keys()
    )


def check_report_directory(out: str | os.PathLike) -> Path:
    """`out` as an absolute path, or a clear error if a report may not be written there.

    Allowed: a new path, an empty directory, or one holding an earlier report (only the
    report's own files are replaced; anything else there is left alone). Refused: a file,
    or a non-empty directory that holds no report.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    if out.is_dir() and not _is_report(out):
        foreign = sorted(p.name for p in out.iterdir() if not any(
            p.name == name or is_partial(p.name, name)
            for name in (*REPORT_FILES, *OPTIONAL_FILES)))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                              else "")
            raise ReportDirectoryError(
                f"output directory {out} is not empty and holds no earlier report ({shown}); "
                f"nothing was written: choose a new or empty directory"
            )
    return out


def _earlier_optional_files(directory: Path) -> list[str]:
    """The optional files the report in `directory` (if any) wrote: circuit.png with
    experiment 9, graph.png and graph.json with its attribution graph."""
    try:
        data = json.loads((directory / "report.json").read_text())
    except (OSError, ValueError):
        return []
    circuit = data.get("circuit") if isinstance(data, dict) else None
    if not isinstance(circuit, dict):
        return []
    return ["circuit.png"] + (["graph.png", GRAPH_FILE] if circuit.get("graph") else [])


def _draw_graph(result: StudyResult, path: Path) -> None:
    from .circuits import draw_graph

    g = result.circuit.graph
    draw_graph(g.pruned, path, prompt_tokens=[_label(p) for p in g.prompt],
               logit_pieces=[_label(p) for p in g.logit_targets],
               title=f"{g.transcoder} at layer {g.layer}")


def write_report(result: StudyResult, out: str | os.PathLike) -> Path:
    """Write report.json, the figures and report.html into the directory `out`.

    Each file is written under a temporary name and renamed into place, so every file is
    whole; only these files are written, and files of an earlier report are replaced. Writers
    of one directory take turns (a lock on it); an interrupted write leaves whole files of the
    old and new report, and the next write completes it. See `check_report_directory` for the
    directories refused. In a multi-process cluster only process 0 writes; every process
    returns the directory.
    """
    from gemma_eqx.core.multihost import is_lead

    out = check_report_directory(out)
    if not is_lead():
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked_directory(out):
            out = check_report_directory(out)  # another writer may have changed it meanwhile
            had = _earlier_optional_files(out)
            for name in (*REPORT_FILES, *OPTIONAL_FILES):
                remove_partials(out / name)  # what interrupted writes left
            payload = {"generator": GENERATOR, **result.to_json()}
            writers = {
                "attention_top_heads.png": lambda p: plot_attention(result, p),
                "induction_scores.png": lambda p: plot_scores(result, p),
                "token_probabilities.png": lambda p: plot_token_probabilities(result, p),
                "attribution.png": lambda p: plot_attribution(result, p),
                "path_analysis.png": lambda p: plot_path_analysis(result, p),
                "patching.png": lambda p: plot_patching(result, p),
                "circuit.png": lambda p: plot_circuit(result, p),
                "graph.png": lambda p: _draw_graph(result, p),
                GRAPH_FILE: lambda p: p.write_text(json.dumps(result.circuit.graph.file)),
                "report.html": lambda p: p.write_text(render_html(result, p.parent)),
                "report.json": lambda p: p.write_text(json.dumps(payload, indent=1)),
            }
            graph = result.circuit is not None and result.circuit.graph is not None
            optional = [name for name in ("circuit.png",) if result.circuit is not None]
            optional += ["graph.png", GRAPH_FILE] if graph else []
            for name in (*FIGURES, *optional, "report.html", "report.json"):  # marker last
                with replace_file(out / name) as tmp:
                    writers[name](tmp)
            for name in set(had) - set(optional):
                # The earlier report's own files (its report.json says it had them): the new
                # report does not show them.
                (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise StorageError.writing(e, f"the report into {out}", "choose another output "
                                   "directory") from None
    return out
