"""Activation patching, path patching, direct logit attribution and the logit lens.

Sweeps run many patches per compiled call. Activation patching uses `interp.staged`: a patch
at layer `l` runs only layers `l..` (the layers below are shared with the unpatched run) and
many patches share each matmul. Path patching runs chunks of `chunk` patches as one batch in
which row `c * n + i` is input row `i` under patch `c`, each layer carrying a `Replace` whose
per-unit weights pick that row's patch. Either way the structure never changes between
chunks, so a sweep compiles once however many patches it has (`sweep_compilations()`).

Conventions: the *target* run is the one patched, the *source* run gives the values. Patching
clean activations into a corrupted run (target = corrupted, source = clean) measures what
restores the behaviour; swapping them measures what breaks it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.core.checks import check_head_pairs, check_index, check_indices, check_token_ids
from gemma_eqx.core.multihost import to_host
from gemma_eqx.model.base import Module
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import (
    Intervention,
    SiteContext,
    check_site_array,
    site_key,
    site_spec,
    unit_weights,
)

from . import staged
from .capture import ActivationCache, as_inputs, capture
from .install import add_interventions, select_layers
from .interventions import Layers, Record, Replace, TokenIds, Units
from .staged import _tile, scored_forward, staged_scores

Head = tuple[int, int]
Ints = Sequence[int] | Int[np.ndarray, " k"] | Int[Array, " k"]  # token ids or positions


# --------------------------------------------------------------------------------- metrics


class Metric(Module):
    """A number per batch row computed from the logits at `positions` (indices into seq):
    `fn(logits [batch, len(positions), vocab], data) -> [batch]`. Only those positions are
    projected onto the vocabulary (most of a small model's cost). `data` (token ids, a
    direction) is an array leaf: a metric with other targets reuses the compiled sweep;
    `fn` and `positions` are part of the program."""

    positions: tuple[int, ...] = eqx.field(static=True)
    fn: Callable[[Array, Any], Array] = eqx.field(static=True)
    data: Any = None
    name: str = eqx.field(static=True, default="metric")
    # Optional: the same number from the final norm's output, `(model, normed [batch, k,
    # embed], data) -> [batch]`, without the full logits (see `Transformer.target_logprobs`).
    stream_fn: Callable[[Transformer, Array, Any], Array] | None = eqx.field(
        static=True, default=None)
    # Whether `data`'s arrays are token ids (checked against the model's vocabulary).
    data_are_token_ids: bool = eqx.field(static=True, default=False)

    def __call__(self, logits: Float[Array, "batch k vocab"]) -> Float[Array, " batch"]:
        return self.fn(logits, self.data)

    @property
    def can_stream(self) -> bool:
        return self.stream_fn is not None

    def stream_score(self, model: Transformer, normed: Float[Array, "batch k embed"]) -> Array:
        return self.stream_fn(model, normed, self.data)


def _mean_logprob(logits: Array, ids: Array) -> Array:
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, ids[None, :, None], axis=-1)[..., 0].mean(axis=-1)


def _mean_logprob_streamed(model: Transformer, normed: Array, ids: Array) -> Array:
    targets = jnp.broadcast_to(ids, normed.shape[:2])
    return model.target_logprobs(normed, targets, argmax=False)[0].mean(axis=-1)


def _logit_difference(logits: Array, ids: tuple[Array, Array]) -> Array:
    logits = logits.astype(jnp.float32)
    take = lambda i: jnp.take_along_axis(logits, i[None, :, None], axis=-1)[..., 0]  # noqa: E731
    return (take(ids[0]) - take(ids[1])).mean(axis=-1)


def _token_ids(values: Ints, what: str) -> tuple[int, ...]:
    """Target token ids: integers (the one index rule), never negative; the vocabulary bound is
    checked when the metric meets a model."""
    ids = check_indices(values, None, what, distinct=False)
    for i in ids:
        if i < 0:
            raise ValueError(f"{what} {i} is negative; token ids are 0 .. vocab - 1")
    return ids


def mean_logprob(targets: Ints, positions: Ints) -> Metric:
    """Mean over `positions` of the log-probability of `targets` (one token id per position:
    the token the logits at that position should predict)."""
    targets = _token_ids(targets, "target token id")
    positions = check_indices(positions, None, "metric position", distinct=False)
    if len(targets) != len(positions) or not positions:
        raise ValueError(f"mean_logprob needs one target per position; got {len(targets)} "
                         f"targets for {len(positions)} positions")
    return Metric(positions, _mean_logprob, jnp.asarray(targets, jnp.int32),
                  "mean log-prob of the target tokens", _mean_logprob_streamed, True)


def logit_difference(correct: Ints, wrong: Ints, positions: Ints) -> Metric:
    """Mean over `positions` of `logit[correct] - logit[wrong]` (one id of each per position)."""
    correct = _token_ids(correct, "correct token id")
    wrong = _token_ids(wrong, "wrong token id")
    positions = check_indices(positions, None, "metric position", distinct=False)
    if not len(correct) == len(wrong) == len(positions) or not positions:
        raise ValueError(f"logit_difference needs one correct and one wrong id per position; "
                         f"got {len(correct)} correct and {len(wrong)} wrong ids for "
                         f"{len(positions)} positions")
    return Metric(positions, _logit_difference,
                  (jnp.asarray(correct, jnp.int32), jnp.asarray(wrong, jnp.int32)),
                  "logit difference", data_are_token_ids=True)


def _positions(positions: Ints, seq: int, what: str = "position") -> Int[Array, " k"]:
    out = []
    for p in positions:
        out.append(check_index(p, seq, what) % seq)
    if not out:
        raise ValueError("no positions given")
    return jnp.asarray(out)


def _check_metric(model: Transformer, metric: Metric, seq: int) -> Int[Array, " k"]:
    """The metric's positions inside `seq`, its token ids inside the model's vocabulary."""
    if not isinstance(metric, Metric):
        raise TypeError(f"metric must be an interp.patching.Metric (see mean_logprob); got "
                        f"{type(metric).__name__}")
    if metric.data_are_token_ids:
        for ids in jax.tree_util.tree_leaves(metric.data):
            check_token_ids(ids, model.config.vocab_size, f"{metric.name}: target token id")
    return _positions(metric.positions, seq, "metric position")


_metric_body = scored_forward


_metric_of = eqx.filter_jit(_metric_body)


def evaluate(
    model: Transformer,
    tokens: TokenIds,
    metric: Metric,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, " batch"]:
    """`metric` of the model (with its interventions) on `tokens`, one value per row."""
    tokens, padding_mask = as_inputs(model, tokens, padding_mask)
    positions = _check_metric(model, metric, tokens.shape[1])
    return _metric_of(model, tokens, padding_mask, positions, metric)[0]


# ----------------------------------------------------------------------- patching sweeps


@dataclass(frozen=True)
class PatchingResult:
    """A sweep's metric per patch. `values` has the axes named in `axes` (for example
    `("layer", "head")`), averaged over the input's rows; `target` and `source` are the metric
    unpatched and on the source input. `normalized` is `(values - target) / (source - target)`:
    0 = no effect, 1 = the patch alone restores the source's metric. `patches_run` counts the
    patches computed: a per-position sweep does not run those that cannot change the metric."""

    site: str
    axes: tuple[str, ...]
    values: np.ndarray
    target: float
    source: float
    compilations: int
    patches_run: int | None = None

    @property
    def normalized(self) -> np.ndarray:
        return (self.values - self.target) / (self.source - self.target)


_compilations: list[int] = [0]


def sweep_compilations() -> int:
    """How many programs the sweeps of this process have compiled (for tests and benchmarks)."""
    return _compilations[0] + staged.compilations()


def _count_compiles(fn):
    """Wraps a jitted function so that each trace (one per new structure or shape) counts."""

    def traced(*args):
        _compilations[0] += 1
        return fn(*args)

    return traced


# The sweeps' own program (counted apart from `evaluate`'s, which compiles per input shape).
_sweep_chunk = eqx.filter_jit(_count_compiles(_metric_body))


def _source_cache(model, source, site, layers, padding_mask):
    if isinstance(source, ActivationCache):
        source.check_model(model)
        return source
    _, cache = capture(model, source, sites=[site], layers=layers, padding_mask=padding_mask)
    return cache


def _units_count(model: Transformer, site: str) -> int | None:
    spec = site_spec(site)
    if spec.head_axis is None:
        return None
    return model.config.num_kv_heads if spec.axes[spec.head_axis] == "kv_heads" else (
        model.config.num_heads)


def activation_patching(
    model: Transformer,
    target: TokenIds,
    source: TokenIds | ActivationCache,
    site: str,
    metric: Metric,
    *,
    per: str = "layer",
    layers: Layers = None,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    chunk: int = 128,
) -> PatchingResult:
    """Patch `site` from `source` (tokens of the same shape, or a full `capture` of them) into
    the `target` run, one unit at a time, and measure `metric`.

    `per` names the units: `"layer"` (the whole site of one layer), `"layer_position"`
    (`values[layer, position]`), `"layer_head"` (head sites: all positions of one head) or
    `"layer_head_position"`. Up to `chunk` patches run in one program (`interp.staged`): a
    patch at layer `l` shares the unpatched layers below it with the others, and the sweep
    compiles once.
    """
    spec = site_spec(site)
    if not spec.per_layer:
        raise ValueError(f"site {site} is not on every layer; patch it with interp.patch")
    per_options = ("layer", "layer_position", "layer_head", "layer_head_position")
    if per not in per_options:
        raise ValueError(f"per must be one of {per_options}; got {per!r}")
    if "head" in per and spec.head_axis is None:
        raise ValueError(f"site {site} has no heads; use per='layer' or 'layer_position'")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1; got {chunk}")
    target, padding_mask = as_inputs(model, target, padding_mask)
    n, seq = target.shape
    positions = _check_metric(model, metric, seq)
    layer_idx = select_layers(model, layers)
    cache = _source_cache(model, source, site, layer_idx, padding_mask)
    if cache.input_shape != tuple(target.shape):
        raise ValueError(f"the source was recorded on inputs of shape {cache.input_shape}; the "
                         f"target has shape {tuple(target.shape)}")
    heads = _units_count(model, site)
    if heads is not None and spec.axes[spec.head_axis] == "latents":
        heads = cache[site, layer_idx[0]].shape[spec.head_axis]
    span = seq if spec.seq_axis is not None else 1
    axes: tuple[str, ...] = ("layer",)
    grid: list[tuple[int, ...]] = [(layer,) for layer in layer_idx]
    if per == "layer_position":
        axes, grid = ("layer", "position"), [(la, p) for la in layer_idx for p in range(span)]
    elif per == "layer_head":
        axes, grid = ("layer", "head"), [(la, h) for la in layer_idx for h in range(heads)]
    elif per == "layer_head_position":
        axes = ("layer", "head", "position")
        grid = [(la, h, p) for la in layer_idx for h in range(heads) for p in range(span)]

    values = {la: cache[site, la].astype(model.activation_dtype) for la in layer_idx}
    unit_shape = (n, seq) if heads is None else (n, seq, heads)
    units = to_host(grid)

    def patches(layer: int, groups: np.ndarray) -> tuple[Intervention, ...]:
        if layer not in values:
            return ()
        weight = np.zeros((len(groups), *unit_shape), np.float32)
        for g, v in enumerate(groups):
            if v < 0 or units[v, 0] != layer:
                continue
            if per == "layer":
                weight[g] = 1
            elif per == "layer_position":
                weight[g, :, units[v, 1]] = 1
            elif per == "layer_head":
                weight[g, :, :, units[v, 1]] = 1
            else:
                weight[g, :, units[v, 2], units[v, 1]] = 1
        return (_GroupReplace(site, values[layer],
                              jnp.asarray(weight.reshape(-1, *unit_shape[1:]))),)

    run = np.ones(len(units), bool)
    if per.endswith("position") and spec.seq_axis is not None:
        # A sweep over positions is mostly units that inputs agreeing up to some position
        # leave unchanged: one more forward finds them, and they are not run.
        run = ~_without_effect(model, target, padding_mask, site, values, units,
                               "head" in per, positions)
        run[np.argmax(run) if run.any() else 0] = True  # the base score comes from the sweep
    before = sweep_compilations()
    target_scores, scores = staged_scores(model, target, padding_mask, units[run, 0],
                                          lambda layer, groups: patches(
                                              layer, np.where(groups < 0, -1,
                                                              np.flatnonzero(run)[groups])),
                                          positions, metric, chunk=chunk)
    compiles = sweep_compilations() - before
    every = np.broadcast_to(to_host(target_scores), (len(units), n)).copy()
    every[run] = to_host(scores)
    out = every.astype(np.float64).mean(axis=1)
    shape = [len(layer_idx)] + [heads if a == "head" else span for a in axes[1:]]
    target_value = float(np.mean(to_host(target_scores, np.float64)))
    source_value = _source_metric(model, source, cache, metric, padding_mask, target)
    return PatchingResult(site, axes, out.reshape(shape), target_value, source_value, compiles,
                          int(run.sum()))


def _without_effect(model, target, padding_mask, site, values, units, by_head,
                    positions) -> np.ndarray:
    """Units at one position (`units` rows: layer, [head,] position) whose patch cannot change
    the metric: the patched value equals the target run's own (inputs that agree up to a
    position agree there on every layer), or the position comes after every position the
    metric reads (attention is causal). Their score is the target's."""
    spec = site_spec(site)
    later = units[:, -1] > int(np.max(to_host(positions)))
    _, own = capture(model, target, sites=[site], layers=sorted(values),
                     padding_mask=padding_mask)
    keep = [spec.seq_axis] + ([spec.head_axis] if by_head else [])
    same = {}
    for layer, value in values.items():
        equal = to_host(value == own[site, layer].astype(value.dtype))
        equal = equal.all(axis=tuple(a for a in range(equal.ndim) if a not in keep))
        same[layer] = equal.T if by_head and spec.head_axis < spec.seq_axis else equal
    # same[layer]: [seq] or [seq, heads]
    unchanged = to_host([same[u[0]][u[2], u[1]] if by_head else same[u[0]][u[1]]
                            for u in units])
    return later | unchanged


class _GroupReplace(Intervention):
    """`Replace` for a staged sweep: the batch is row groups of the input's `n` rows, `value`
    is the input's (`[n, ...]`, the same for every group) and `weight` picks units per row."""

    value: Array
    weight: Units

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        spec = site_spec(self.site)
        n = self.value.shape[0]
        check_site_array(self.value, x[:n], spec, context.layer, "a patch")
        w = unit_weights(self.weight, x, spec)
        value = _tile(self.value.astype(x.dtype), x.shape[0] // n)
        return (1 - w) * x + w * value, None


def _source_metric(model, source, cache, metric, padding_mask, target) -> float:
    if isinstance(source, ActivationCache):
        # The source's own metric needs its logits: recorded when the cache holds them.
        if "logits" in source and source["logits"].shape[1] == target.shape[1]:
            logits = source["logits"][:, _check_metric(model, metric, target.shape[1])]
            return float(np.mean(to_host(metric(logits))))
        return float("nan")
    return float(np.mean(to_host(evaluate(model, source, metric, padding_mask=padding_mask))))


# -------------------------------------------------------------------------- path patching


def path_patching(
    model: Transformer,
    target: TokenIds,
    source: TokenIds,
    receivers: Sequence[Head],
    via: str,
    metric: Metric,
    *,
    senders: Sequence[Head] | None = None,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    chunk: int = 8,
) -> PatchingResult:
    """The effect of each sender head on `metric` through the `receivers`' query, key or value
    input only (`via` = "q", "k" or "v"), as in Wang et al. (2022):

    1. run the target input with the sender's output (`head_out`) taken from the source run
       and every other head's output frozen to the target run; record the receivers' `via`
       input (per query head: `q`, `k_per_head`, `v_per_head`);
    2. run the target input with only those receiver inputs replaced; measure `metric`.

    MLPs are recomputed in step 1 (their paths count). `senders` defaults to every head below
    the last receiver's layer; `values[layer, head]` is NaN for heads not swept.
    """
    site = {"q": "q", "k": "k_per_head", "v": "v_per_head"}.get(via)
    if site is None:
        raise ValueError(f"via must be 'q', 'k' or 'v'; got {via!r}")
    target, padding_mask = as_inputs(model, target, padding_mask)
    source, _ = as_inputs(model, source, None)
    if source.shape != target.shape:
        raise ValueError(f"source shape {tuple(source.shape)} differs from the target's "
                         f"{tuple(target.shape)}")
    L, H = len(model.blocks), model.config.num_heads  # noqa: N806
    receivers = head_grid(model, receivers, "receiver")
    if not receivers:
        raise ValueError("path_patching needs at least one receiver head")
    top = max(la for la, _ in receivers)
    if top == 0:
        raise ValueError(f"path_patching: every receiver ({', '.join(map(str, receivers))}) is "
                         f"in layer 0, where no head can send to it; choose receivers in a "
                         f"later layer")
    if senders is None:
        senders = [(la, h) for la in range(top) for h in range(H)]
    senders = head_grid(model, senders, "sender")
    if not senders:
        raise ValueError("path_patching needs at least one sender head")
    late = [s for s in senders if s[0] >= top]
    if late:
        raise ValueError(f"path_patching: sender {late[0]} is not below any receiver's layer "
                         f"(the last receiver is in layer {top}); a head sends only to later "
                         f"layers")
    n, seq = target.shape
    positions = _check_metric(model, metric, seq)
    _, clean = capture(model, target, sites=["head_out"], padding_mask=padding_mask)
    _, other = capture(model, source, sites=["head_out"], padding_mask=padding_mask)
    rows = chunk * n
    tokens, mask = _tile(target, chunk), _tile(padding_mask, chunk)
    frozen = {la: _tile(clean["head_out", la], chunk) for la in range(L)}
    changed = {la: _tile(other["head_out", la], chunk) for la in range(L)}
    receiver_layers = sorted({la for la, _ in receivers})
    receiver_heads = {la: [h for l2, h in receivers if l2 == la] for la in receiver_layers}
    out = np.full((L, H), np.nan)
    before = _compilations[0]
    for start in range(0, len(senders), chunk):
        part = senders[start:start + chunk]
        pick = {la: np.zeros((rows, seq, H), np.float32) for la in range(L)}
        for c, (la, h) in enumerate(part):
            pick[la][c * n:(c + 1) * n, :, h] = 1
        # Step 1: every head frozen to the target run except the sender (from the source).
        step1 = {la: [Replace("head_out", value=frozen[la] + jnp.asarray(pick[la])[..., None]
                              * (changed[la] - frozen[la]))] for la in range(L)}
        for la in receiver_layers:
            step1[la].append(Record(site))
        _, records = _sweep_chunk(add_interventions(model, step1), tokens, mask, positions,
                                  metric)
        # Step 2: only the receivers' chosen input comes from step 1.
        step2 = {}
        for la in receiver_layers:
            w = np.zeros((rows, seq, H), np.float32)
            w[:, :, receiver_heads[la]] = 1
            step2[la] = Replace(site, value=records[site_key(site, la)].astype(
                model.activation_dtype), weight=jnp.asarray(w))
        scores, _ = _sweep_chunk(add_interventions(model, step2), tokens, mask, positions,
                                 metric)
        scores = to_host(scores, np.float64).reshape(chunk, n).mean(axis=1)
        for c, (la, h) in enumerate(part):
            out[la, h] = scores[c]
    compiles = _compilations[0] - before
    target_value = float(np.mean(to_host(evaluate(model, target, metric,
                                                     padding_mask=padding_mask))))
    source_value = float(np.mean(to_host(evaluate(model, source, metric))))
    return PatchingResult(f"path via {via}", ("layer", "head"), out, target_value, source_value,
                          compiles)


# ------------------------------------------------------------------- direct logit attribution


@dataclass(frozen=True)
class LogitAttribution:
    """Direct logit attribution of `logit` (the pre-soft-cap logit of the target token at each
    position, `[batch, k]`) to the embedding, each layer's attention and MLP update, and each
    head (`heads[layer, head]`).

    The final norm's statistics are frozen at their value on this input (its input's RMS, or
    mean and variance for a LayerNorm, per position), which makes the map from residual
    stream to logits linear (a LayerNorm centres each part; its bias is `norm_bias`);
    likewise the post-attention norm of Gemma 2 and 3 is frozen per position so heads add up
    to their layer's update. Then exactly (to float rounding):
    `embed + attn.sum(0) + mlp.sum(0) + norm_bias == logit` and
    `heads.sum(1) + attn_bias == attn` (`attn_bias`: the output projection's bias, GPT-2 and
    NeoX; zero elsewhere). With a final soft-cap (Gemma 2) the model's logit is
    `cap * tanh(logit / cap)`."""

    embed: np.ndarray  # [batch, k]
    attn: np.ndarray  # [layers, batch, k]
    mlp: np.ndarray  # [layers, batch, k]
    heads: np.ndarray  # [layers, heads, batch, k]
    logit: np.ndarray  # [batch, k]
    attn_bias: np.ndarray | None = None  # [layers, batch, k]
    norm_bias: np.ndarray | None = None  # [batch, k]


@eqx.filter_jit
def _dla(model, tokens, padding_mask, positions, targets):
    sites = ("resid_pre", "resid_mid", "resid_post", "attn_out", "head_out")
    recorded = add_interventions(model, {i: [Record(s) for s in sites]
                                         for i in range(len(model.blocks))})
    recorded = add_interventions(recorded, {None: [Record("embed"), Record("final_norm_in")]})
    records = recorded.forward(tokens, padding_mask=padding_mask, check_ids=False).records
    at = lambda a: jnp.take(a, positions, axis=1)  # noqa: E731
    unembed = jnp.take(model.embedder.output_table, targets, axis=0)
    unembed = unembed.astype(jnp.float32)  # [b k d]
    total = at(records["final_norm_in"])

    def direct(x):  # x [b, k, d] -> [b, k]; or [b, k, heads, d] -> [b, k, heads]
        frozen = total if x.ndim == 3 else total[:, :, None]
        weights = unembed if x.ndim == 3 else unembed[:, :, None]
        return jnp.sum(model.final_norm.linear(x, frozen) * weights, axis=-1)

    embed = direct(at(records["embed"]))
    attn, mlp, heads, attn_bias = [], [], [], []
    for i, block in enumerate(model.blocks):
        key = lambda s, i=i: records[site_key(s, i)]  # noqa: E731
        attn.append(direct(at(key("resid_mid") - key("resid_pre"))))
        mlp.append(direct(at(key("resid_post") - key("resid_mid"))))
        head_out = at(key("head_out")).astype(jnp.float32)  # [b k heads d]
        bias = jnp.zeros_like(total) if block.attn.b_o is None else jnp.broadcast_to(
            block.attn.b_o.astype(jnp.float32), total.shape)
        if block.post_attention_norm is not None:
            factor = block.post_attention_norm.factor(at(key("attn_out")))
            head_out, bias = head_out * factor[:, :, None], bias * factor
        heads.append(jnp.moveaxis(direct(head_out), -1, 0))
        attn_bias.append(direct(bias))
    constant = jnp.broadcast_to(jnp.asarray(model.final_norm.constant(), jnp.float32),
                                total.shape[-1:])
    norm_bias = jnp.sum(constant * unembed, axis=-1)
    logit = direct(total) + norm_bias
    return (embed, jnp.stack(attn), jnp.stack(mlp), jnp.stack(heads), logit,
            jnp.stack(attn_bias), norm_bias)


def _readout_inputs(model, tokens, targets, positions, padding_mask):
    """Checked tokens, mask, positions and `[batch, positions]` targets for a read-out."""
    tokens, padding_mask = as_inputs(model, tokens, padding_mask)
    pos = _positions(positions, tokens.shape[1])
    targets = targets if hasattr(targets, "shape") else np.asarray(targets)
    if targets.shape != (tokens.shape[0], len(positions)):
        raise ValueError(f"targets must have shape [batch, positions] = "
                         f"{(tokens.shape[0], len(positions))}; got {tuple(targets.shape)}")
    check_token_ids(targets, model.config.vocab_size, "target token id")
    return tokens, padding_mask, pos, jnp.asarray(targets)


def direct_logit_attribution(
    model: Transformer,
    tokens: TokenIds,
    targets: Int[Array | np.ndarray, "batch k"],
    positions: Ints,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> LogitAttribution:
    """How much each component writes directly onto the logit of `targets[:, j]` at position
    `positions[j]` (see `LogitAttribution` for how the norms are handled)."""
    tokens, padding_mask, pos, targets = _readout_inputs(model, tokens, targets, positions,
                                                         padding_mask)
    parts = _dla(model, tokens, padding_mask, pos, targets)
    embed, attn, mlp, heads, logit, attn_bias, norm_bias = (to_host(p, np.float64)
                                                            for p in parts)
    return LogitAttribution(embed, attn, mlp, heads, logit, attn_bias, norm_bias)


# ------------------------------------------------------------------------------ logit lens


@eqx.filter_jit
def _lens(model, tokens, padding_mask, positions, targets):
    recorded = add_interventions(
        model, {i: Record("resid_post") for i in range(len(model.blocks))})
    recorded = add_interventions(recorded, {None: Record("embed")})
    records = recorded.forward(tokens, padding_mask=padding_mask, check_ids=False).records
    streams = [records["embed"]] + [records[site_key("resid_post", i)]
                                    for i in range(len(model.blocks))]
    out_lp, out_top = [], []
    for x in streams:
        x = jnp.take(x, positions, axis=1).astype(model.activation_dtype)
        logits = model.embedder.decode(model.final_norm(x))
        if model.config.final_logit_softcap is not None:
            cap = model.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        out_lp.append(jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0])
        out_top.append(jnp.argmax(lp, axis=-1))
    return jnp.stack(out_lp), jnp.stack(out_top)


@dataclass(frozen=True)
class LogitLens:
    """The residual stream read out early: after the embedding (row 0) and after each block
    (row `i + 1`), the final norm and unembedding applied as if the model ended there.
    `logprobs[row, batch, j]` is the log-prob of `targets[batch, j]` at `positions[j]`;
    `top[row, batch, j]` the most likely token. The last row is the model's own output."""

    logprobs: np.ndarray
    top: np.ndarray


def logit_lens(
    model: Transformer,
    tokens: TokenIds,
    targets: Int[Array | np.ndarray, "batch k"],
    positions: Ints,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> LogitLens:
    """The logit lens over the residual stream (see `LogitLens`)."""
    tokens, padding_mask, pos, targets = _readout_inputs(model, tokens, targets, positions,
                                                         padding_mask)
    lp, top = _lens(model, tokens, padding_mask, pos, targets)
    return LogitLens(to_host(lp, np.float64), to_host(top))


def head_grid(model: Transformer, heads: Sequence[Head], what: str = "head") -> list[Head]:
    """`(layer, head)` pairs checked against the model (`checks.check_head_pairs`)."""
    return check_head_pairs(heads, len(model.blocks), model.config.num_heads, what)


__all__ = [
    "LogitAttribution", "LogitLens", "Metric", "PatchingResult", "activation_patching",
    "direct_logit_attribution", "evaluate", "head_grid", "logit_difference", "logit_lens",
    "mean_logprob", "path_patching", "sweep_compilations",
]
