"""Running circuits exactly: every receiver gets its own input, in which each edge carries the
clean sender's output or the corrupted one.

With a weight per edge `w` (1: the edge is in the circuit, 0: it is not), receiver `r` reads

    input + sum over its senders s of  patch_s + w[s, r] * (out_s - patch_s)

where `out_s` is what sender `s` outputs in this run (itself computed from its own patched
inputs) and `patch_s` what it output on the corrupted input (or its mean over a reference
batch). A layer's heads enter through the layer's post-attention norm (Gemma 2 and 3): the
receiver's mix of those heads is summed, the output bias added, and normed, so the
receiver's input is exactly the stream it would see if only its edges were patched. Weights
between 0 and 1 interpolate, and their gradient is edge attribution patching
(`interp.circuits.scores`).

The model's own attention computes each layer (through interventions on its `q`, `k`, `v`
sites), so soft-caps, windows, RoPE and QK-norm are the model's. A forward over many circuits
is one compiled program (`vmap` over the weights, `lax.map` over chunks of them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import SiteHooks

from ..capture import as_inputs
from ..interventions import Add, Record, Replace
from ..patching import Metric, _check_metric
from .graph import ComponentGraph, component_graph


class SenderOutputs(eqx.Module):
    """What each sender wrote on one input: the embedding, every head's `head_out` (before
    the post-attention norm), every MLP's `mlp_out_normed`."""

    input: Float[Array, "batch seq embed"]
    heads: Float[Array, "layers batch seq heads embed"]
    mlps: Float[Array, "layers batch seq embed"]

    def mean(self) -> SenderOutputs:
        """The mean over the batch, kept as a batch of 1 (mean ablation)."""
        return SenderOutputs(self.input.mean(0, keepdims=True),
                             self.heads.mean(1, keepdims=True), self.mlps.mean(1, keepdims=True))


class ScalarMetric(eqx.Module):
    """A metric reduced to one number: `fn(logits) -> []` on the logits at `positions`
    (indices into seq; None: every position)."""

    fn: Callable[[Array], Array] = eqx.field(static=True)
    positions: tuple[int, ...] | None = eqx.field(static=True)
    data: Any = None

    def __call__(self, logits: Array) -> Array:
        return self.fn(logits, self.data)


def _metric_mean(logits: Array, metric: Metric) -> Array:
    return metric(logits).mean()


@dataclass(frozen=True)
class _OnLogits:
    """A user's `fn(logits) -> []` as a ScalarMetric's `fn`: equal for the same function, so
    a compiled program is reused across calls."""

    fn: Callable[[Array], Array]

    def __call__(self, logits: Array, data: Any) -> Array:
        return self.fn(logits)


def _nothing(logits: Array) -> Array:
    return jnp.zeros((), logits.dtype)


def as_scalar_metric(model: Transformer, metric: Any, tokens: Int[Array, "batch seq"]
                     ) -> ScalarMetric:
    """A `patching.Metric` (its rows averaged) or a function of the full logits
    `[batch, seq, vocab] -> []`, checked to give one number before any work."""
    if isinstance(metric, ScalarMetric):
        scalar = metric
    elif isinstance(metric, Metric):
        _check_metric(model, metric, tokens.shape[1])
        scalar = ScalarMetric(_metric_mean, metric.positions, metric)
    elif callable(metric):
        scalar = ScalarMetric(_OnLogits(metric), None)
    else:
        raise TypeError(f"metric must be an interp.patching.Metric or a function of the logits; "
                        f"got {type(metric).__name__}")
    k = tokens.shape[1] if scalar.positions is None else len(scalar.positions)
    logits = jax.ShapeDtypeStruct((tokens.shape[0], k, model.config.vocab_size), jnp.float32)
    try:
        shape = jax.eval_shape(scalar, logits).shape
    except Exception as e:  # noqa: BLE001 - the user's function: say where it failed
        raise ValueError(f"the metric fails on logits of shape {logits.shape}: "
                         f"{type(e).__name__}: {e}") from e
    if shape != ():
        raise ValueError(f"the metric must return one number (a scalar); on logits of shape "
                         f"{logits.shape} it returns shape {shape}")
    return scalar


def _ids(graph: ComponentGraph):
    """Index helpers of the graph's fixed layout (see `component_graph`)."""
    H, KV = graph.num_heads, graph.num_kv_heads  # noqa: N806
    per = H + 2 * KV + 1

    def heads(layer: int) -> np.ndarray:
        return 1 + layer * (H + 1) + np.arange(H)

    def mlp(layer: int) -> int:
        return 1 + layer * (H + 1) + H

    def receivers(layer: int, kind: str) -> np.ndarray:
        base = layer * per
        return {"q": base + np.arange(H), "k": base + H + np.arange(KV),
                "v": base + H + KV + np.arange(KV), "mlp": np.asarray([base + per - 1]),
                "logits": np.asarray([graph.num_layers * per])}[kind]

    return heads, mlp, receivers


class Probe(eqx.Module):
    """Handles on a `_forward` for gradients (AtP*): `pattern [layers, batch, heads, query,
    key]` is added to every layer's attention weights (zeros: the gradient with respect to it
    is the gradient with respect to the pattern); `keep [senders]` scales the gradient that
    flows back through each sender's output (0: stopped, as GradDrop drops a layer; the
    forward value is unchanged)."""

    pattern: Float[Array, "layers batch heads query key"]
    keep: Float[Array, " senders"]


def _scale_gradient(x: Array, keep: Array) -> Array:
    """`x` forward; its gradient scaled by `keep` backward."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + keep.astype(x.dtype) * (x - frozen)


def _forward(model: Transformer, tokens: Array, padding_mask: Array, weights: Array,
             patch: SenderOutputs, delta: bool, metric: ScalarMetric,
             embedding: Array | None = None, probe: Probe | None = None
             ) -> tuple[Array, SenderOutputs]:
    """The metric of one circuit (`weights [edges]`) and what its senders output.

    `delta=False`: an edge's mix is `patch + w * (out - patch)`; `delta=True`: `patch` holds
    per-sender differences and the mix is `out + (w - 1) * patch` (integrated gradients over
    inputs: the gradient times a fixed difference). `embedding` replaces the input's
    embedding (an interpolation between two inputs). `probe`: see `Probe`."""
    graph = component_graph(model)
    heads_of, mlp_of, receivers_of = _ids(graph)
    dtype = model.activation_dtype
    s_idx, r_idx = np.asarray(graph.edges).T
    w = jnp.zeros((len(graph.senders), len(graph.receivers)), weights.dtype)
    w = w.at[s_idx, r_idx].set(weights)
    positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)

    def mix(out: Array, base: Array, weight: Array) -> Array:
        """Each receiver's mix of a stack of senders, summed over the stack: outputs `out`
        and `base` `[m, ...]`, `weight` `[m, n]` -> `[n, ...]`."""
        weight = weight.astype(out.dtype)
        if delta:
            return out.sum(0)[None] + jnp.einsum("mn,m...->n...", weight - 1, base)
        return base.sum(0)[None] + jnp.einsum("mn,m...->n...", weight, out - base)

    layers = len(model.blocks)
    heads_ids = np.stack([heads_of(la) for la in range(layers)])       # [layers, heads]
    mlp_ids = np.asarray([mlp_of(la) for la in range(layers)])
    post_norm = model.blocks[0].post_attention_norm
    # Every layer's post-attention norm stacked (one module of [layers, ...] leaves), so a
    # receiver's per-layer norms run as one vmapped call, not one call per earlier layer.
    post_norms = None if post_norm is None else jax.tree.map(
        lambda *leaves: jnp.stack(leaves), *(b.post_attention_norm for b in model.blocks))
    b_o = None if model.blocks[0].attn.b_o is None else jnp.stack(
        [b.attn.b_o for b in model.blocks])
    outputs_in = (model.embed(tokens, positions, padding_mask, {}) if embedding is None
                  else embedding)
    head_outs: list[Array] = []
    mlp_outs: list[Array] = []
    base_heads = jnp.broadcast_to(patch.heads, (layers, *outputs_in.shape[:2],
                                                *patch.heads.shape[3:]))

    def stream(receivers: np.ndarray, attention_layers: int, mlp_layers: int) -> Array:
        """The input `[n, b, s, d]` of each receiver of `receivers`."""
        weight = w[:, receivers]
        x = mix(outputs_in[None], patch.input[None], weight[:1])
        if attention_layers:
            a = attention_layers
            # [n, layers, b, s, d]: each receiver's sum over each earlier layer's heads.
            cur = jnp.stack(head_outs[:a])
            base = base_heads[:a]
            hw = weight[heads_ids[:a]].astype(cur.dtype)                  # [a, heads, n]
            # Without a post-norm the layers' sums add up: summed in the einsum. (Summing an
            # einsum's [n, layers, ...] output instead was miscompiled by XLA CPU (jax 0.10.2):
            # one receiver group's inputs came out wrong under jit, right eagerly.)
            out = "nlbsd" if post_norms is not None else "nbsd"
            if delta:
                summed = cur.sum((0, 3)) if out == "nbsd" else cur.sum(3)
                summed = summed[None] + jnp.einsum(f"lhn,lbshd->{out}", hw - 1, base)
            else:
                summed = base.sum((0, 3)) if out == "nbsd" else base.sum(3)
                summed = summed[None] + jnp.einsum(f"lhn,lbshd->{out}", hw, cur - base)
            if b_o is not None:
                bias = b_o[:a, None, None].astype(summed.dtype)
                summed = summed + (bias.sum(0) if out == "nbsd" else bias)
            if post_norms is not None:
                norms = jax.tree.map(lambda leaf: leaf[:a], post_norms)
                summed = jax.vmap(lambda norm, z: norm(z), in_axes=(0, 1), out_axes=1)(
                    norms, summed).sum(1)
            x = x + summed
        if mlp_layers:
            x = x + mix(jnp.stack(mlp_outs[:mlp_layers]), patch.mlps[:mlp_layers],
                        weight[mlp_ids[:mlp_layers]])
        return x.astype(dtype)

    for layer, block in enumerate(model.blocks):
        attn = block.attn
        q_in = block.pre_attention_norm(stream(receivers_of(layer, "q"), layer, layer))
        k_in = block.pre_attention_norm(stream(receivers_of(layer, "k"), layer, layer))
        v_in = block.pre_attention_norm(stream(receivers_of(layer, "v"), layer, layer))
        queries = jnp.einsum("nbsd,ndh->bsnh", q_in, attn.w_q.astype(dtype))
        keys = jnp.einsum("kbsd,kdh->bskh", k_in, attn.w_k.astype(dtype))
        values = jnp.einsum("kbsd,kdh->bskh", v_in, attn.w_v.astype(dtype))
        if attn.b_q is not None:
            queries = queries + attn.b_q.astype(dtype)
            keys, values = keys + attn.b_k.astype(dtype), values + attn.b_v.astype(dtype)
        if attn.query_norm is not None:
            queries, keys = attn.query_norm(queries), attn.key_norm(keys)
        probes = () if probe is None else (Add("pattern", value=probe.pattern[layer]),)
        hooks = SiteHooks((Replace("q", value=attn.rope(queries, positions)),
                           Replace("k", value=attn.rope(keys, positions)),
                           Replace("v", value=values), *probes, Record("head_out")))
        records: dict[str, Any] = {}
        # The projections of this first argument are replaced above (and never computed).
        attn(q_in[0], positions, padding_mask, hooks=hooks, records=records, layer=layer)
        head_out = records[f"blocks.{layer}.head_out"].astype(dtype)
        if probe is not None:
            head_out = _scale_gradient(head_out, probe.keep[heads_of(layer)][:, None])
        head_outs.append(head_out)
        attention_layers = layer if block.parallel else layer + 1
        mlp_in = stream(receivers_of(layer, "mlp"), attention_layers, layer)[0]
        update = block.mlp(block.pre_ffw_norm(mlp_in))
        if block.post_ffw_norm is not None:
            update = block.post_ffw_norm(update)
        if probe is not None:
            update = _scale_gradient(update, probe.keep[mlp_of(layer)])
        mlp_outs.append(update.astype(dtype))

    final = stream(receivers_of(0, "logits"), len(model.blocks), len(model.blocks))[0]
    at = None if metric.positions is None else jnp.broadcast_to(
        jnp.asarray(metric.positions, jnp.int32), (tokens.shape[0], len(metric.positions)))
    logits = model.readout(final, positions, padding_mask, at, {})
    outputs = SenderOutputs(outputs_in, jnp.stack(head_outs), jnp.stack(mlp_outs))
    return metric(logits.astype(jnp.float32)), outputs


def _plain_outputs(model, tokens, padding_mask, metric):
    zeros = SenderOutputs(
        jnp.zeros((1, 1, 1), model.activation_dtype),
        jnp.zeros((model.config.num_layers, 1, 1, 1, 1), model.activation_dtype),
        jnp.zeros((model.config.num_layers, 1, 1, 1), model.activation_dtype))
    weights = jnp.ones(component_graph(model).num_edges, jnp.float32)
    return _forward(model, tokens, padding_mask, weights, zeros, False, metric)


_plain = eqx.filter_jit(_plain_outputs)


def sender_outputs(model: Transformer, tokens: Any, *, metric: Any = None,
                   padding_mask: Bool[Array, "batch seq"] | None = None
                   ) -> tuple[Array | None, SenderOutputs]:
    """Every sender's output on `tokens` (the unpatched model) and `metric` there (None
    without a metric)."""
    tokens, padding_mask = as_inputs(model, tokens, padding_mask)
    scalar = as_scalar_metric(model, _nothing if metric is None else metric, tokens)
    value, outputs = _plain(model, tokens, padding_mask, scalar)
    return (None if metric is None else value), outputs


def _broadcast(patch: SenderOutputs, batch: int) -> SenderOutputs:
    """A batch-1 patch (a mean) broadcast to the input's batch."""
    return SenderOutputs(jnp.broadcast_to(patch.input, (batch, *patch.input.shape[1:])),
                         jnp.broadcast_to(patch.heads, (patch.heads.shape[0], batch,
                                                        *patch.heads.shape[2:])),
                         jnp.broadcast_to(patch.mlps, (patch.mlps.shape[0], batch,
                                                       *patch.mlps.shape[2:])))


def _chunk_metrics(model, tokens, padding_mask, weights, patch, delta, metric):
    one = lambda w: _forward(model, tokens, padding_mask, w, patch, delta, metric)[0]  # noqa: E731
    return jax.vmap(one)(weights)


_chunk_metrics_jit = eqx.filter_jit(_chunk_metrics)


def _circuit_metrics(model, tokens, padding_mask, weights, patch, delta, metric, chunk):
    """Chunks of `chunk` circuits, each through one compiled program of that size: any number
    of circuits (any call) reuses it."""
    c = weights.shape[0]
    padded = -(-c // chunk) * chunk
    weights = jnp.concatenate([weights, jnp.ones((padded - c, weights.shape[1]), weights.dtype)])
    values = [_chunk_metrics_jit(model, tokens, padding_mask, weights[i:i + chunk], patch,
                                 delta, metric) for i in range(0, padded, chunk)]
    return np.concatenate([np.asarray(v) for v in values])[:c]


def check_pair(model: Transformer, clean: Any, corrupted: Any, padding_mask: Any = None
               ) -> tuple[Array, Array, Array]:
    """Clean and corrupted token ids of one shape, checked before any work."""
    clean, padding_mask = as_inputs(model, clean, padding_mask)
    corrupted, _ = as_inputs(model, corrupted, None)
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean and corrupted inputs must have the same shape (the same "
                         f"number of sequences and tokens); got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}")
    return clean, corrupted, padding_mask


def patch_outputs(model: Transformer, corrupted: Any, clean: Array, how: str = "corrupted",
                  padding_mask: Any = None, metric: Any = None) -> SenderOutputs:
    """What a patched edge carries: the senders' outputs on `corrupted`, or their mean over it
    (`how="mean"`, broadcast to `clean`'s batch). `metric`: the caller's, so that this run
    shares the compiled program of its other plain runs."""
    if how not in ("corrupted", "mean"):
        raise ValueError(f"how must be 'corrupted' or 'mean'; got {how!r}")
    _, outputs = sender_outputs(model, corrupted, metric=metric, padding_mask=padding_mask)
    if how == "mean":
        outputs = _broadcast(outputs.mean(), clean.shape[0])
    return outputs


def circuit_metrics(
    model: Transformer,
    clean: Any,
    corrupted: Any,
    metric: Any,
    weights: Float[np.ndarray, "circuits edges"] | Float[Array, "circuits edges"],
    *,
    how: str = "corrupted",
    padding_mask: Bool[Array, "batch seq"] | None = None,
    chunk: int = 8,
) -> Float[np.ndarray, " circuits"]:
    """`metric` of each circuit (a row of `weights`: 1 on its edges, 0 elsewhere, or any value
    between) run on `clean`, every edge outside it carrying the `corrupted` run's sender
    output (`how="mean"`: the mean over `corrupted`). One compiled program; `chunk` circuits
    at a time share each matmul; every call with as many circuits or more reuses it."""
    clean, corrupted, padding_mask = check_pair(model, clean, corrupted, padding_mask)
    graph = component_graph(model)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim != 2 or weights.shape[1] != graph.num_edges:
        raise ValueError(f"weights must have shape [circuits, {graph.num_edges}] (one value per "
                         f"edge of {graph}); got {tuple(weights.shape)}")
    scalar = as_scalar_metric(model, metric, clean)
    patch = patch_outputs(model, corrupted, clean, how, padding_mask, scalar)
    return _circuit_metrics(model, clean, padding_mask, weights, patch, False, scalar,
                            max(1, min(chunk, len(weights))))


__all__ = ["Probe", "ScalarMetric", "SenderOutputs", "as_scalar_metric", "check_pair",
           "circuit_metrics", "patch_outputs", "sender_outputs"]
