"""Attribution graphs over transcoders (Ameisen et al. 2025, circuit-tracer): on one prompt, the
direct linear effects between transcoder features, error nodes, token embeddings and the top
output logits, pruned by influence, exported in circuit-tracer's graph JSON (what Neuronpedia's
graph viewer reads).

The replacement model: every MLP with a transcoder (given per layer, reading `mlp_in` and writing
`mlp_out_normed`) is replaced by its features plus an error node per position (what the
transcoder misses: the MLP's output minus the reconstruction); an MLP without one is an error
node per position whole. Attention patterns and every norm's statistics are frozen at their
values on the prompt, so the residual stream is linear in the sources:

- a feature at (layer, position) writes `activation * w_dec[feature]` into the stream after its
  layer's MLP; an error node its error vector; a token its embedding;
- a feature's target value is its pre-activation (`mlp_in @ w_enc + b_enc` at its layer); a
  logit's is `final_norm(x) @ (u_token - mean_vocab u)` at the last position (demeaned, before
  any final soft-cap), as circuit-tracer's.

`adjacency[target, source]` is the source's value times the gradient of the target's value in
the stream at the source's write, one backward pass of the linear map per target (batched).
Each target's value is the sum of its row plus the constants the graph does not attribute
(`b_enc`, the transcoders' `b_dec` carried to the target, and any bias of the attention):
`AttributionGraph.constants`, so that `adjacency.sum(1) + constants == values` exactly (a test).

Nodes are ordered as circuit-tracer orders them: features, errors (layer-major), tokens, logits.
Pruning keeps the nodes that carry `node_threshold` of the logits' influence (influence: the
logit probabilities pushed back through the row-normalised |adjacency|), then the edges that
carry `edge_threshold`, then drops nodes left without an outgoing (features, errors) or
incoming (features) edge, repeatedly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_eqx.core.atomic import replace_file
from gemma_eqx.model.modules import Transformer

from ..capture import capture
from ..features import SparseDictionary


@dataclass(frozen=True)
class AttributionGraph:
    """The unpruned graph of one prompt (module docstring). `features [F, 3]`: (layer,
    position, feature) of each active feature, `activations [F]`; `logit_tokens [K]` and
    `logit_probabilities [K]`; `adjacency [N, N]` (rows: targets, columns: sources; N = F +
    layers * positions + positions + K); `values [N]` each node's target value (features:
    pre-activation; logits: demeaned logit; NaN for errors and tokens) and `constants [N]`
    what of it no source explains."""

    tokens: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    adjacency: np.ndarray
    values: np.ndarray
    constants: np.ndarray
    num_layers: int
    transcoder_layers: tuple[int, ...]

    @property
    def positions(self) -> int:
        return len(self.tokens)

    def node_kind(self, i: int) -> str:
        f, e = len(self.features), self.num_layers * self.positions
        if i < f:
            return "feature"
        if i < f + e:
            return "error"
        return "token" if i < f + e + self.positions else "logit"


def check_transcoders(model: Transformer, transcoders: Mapping[int, SparseDictionary]) -> None:
    """Refuse, in one sentence, transcoders (by layer) a graph of `model` cannot use."""
    layers = len(model.blocks)
    for layer, t in transcoders.items():
        if not 0 <= layer < layers:
            raise ValueError(f"transcoder for layer {layer}: the model has layers 0 to "
                             f"{layers - 1}")
        if (t.reads.site, t.reads.layer, t.writes.site, t.writes.layer) != (
                "mlp_in", layer, "mlp_out_normed", layer):
            raise ValueError(f"{t.name}: an attribution graph replaces layer {layer}'s MLP, so "
                             f"its transcoder must read mlp_in and write mlp_out_normed of layer "
                             f"{layer}; it reads {t.reads.site} of layer {t.reads.layer} and "
                             f"writes {t.writes.site} of layer {t.writes.layer}")
        if t.input_norm != "none":
            raise ValueError(f"{t.name}: its input normalisation ({t.input_norm}) is not linear "
                             f"in the stream; an attribution graph needs a transcoder without one")
        if t.d_in != model.config.embed_dim or t.d_out != model.config.embed_dim:
            raise ValueError(f"{t.name}: reads {t.d_in} and writes {t.d_out} values per token; "
                             f"the model's stream has {model.config.embed_dim}")
    if any(b.parallel for b in model.blocks):
        raise ValueError("attribution graphs need sequential blocks (the MLP reading the "
                         "attention's output); this model's blocks are parallel")
    if model.config.norm_kind == "layer" or any(b.attn.b_q is not None or b.attn.b_o is not None
                                                for b in model.blocks):
        raise ValueError("attribution graphs are built for RMS-normed models without attention "
                         "biases (Gemma, Llama, Mistral, Qwen without qkv bias); this model has "
                         "a LayerNorm or attention biases, whose constants the graph does not "
                         "carry yet")


def _linear_stream(model: Transformer, frozen: Mapping[str, Any], skips: Mapping[int, Any],
                   embed: jax.Array, inject: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The replacement model's stream, linear in `embed [s, d]` and `inject [layers, s, d]`
    (added after each layer's MLP): each layer's `mlp_in` `[layers, s, d]` and the final norm's
    output `[s, d]` (attention patterns and norm statistics `frozen`; no biases)."""
    x = embed
    reads = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.pre_attention_norm.linear(x, frozen["resid_pre"][layer])
        v = jnp.einsum("sd,kdh->skh", h, attn.w_v.astype(h.dtype))
        group = attn.w_q.shape[0] // attn.w_v.shape[0]
        v = jnp.repeat(v, group, axis=1)                                     # [s, heads, hd]
        mixed = jnp.einsum("nst,tnh->snh", frozen["pattern"][layer], v)
        out = jnp.einsum("snh,nhd->sd", mixed, attn.w_o.astype(mixed.dtype))
        if block.post_attention_norm is not None:
            out = block.post_attention_norm.linear(out, frozen["attn_out"][layer])
        x = x + out
        mlp_in = block.pre_ffw_norm.linear(x, frozen["resid_mid"][layer])
        reads.append(mlp_in)
        if layer in skips:  # a skip-transcoder's linear path from its input
            x = x + mlp_in @ skips[layer]
        x = x + inject[layer]
    return jnp.stack(reads), model.final_norm.linear(x, frozen["final_norm_in"])


def attribution_graph(
    model: Transformer,
    tokens: Sequence[int] | np.ndarray,
    transcoders: Mapping[int, SparseDictionary],
    *,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    chunk: int = 32,
) -> AttributionGraph:
    """The attribution graph of one prompt `tokens [seq]` (module docstring) over
    `transcoders` (by layer; layers without one are error nodes whole). Logit targets: the
    most probable next tokens at the last position until their probabilities sum to
    `logit_probability`, at most `max_logits`."""
    if not transcoders:
        raise ValueError("an attribution graph needs at least one transcoder (by layer)")
    check_transcoders(model, transcoders)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < 1:
        raise ValueError(f"an attribution graph reads one prompt: tokens of shape [seq]; got "
                         f"{tokens.shape}")
    if not 1 <= max_logits:
        raise ValueError(f"max_logits must be >= 1; got {max_logits}")
    layers, s = len(model.blocks), len(tokens)
    sites = ["embed", "resid_pre", "pattern", "attn_out", "resid_mid", "mlp_in",
             "mlp_out_normed", "final_norm_in"]
    logits, cache = capture(model, jnp.asarray(tokens[None], jnp.int32), sites=sites)
    first = {site: cache[site][0] for site in ("embed", "final_norm_in")}
    frozen = {site: jnp.stack([cache[site, la][0] for la in range(layers)])
              for site in ("resid_pre", "pattern", "attn_out", "resid_mid")}
    frozen["final_norm_in"] = first["final_norm_in"]
    mlp_in = jnp.stack([cache["mlp_in", la][0] for la in range(layers)])
    mlp_out = np.stack([np.asarray(cache["mlp_out_normed", la][0], np.float64)
                        for la in range(layers)])
    embed = np.asarray(first["embed"], np.float64)

    # Features, errors and the transcoders' constants.
    feats, acts, decoders = [], [], []
    errors = mlp_out.copy()                       # layers without a transcoder: the whole MLP
    bias_inject = np.zeros((layers, s, model.config.embed_dim))
    skips = {}
    for layer, t in sorted(transcoders.items()):
        x = mlp_in[layer]
        a = np.asarray(t.encode(x), np.float64)   # [s, width]
        recon = np.asarray(t.decode(jnp.asarray(a, t.w_dec.dtype), x), np.float64)
        errors[layer] = mlp_out[layer] - recon
        bias_inject[layer] = np.asarray(t.b_dec, np.float64)
        if t.w_skip is not None:
            skips[layer] = t.w_skip.astype(jnp.float32)
            # The skip term flows through the linear map from the stream; not a constant.
        pos, idx = np.nonzero(a)
        for p, i in zip(pos, idx, strict=True):
            feats.append((layer, int(p), int(i)))
            acts.append(a[p, i])
            decoders.append(np.asarray(t.w_dec[i], np.float64))
    features = np.asarray(feats, np.int64).reshape(-1, 3)
    activations = np.asarray(acts, np.float64)
    decoders = np.asarray(decoders).reshape(-1, model.config.embed_dim)

    # Logit targets.
    last = np.asarray(logits[0, -1], np.float64)
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    count = min(max_logits, int(np.searchsorted(np.cumsum(probs[order]), logit_probability)) + 1)
    logit_tokens = order[:count]
    table = np.asarray(model.embedder.output_table, np.float64)
    demeaned = table[logit_tokens] - table.mean(0)

    # One backward pass of the linear map per target: cotangents on the reads.
    zeros_embed = jnp.zeros((s, model.config.embed_dim), jnp.float32)
    zeros_inject = jnp.zeros((layers, s, model.config.embed_dim), jnp.float32)
    _, backward = jax.vjp(lambda e, i: _linear_stream(model, frozen, skips, e, i),
                          zeros_embed, zeros_inject)
    backward = jax.jit(jax.vmap(backward))
    encoders = {la: np.asarray(t.w_enc, np.float64) for la, t in transcoders.items()}
    targets_reads = np.zeros((len(features) + count, layers, s, model.config.embed_dim),
                             np.float32)
    targets_final = np.zeros((len(features) + count, s, model.config.embed_dim), np.float32)
    for n, (la, p, i) in enumerate(features):
        targets_reads[n, la, p] = encoders[la][:, i]
    targets_final[len(features) + np.arange(count), s - 1] = demeaned
    f, e = len(features), layers * s
    size = f + e + s + count
    adjacency = np.zeros((size, size))
    feature_slot = features[:, 0] * s + features[:, 1] if f else np.zeros(0, np.int64)
    rows = np.concatenate([np.arange(f), f + e + s + np.arange(count)])
    constants = np.zeros(size)
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        g_embed, g_inject = backward((jnp.asarray(targets_reads[start:stop]),
                                      jnp.asarray(targets_final[start:stop])))
        g_embed = np.asarray(g_embed, np.float64)                        # [c, s, d]
        g_inject = np.asarray(g_inject, np.float64).reshape(stop - start, layers * s, -1)
        block = rows[start:stop]
        if f:
            adjacency[np.ix_(block, np.arange(f))] = activations * np.einsum(
                "cfd,fd->cf", g_inject[:, feature_slot], decoders)
        adjacency[block, f:f + e] = np.einsum("cnd,nd->cn", g_inject,
                                              errors.reshape(layers * s, -1))
        adjacency[block, f + e:f + e + s] = np.einsum("csd,sd->cs", g_embed, embed)
        constants[block] = np.einsum("cnd,nd->c", g_inject,
                                     bias_inject.reshape(layers * s, -1))
    values = np.full(size, np.nan)
    for n, (la, p, i) in enumerate(features):
        t = transcoders[int(la)]
        values[n] = float(t.pre_activations(mlp_in[la][p])[i])
        constants[n] += float(t.b_enc[i])
        if t.subtract_decoder_bias:
            constants[n] -= float(t.b_dec @ t.w_enc[:, i])
    final_normed = np.asarray(model.final_norm(first["final_norm_in"][s - 1]), np.float64)
    values[f + e + s:] = demeaned @ final_normed
    return AttributionGraph(tokens, features, activations, logit_tokens,
                            probs[logit_tokens], adjacency, values, constants, layers,
                            tuple(sorted(transcoders)))


# ------------------------------------------------------------------------------- pruning


def _normalised(matrix: np.ndarray) -> np.ndarray:
    a = np.abs(matrix)
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def _influence(a: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`weights @ (A + A^2 + ...)`: A is a DAG's (nilpotent), so the series ends."""
    current = weights @ a
    total = current.copy()
    for _ in range(len(a)):
        if not current.any():
            return total
        current = current @ a
        total += current
    raise RuntimeError("influence did not converge: the adjacency matrix has a cycle")


def _threshold(scores: np.ndarray, fraction: float) -> float:
    ordered = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(ordered) / ordered.sum()
    return float(ordered[min(int(np.searchsorted(cumulative, fraction)), len(ordered) - 1)])


@dataclass(frozen=True)
class PrunedGraph:
    """Which nodes and edges of `graph` are kept, and each node's cumulative influence
    (the fraction of the total influence of the nodes ranked above it and itself)."""

    graph: AttributionGraph
    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative: np.ndarray


def prune(graph: AttributionGraph, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> PrunedGraph:
    """Prune `graph` by influence on the logits (module docstring; circuit-tracer's
    `prune_graph`)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1; got {value}")
    a = graph.adjacency
    k, s, f = len(graph.logit_tokens), graph.positions, len(graph.features)
    weights = np.zeros(len(a))
    weights[-k:] = graph.logit_probabilities
    influence = _influence(_normalised(a), weights)
    nodes = influence >= _threshold(influence, node_threshold)
    nodes[-k - s:] = True                              # tokens and logits stay
    pruned = a.copy()
    pruned[~nodes] = 0
    pruned[:, ~nodes] = 0
    normalised = _normalised(pruned)
    edge_scores = normalised * (_influence(normalised, weights) + weights)[:, None]
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    while True:
        before = nodes.copy()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:-k - s] &= edges[:, :-k - s].any(0)     # features and errors send something
        nodes[:f] &= edges[:f].any(1)                  # features receive something
        if (nodes == before).all():
            break
    order = np.argsort(-influence, kind="stable")
    cumulative = np.empty(len(a))
    cumulative[order] = np.cumsum(influence[order]) / influence.sum()
    return PrunedGraph(graph, nodes, edges, cumulative)


# -------------------------------------------------------------------------------- export


def _node_json(graph: AttributionGraph, i: int, cumulative: float, pieces: Sequence[str]
               ) -> dict[str, Any]:
    """Node `i` in circuit-tracer's frontend schema (`graph_models.Node`)."""
    f, s, layers = len(graph.features), graph.positions, graph.num_layers
    kind = graph.node_kind(i)
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "clerp": "", "influence": float(cumulative), "activation": None}
    if kind == "feature":
        layer, pos, feature = (int(v) for v in graph.features[i])
        return {**base, "node_id": f"{layer}_{feature}_{pos}",
                "feature": (layer + feature) * (layer + feature + 1) // 2 + feature,
                "layer": str(layer), "ctx_idx": pos, "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{feature}-0", "activation": float(graph.activations[i])}
    if kind == "error":
        layer, pos = divmod(i - f, s)
        # circuit-tracer 0.5.0 names this node f"0_{layer}_{pos}", which is also the id of
        # feature `layer` of layer 0 at `pos`: the viewer keys nodes by id, so one would
        # replace the other. Feature -1 is never a feature's.
        return {**base, "node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer),
                "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{layer}_{pos}-0"}
    if kind == "token":
        pos = i - f - layers * s
        vocab = int(graph.tokens[pos])
        return {**base, "node_id": f"E_{vocab}_{pos}", "feature": pos, "layer": "E",
                "ctx_idx": pos, "feature_type": "embedding", "jsNodeId": f"E_{vocab}-{pos}"}
    j = i - f - layers * s - s
    vocab, prob = int(graph.logit_tokens[j]), float(graph.logit_probabilities[j])
    layer = str(layers + 1)
    return {**base, "node_id": f"{layer}_{vocab}_{s - 1}", "feature": vocab, "layer": layer,
            "ctx_idx": s - 1, "feature_type": "logit", "token_prob": prob,
            "is_target_logit": j == 0, "jsNodeId": f"L_{vocab}-{s - 1}",
            "clerp": f'Output "{pieces[j]}" (p={prob:.3f})', "influence": None}


def graph_json(pruned: PrunedGraph, *, slug: str, scan: str, prompt: str,
               prompt_tokens: Sequence[str], logit_pieces: Sequence[str],
               node_threshold: float = 0.8) -> dict[str, Any]:
    """The pruned graph as circuit-tracer's graph file (metadata, qParams, nodes, links):
    `prompt_tokens` the prompt's pieces, `logit_pieces` each logit target's."""
    graph = pruned.graph
    if len(prompt_tokens) != graph.positions or len(logit_pieces) != len(graph.logit_tokens):
        raise ValueError(f"graph_json needs a piece per prompt token ({graph.positions}) and "
                         f"per logit target ({len(graph.logit_tokens)}); got "
                         f"{len(prompt_tokens)} and {len(logit_pieces)}")
    kept = np.flatnonzero(pruned.node_mask)
    nodes = {int(i): _node_json(graph, int(i), pruned.cumulative[i], logit_pieces)
             for i in kept}
    targets, sources = np.nonzero(pruned.edge_mask)
    links = [{"source": nodes[int(s)]["node_id"], "target": nodes[int(t)]["node_id"],
              "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets, sources, strict=True)
             if int(s) in nodes and int(t) in nodes]
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens":
                     list(prompt_tokens), "prompt": prompt, "node_threshold": node_threshold,
                     "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": used,
        "links": links,
    }


def write_graph_json(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a graph file whole (a temporary name renamed into place)."""
    path = Path(path)
    with replace_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path




def draw_graph(pruned: PrunedGraph, path: str | os.PathLike, *,
               prompt_tokens: Sequence[str] | None = None,
               logit_pieces: Sequence[str] | None = None, title: str = "") -> Path:
    """A PNG of the pruned graph: positions across, layers up (tokens at the bottom, logits
    on top); features as dots, error nodes as squares; an edge blue when it raises its
    target, red when it lowers it, its width by |weight|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = pruned.graph
    f, s, layers = len(graph.features), graph.positions, graph.num_layers
    xy = {}
    by_cell: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(pruned.node_mask):
        kind = graph.node_kind(int(i))
        if kind == "feature":
            layer, pos, _ = graph.features[i]
            cell = (int(layer), int(pos))
        elif kind == "error":
            cell = divmod(int(i) - f, s)
        elif kind == "token":
            cell = (-1, int(i) - f - layers * s)
        else:
            cell = (layers, s - 1)
        k = by_cell.get(cell, 0)
        by_cell[cell] = k + 1
        xy[int(i)] = (cell[1] + 0.12 * (k % 6) - 0.3, cell[0] + 0.12 * (k // 6) + 1, kind)
    fig, ax = plt.subplots(figsize=(max(8, 0.8 * s), 6))
    targets, sources = np.nonzero(pruned.edge_mask)
    weights = graph.adjacency[targets, sources]
    biggest = max(float(np.abs(weights).max()) if len(weights) else 0.0, 1e-12)
    for t, src, w in zip(targets, sources, weights, strict=True):
        if int(t) in xy and int(src) in xy:
            (x0, y0, _), (x1, y1, _) = xy[int(src)], xy[int(t)]
            ax.plot([x0, x1], [y0, y1], color="tab:blue" if w > 0 else "tab:red",
                    lw=0.3 + 2.5 * abs(w) / biggest, alpha=0.5, zorder=1)
    style = {"feature": ("o", "black"), "error": ("s", "grey"), "token": ("^", "tab:green"),
             "logit": ("D", "tab:purple")}
    for kind, (marker, colour) in style.items():
        pts = [(x, y) for x, y, k in xy.values() if k == kind]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, c=colour, s=18, zorder=2,
                       label=kind)
    ax.set_xticks(range(s), list(prompt_tokens) if prompt_tokens is not None else range(s),
                  rotation=90, fontsize=7)
    ax.set_yticks(range(layers + 2), ["tokens"] + [str(la) for la in range(layers)]
                  + ["logits"], fontsize=7)
    ax.set_ylabel("layer")
    if logit_pieces is not None:
        title = (title + "  " if title else "") + "logits: " + ", ".join(
            f"{p!r} {q:.2f}" for p, q in zip(logit_pieces, graph.logit_probabilities,
                                             strict=True))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


__all__ = ["AttributionGraph", "PrunedGraph", "attribution_graph", "draw_graph", "graph_json",
           "prune", "write_graph_json"]
