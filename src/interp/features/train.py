"""Training sparse dictionaries: SAELens 6's losses and training step, as one jitted function.

`TrainConfig` holds the hyperparameters (one field, `architecture`, picks ReLU + L1, JumpReLU,
TopK or BatchTopK); `init_state` makes the parameters, Adam's state and the dead-latent
counters; `train_step(state, x, target, config)` takes one step. Every term follows SAELens
6.54's `TrainingSAE` subclasses and `SAETrainer._train_step` (tests/test_train.py holds them
to its trainer to 1e-5):

- loss: squared error summed over the output and averaged over rows, plus
  - `relu`: `l1 * mean ||f * |W_dec rows| ||_p` (the sparsity weighted by decoder norm);
  - `jumprelu`: `l0 * mean sum step(pre - threshold)` ("step", DeepMind's L0) or
    `l0 * mean sum tanh(tanh_scale * f * |W_dec rows|)` ("tanh", Anthropic's), the threshold's
    gradient through a rectangle kernel of width `bandwidth` (straight-through), and
    optionally Anthropic's pre-activation loss on dead latents;
  - `topk` / `batchtopk`: AuxK, the top `d_in / 2` dead latents reconstructing the residual,
    scaled by `min(dead / (d_in / 2), 1)`; pre-activations rescaled by the decoder norms;
- then gradients clipped to global norm 1, Adam with the learning-rate schedule (linear
  warm-up, constant, linear decay to 0) and the sparsity coefficient warmed up
  linearly from 0;
- a latent is dead when it has not fired for more than `dead_feature_window` steps;
- JumpReLU's threshold is projected to >= 0 before each step; BatchTopK keeps a running
  threshold (an average of the smallest positive activation, `topk_threshold_lr`) for
  inference.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from .activations import CachedActivations, stream_activations, windows_digest
from .dictionary import SparseDictionary, activate

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk")
SPARSITY_LOSSES = ("step", "tanh")
NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a dictionary's training (SAELens' names where it has one)."""

    architecture: str = "topk"
    width: int = 4096
    k: int | float = 32  # topk: latents per row; batchtopk: per row on average over the batch
    l1_coefficient: float = 1.0  # relu
    lp_norm: float = 1.0  # relu
    l0_coefficient: float = 1.0  # jumprelu
    sparsity_warm_up_steps: int = 0  # relu and jumprelu: the coefficient rises from 0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.01
    jumprelu_sparsity_loss: str = "step"
    jumprelu_tanh_scale: float = 4.0
    jumprelu_ste_to_input: bool = False
    pre_act_loss_coefficient: float | None = None
    aux_coefficient: float = 1.0  # topk and batchtopk: AuxK
    rescale_acts_by_decoder_norm: bool = True  # topk and batchtopk
    topk_threshold_lr: float = 0.01  # batchtopk
    apply_b_dec_to_input: bool = False
    # "expected_average_only_in": inputs (and a transcoder's targets) scaled by one factor
    # each, estimated on the first buffer so that their mean norm is sqrt(d); folded into the
    # exported weights, so the dictionary reads and writes the site's own units.
    normalize_activations: str = "none"
    skip_connection: bool = False  # a skip-transcoder: + x @ w_skip, w_skip trained from 0
    decoder_init_norm: float | None = 0.1
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    total_steps: int = 1000
    dead_feature_window: int = 1000
    # Every N steps (0: never), latents dead by the window above are reset toward the rows
    # reconstructed worst (Anthropic's resampling; the usual remedy for ReLU + L1).
    resample_every: int = 0

    def __post_init__(self):
        def bad(field: str, why: str) -> None:
            raise ValueError(f"TrainConfig field '{field}' {why}; got "
                             f"{getattr(self, field)!r}")

        if self.architecture not in ARCHITECTURES:
            bad("architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            bad("normalize_activations", f"must be one of {', '.join(NORMALIZATIONS)}")
        if self.jumprelu_sparsity_loss not in SPARSITY_LOSSES:
            bad("jumprelu_sparsity_loss", f"must be one of {', '.join(SPARSITY_LOSSES)}")
        for field in ("width", "total_steps", "dead_feature_window"):
            if isinstance(getattr(self, field), bool) or not isinstance(
                    getattr(self, field), int) or getattr(self, field) < 1:
                bad(field, "must be a positive integer")
        for field in ("lr_warm_up_steps", "lr_decay_steps", "sparsity_warm_up_steps",
                      "resample_every"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
                bad(field, "must be a non-negative integer")
        if self.lr_warm_up_steps + self.lr_decay_steps > self.total_steps:
            bad("lr_decay_steps", f"and lr_warm_up_steps together must fit in total_steps "
                                  f"({self.total_steps})")
        for field in ("lr", "jumprelu_bandwidth", "max_grad_norm", "lp_norm"):
            if not np.isfinite(getattr(self, field)) or getattr(self, field) <= 0:
                bad(field, "must be a positive number")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.width:
            bad("k", f"must lie in (0, width={self.width}]")
        if self.architecture == "topk" and int(self.k) != self.k:
            bad("k", "must be a whole number of latents for topk")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class TrainParams(eqx.Module):
    """What the optimiser updates. `w_dec` rows are latents (SAELens' layout)."""

    w_enc: Float[Array, "d_in latents"]
    b_enc: Float[Array, " latents"]
    w_dec: Float[Array, "latents d_out"]
    b_dec: Float[Array, " d_out"]
    threshold: Float[Array, " latents"] | None  # jumprelu
    w_skip: Float[Array, "d_in d_out"] | None = None  # skip-transcoders


class TrainState(eqx.Module):
    """Parameters, Adam's state and the counters a step reads and advances."""

    params: TrainParams
    opt_state: Any
    step: Int[Array, ""]
    since_fired: Float[Array, " latents"]  # steps since each latent last fired
    fired: Float[Array, " latents"]  # rows on which each latent fired, in all
    topk_threshold: Float[Array, ""]  # batchtopk's inference threshold
    input_scale: Float[Array, ""]  # normalize_activations: x is trained on as x * input_scale
    target_scale: Float[Array, ""]  # and the target as target * target_scale


def learning_rate(config: TrainConfig, step: Int[Array, ""] | int) -> Array:
    """SAELens' "constant" schedule at `step` (0-based): `LinearLR` warm-up from lr /
    warm_up over `warm_up - 1` steps, constant, then a linear decay from lr to 0 over the last
    `lr_decay_steps` (SAELens' constant schedule decays from lr itself)."""
    step = jnp.asarray(step, jnp.float32)
    warm, decay, lr = config.lr_warm_up_steps, config.lr_decay_steps, config.lr
    rate = jnp.asarray(lr, jnp.float32)
    if warm > 1:
        start = 1 / warm
        rate = jnp.where(step < warm - 1, lr * (start + (1 - start) * step / (warm - 1)), rate)
    if decay:
        into = step - (config.total_steps - decay)
        rate = jnp.where(into >= 0, lr * (1 - into / decay), rate)
    return rate


def sparsity_coefficient(config: TrainConfig, step: Int[Array, ""] | int) -> Array:
    """The L1 / L0 coefficient at `step`: rising linearly from 0 over the warm-up."""
    final = config.l1_coefficient if config.architecture == "relu" else config.l0_coefficient
    warm = config.sparsity_warm_up_steps
    if not warm:
        return jnp.asarray(final, jnp.float32)
    return final * jnp.minimum(jnp.asarray(step, jnp.float32) / warm, 1.0)


def _clip_like_torch(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: scale by max_norm / (norm + 1e-6) when below 1."""

    def update(updates, state, params=None):
        del params
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(updates)))
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree_util.tree_map(lambda g: g * scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        _clip_like_torch(config.max_grad_norm),
        optax.adam(lambda count: learning_rate(config, count), b1=config.adam_beta1,
                   b2=config.adam_beta2, eps=1e-8),
    )


def init_params(config: TrainConfig, d_in: int, d_out: int | None = None, *,
                key: Array, b_dec: Float[Array, " d_out"] | None = None) -> TrainParams:
    """SAELens' initialisation: decoder rows drawn as `kaiming_uniform_` draws them, scaled to
    norm `decoder_init_norm`; the encoder their transpose (SAEs) or drawn alike
    (transcoders); biases zero, or `b_dec` given (e.g. `geometric_median` of a sample);
    JumpReLU thresholds at `jumprelu_init_threshold`; a skip connection at zero."""
    d_out = d_in if d_out is None else d_out
    enc_key, dec_key = jax.random.split(key)
    bound = (6 / d_out) ** 0.5  # kaiming_uniform_ on [latents, d_out]: fan_in d_out, gain sqrt 2
    w_dec = jax.random.uniform(dec_key, (config.width, d_out), jnp.float32, -bound, bound)
    if config.decoder_init_norm is not None:
        w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True) * config.decoder_init_norm
    if d_out == d_in:
        w_enc = w_dec.T
    else:
        bound = (6 / d_in) ** 0.5
        w_enc = jax.random.uniform(enc_key, (d_in, config.width), jnp.float32, -bound, bound)
    return TrainParams(
        w_enc=w_enc, b_enc=jnp.zeros(config.width, jnp.float32), w_dec=w_dec,
        b_dec=jnp.zeros(d_out, jnp.float32) if b_dec is None else jnp.asarray(b_dec,
                                                                             jnp.float32),
        threshold=(jnp.full(config.width, config.jumprelu_init_threshold, jnp.float32)
                   if config.architecture == "jumprelu" else None),
        w_skip=jnp.zeros((d_in, d_out), jnp.float32) if config.skip_connection else None,
    )


def init_state(config: TrainConfig, params: TrainParams, *, input_scale: float = 1.0,
               target_scale: float = 1.0) -> TrainState:
    width = params.w_enc.shape[1]
    if width != config.width:
        raise ValueError(f"the parameters have {width} latents; the config says width="
                         f"{config.width}")
    return TrainState(params, optimizer(config).init(params), jnp.zeros((), jnp.int32),
                      jnp.zeros(width, jnp.float32), jnp.zeros(width, jnp.float32),
                      jnp.zeros((), jnp.float32), jnp.asarray(input_scale, jnp.float32),
                      jnp.asarray(target_scale, jnp.float32))


def norm_scaling_factor(rows: Float[np.ndarray, "rows d"]) -> float:
    """SAELens' `expected_average_only_in` factor: sqrt(d) / the mean norm of `rows`."""
    rows = np.asarray(rows, np.float64)
    return float(rows.shape[-1] ** 0.5 / np.linalg.norm(rows, axis=-1).mean())


def geometric_median(points: Float[Array, "rows d"], *, iterations: int = 100,
                     tolerance: float = 1e-5) -> Float[Array, " d"]:
    """The point minimising the summed Euclidean distance to `points` (Weiszfeld's
    iteration, started at the mean): a `b_dec` that outliers do not pull."""
    points = jnp.asarray(points, jnp.float32)

    def step(carry):
        guess, _, i = carry
        weights = 1 / jnp.maximum(jnp.linalg.norm(points - guess, axis=-1), 1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        return new, jnp.linalg.norm(new - guess), i + 1

    guess, _, _ = jax.lax.while_loop(
        lambda c: (c[1] > tolerance * (1 + jnp.linalg.norm(c[0]))) & (c[2] < iterations),
        step, (points.mean(0), jnp.asarray(jnp.inf, jnp.float32), 0))
    return guess


# JumpReLU and its step function, with SAELens' straight-through gradients: the threshold
# gets -(scale / bandwidth) * rectangle((x - threshold) / bandwidth) summed over rows.

def _rectangle(x: Array) -> Array:
    return ((x > -0.5) & (x < 0.5)).astype(x.dtype)


def _jumprelu_vjp(bandwidth: float, ste_to_input: bool, x: Array, threshold: Array) -> Array:
    return x * (x > threshold)


def _jumprelu_fwd(bandwidth, ste_to_input, x, threshold):
    return _jumprelu_vjp(bandwidth, ste_to_input, x, threshold), (x, threshold)


def _jumprelu_bwd(bandwidth, ste_to_input, residuals, g):
    x, threshold = residuals
    ste = threshold / bandwidth * _rectangle((x - threshold) / bandwidth) * g
    x_grad = (x > threshold) * g + (ste if ste_to_input else 0)
    return x_grad, -ste.sum(0)


def _step_vjp(bandwidth: float, ste_to_input: bool, x: Array, threshold: Array) -> Array:
    return (x > threshold).astype(x.dtype)


def _step_fwd(bandwidth, ste_to_input, x, threshold):
    return _step_vjp(bandwidth, ste_to_input, x, threshold), (x, threshold)


def _step_bwd(bandwidth, ste_to_input, residuals, g):
    x, threshold = residuals
    ste = 1 / bandwidth * _rectangle((x - threshold) / bandwidth) * g
    return (ste if ste_to_input else jnp.zeros_like(x)), -ste.sum(0)


_jumprelu = jax.custom_vjp(_jumprelu_vjp, nondiff_argnums=(0, 1))
_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)
_step = jax.custom_vjp(_step_vjp, nondiff_argnums=(0, 1))
_step.defvjp(_step_fwd, _step_bwd)


class StepOutput(eqx.Module):
    """One step's losses (SAELens' names) and what it computed."""

    losses: dict[str, Array]
    loss: Array
    feature_acts: Float[Array, "rows latents"]
    sae_out: Float[Array, "rows d_out"]


def _forward(params: TrainParams, x: Array, target: Array, config: TrainConfig,
             dead: Array, coefficient: Array) -> tuple[Array, StepOutput]:
    architecture = config.architecture
    sae_in = x - params.b_dec if config.apply_b_dec_to_input else x
    pre = sae_in @ params.w_enc + params.b_enc
    dec_norm = jnp.linalg.norm(params.w_dec, axis=-1)
    rescale = architecture in ("topk", "batchtopk") and config.rescale_acts_by_decoder_norm
    if rescale:
        pre = pre * dec_norm
    if architecture == "relu":
        acts = jax.nn.relu(pre)
    elif architecture == "jumprelu":
        acts = _jumprelu(config.jumprelu_bandwidth, config.jumprelu_ste_to_input, pre,
                         params.threshold)
    elif architecture == "topk":
        values, indices = jax.lax.top_k(pre, int(config.k))
        values = jax.nn.relu(values)
        rows = jnp.arange(pre.shape[0])[:, None]
        acts = jnp.zeros_like(pre).at[rows, indices].set(values)
    else:
        flat = jax.nn.relu(pre).reshape(-1)
        acts = activate(flat, "topk", None, int(config.k * pre.shape[0])).reshape(pre.shape)

    def decode(a):
        return (a / dec_norm if rescale else a) @ params.w_dec

    if architecture == "topk":
        # Only k decoder rows per row of the batch: gathered, not a dense [rows, latents] x
        # [latents, d] product (k / latents of its work; the backward's scatter likewise).
        coefficients = values / dec_norm[indices] if rescale else values
        sae_out = jnp.einsum("rk,rkd->rd", coefficients, params.w_dec[indices]) + params.b_dec
    else:
        sae_out = decode(acts) + params.b_dec
    if params.w_skip is not None:
        sae_out = sae_out + x @ params.w_skip
    losses = {"mse_loss": ((sae_out - target) ** 2).sum(-1).mean()}
    if architecture == "relu":
        weighted = acts * dec_norm
        norm = (jnp.abs(weighted) ** config.lp_norm).sum(-1) ** (1 / config.lp_norm)
        losses["l1_loss"] = (coefficient * norm).mean()
    elif architecture == "jumprelu":
        threshold = params.threshold
        if config.jumprelu_sparsity_loss == "step":
            l0 = _step(config.jumprelu_bandwidth, config.jumprelu_ste_to_input, pre,
                       threshold).sum(-1)
        else:
            l0 = jnp.tanh(config.jumprelu_tanh_scale * acts * dec_norm).sum(-1)
        losses["l0_loss"] = (coefficient * l0).mean()
        if config.pre_act_loss_coefficient is not None:
            per_row = (jax.nn.relu(threshold - pre) * dead * dec_norm).sum(-1)
            losses["pre_act_loss"] = config.pre_act_loss_coefficient * per_row.mean()
    else:
        # AuxK: the top d_in / 2 dead latents (all of them when fewer) reconstruct what the
        # live ones left; scaled down while few are dead.
        num_dead = dead.sum()
        k_aux = x.shape[-1] // 2
        residual = jax.lax.stop_gradient(target - sae_out)

        def aux_loss(pre, w_dec):
            masked = jnp.where(dead, pre, -jnp.inf)
            values, indices = jax.lax.top_k(masked, min(k_aux, pre.shape[-1]))
            values = jnp.where(jnp.isfinite(values), values, 0)
            aux_acts = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None],
                                              indices].set(values)
            norm = jnp.linalg.norm(w_dec, axis=-1)
            recons = (aux_acts / norm if rescale else aux_acts) @ w_dec
            scale = jnp.minimum(num_dead / k_aux, 1.0)
            return config.aux_coefficient * scale * ((recons - residual) ** 2).sum(-1).mean()

        # Nothing to compute while no latent is dead (most of a run): SAELens returns 0 then.
        losses["auxiliary_reconstruction_loss"] = jax.lax.cond(
            num_dead > 0, aux_loss, lambda pre, w_dec: jnp.zeros((), pre.dtype),
            pre, params.w_dec)
    total = sum(losses.values())
    return total, StepOutput(losses, total, acts, sae_out)


@eqx.filter_jit
def train_step(state: TrainState, x: Float[Array, "rows d_in"],
               target: Float[Array, "rows d_out"] | None, config: TrainConfig
               ) -> tuple[TrainState, StepOutput]:
    """One step of SAELens' trainer on the rows `x` (an SAE reconstructs them; a transcoder
    predicts `target`)."""
    x = x * state.input_scale
    target = x if target is None else target * state.target_scale
    params = state.params
    if config.architecture == "jumprelu":
        # Projected before the step, not clamped in the graph: a clamp would zero the
        # threshold's gradient at 0 and pin the latent there.
        params = eqx.tree_at(lambda p: p.threshold, params, jnp.maximum(params.threshold, 0))
    dead = (state.since_fired > config.dead_feature_window).astype(x.dtype)
    coefficient = sparsity_coefficient(config, state.step)
    grads, out = jax.grad(_forward, has_aux=True)(params, x, target, config, dead,
                                                   coefficient)
    updates, opt_state = optimizer(config).update(grads, state.opt_state, params)
    fired_now = (out.feature_acts != 0)
    did_fire = fired_now.any(0)
    since = jnp.where(did_fire, 0.0, state.since_fired + 1)
    topk_threshold = state.topk_threshold
    if config.architecture == "batchtopk":
        positive = out.feature_acts > 0
        smallest = jnp.where(positive, out.feature_acts, jnp.inf).min()
        lr = config.topk_threshold_lr
        topk_threshold = jnp.where(positive.any(),
                                   (1 - lr) * topk_threshold + lr * smallest, topk_threshold)
    new = TrainState(eqx.apply_updates(params, updates), opt_state, state.step + 1, since,
                     state.fired + fired_now.sum(0), topk_threshold, state.input_scale,
                     state.target_scale)
    return new, out


@eqx.filter_jit
def resample_dead(state: TrainState, x: Float[Array, "rows d_in"],
                  target: Float[Array, "rows d_out"] | None, config: TrainConfig,
                  key: Array) -> TrainState:
    """Anthropic's resampling ("Towards Monosemanticity", 2023) of the latents dead by
    `config.dead_feature_window`: each draws a row of the batch with probability proportional
    to its squared reconstruction error; its decoder row becomes that row's target, unit
    norm, its encoder column that row's input at 0.2 x the mean norm of the live latents'
    encoder columns, its encoder bias 0 (JumpReLU's threshold is kept); Adam's moments and the
    counters of those latents restart at 0. Live latents are left bit for bit."""
    x = x * state.input_scale
    target = x if target is None else target * state.target_scale
    dead = state.since_fired > config.dead_feature_window
    params = state.params
    _, out = _forward(params, x, target, config, dead.astype(x.dtype),
                      sparsity_coefficient(config, state.step))
    error = ((out.sae_out - target) ** 2).sum(-1)
    rows = jax.random.categorical(key, jnp.log(jnp.maximum(error, 1e-30)),
                                  shape=(config.width,))

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)

    enc_norm = jnp.linalg.norm(params.w_enc, axis=0)
    alive_norm = jnp.where(dead.any() & ~dead.all(),
                           (enc_norm * ~dead).sum() / jnp.maximum((~dead).sum(), 1), 1.0)
    new_dec = unit(target[rows])  # [latents, d_out]
    new_enc = unit(x[rows]).T * 0.2 * alive_norm  # [d_in, latents]
    reset = TrainParams(
        w_enc=jnp.where(dead[None, :], new_enc, params.w_enc),
        b_enc=jnp.where(dead, 0.0, params.b_enc),
        w_dec=jnp.where(dead[:, None], new_dec, params.w_dec),
        b_dec=params.b_dec, threshold=params.threshold, w_skip=params.w_skip)

    def zero_dead(moments: Any) -> Any:
        if not isinstance(moments, TrainParams):
            return moments
        return TrainParams(
            w_enc=jnp.where(dead[None, :], 0.0, moments.w_enc),
            b_enc=jnp.where(dead, 0.0, moments.b_enc),
            w_dec=jnp.where(dead[:, None], 0.0, moments.w_dec), b_dec=moments.b_dec,
            threshold=None if moments.threshold is None else jnp.where(
                dead, 0.0, moments.threshold), w_skip=moments.w_skip)

    opt_state = jax.tree_util.tree_map(zero_dead, state.opt_state,
                                       is_leaf=lambda n: isinstance(n, TrainParams))
    return TrainState(reset, opt_state, state.step, jnp.where(dead, 0.0, state.since_fired),
                      state.fired, state.topk_threshold, state.input_scale, state.target_scale)


def to_dictionary(state: TrainState, config: TrainConfig, reads: Any, writes: Any = None, *,
                  name: str = "trained", model_name: str | None = None) -> SparseDictionary:
    """The trained dictionary as a `SparseDictionary` for inference (what `splice`, `evaluate`
    and the loaders use). TopK's decoder norms are folded into the encoder, as SAELens does
    on saving: the same activations, unit decoder rows. BatchTopK infers with its learned
    threshold (`activation="batchtopk"`); JumpReLU's threshold is the projected one. Input
    normalisation is folded in: the dictionary reads and writes the site's own units."""
    p = state.params
    w_enc, b_enc, w_dec, b_dec, w_skip = p.w_enc, p.b_enc, p.w_dec, p.b_dec, p.w_skip
    if config.architecture in ("topk", "batchtopk") and config.rescale_acts_by_decoder_norm:
        norm = jnp.linalg.norm(w_dec, axis=-1)
        w_enc, b_enc, w_dec = w_enc * norm, b_enc * norm, w_dec / norm[:, None]
    into, out_of = state.input_scale, 1 / state.target_scale
    if config.apply_b_dec_to_input and float(into * out_of) != 1.0:
        raise ValueError("apply_b_dec_to_input needs one scale for the input and the target "
                         "(an SAE), not a transcoder's two")
    # pre = (s x - b_dec) W + b = (x - b_dec / s)(s W) + b; out = (f W_dec + b_dec) / s
    w_enc, w_dec, b_dec = w_enc * into, w_dec * out_of, b_dec * out_of
    if w_skip is not None:
        w_skip = w_skip * into * out_of
    threshold, k = None, None
    if config.architecture == "jumprelu":
        threshold = jnp.maximum(p.threshold, 0)
    elif config.architecture == "batchtopk":
        threshold = jnp.full(config.width, state.topk_threshold, jnp.float32)
    elif config.architecture == "topk":
        k = int(config.k)
    return SparseDictionary(
        w_enc=w_enc, b_enc=b_enc, w_dec=w_dec, b_dec=b_dec, threshold=threshold,
        w_skip=w_skip, activation=config.architecture, k=k, reads=reads,
        writes=reads if writes is None else writes,
        subtract_decoder_bias=config.apply_b_dec_to_input, name=name, model_name=model_name)


# --- The data path: activations (streamed or cached) into a shuffle buffer -----------------

class ShuffleBuffer:
    """Rows from many contexts mixed before they reach a batch: `capacity` rows (memory:
    capacity x (d_in + d_out) x 4 bytes) are filled from the stream, shuffled, and the first
    half handed out in batches while the second half waits to be mixed with the next fill
    (SAELens' mixing buffer). Deterministic for a seed; `state()` / `restore()` carry it
    across a checkpoint."""

    def __init__(self, stream: Iterator[tuple[np.ndarray, ...]], capacity: int, seed: int):
        if capacity < 2:
            raise ValueError(f"the shuffle buffer holds at least 2 rows; got {capacity}")
        self.stream, self.capacity = stream, capacity
        self.rng = np.random.default_rng(seed)
        self.ready: list[np.ndarray] | None = None  # shuffled, being handed out
        self.held: list[np.ndarray] | None = None  # waiting for the next fill
        self.exhausted = False
        self.consumed = 0  # items read from the stream

    def _refill(self, size: int) -> bool:
        parts: list[list[np.ndarray]] = []
        for arrays in (self.held, self.ready):
            if arrays is not None and len(arrays[0]):
                parts = parts or [[] for _ in arrays]
                for part, a in zip(parts, arrays, strict=True):
                    part.append(a)
        rows = sum(len(a) for a in parts[0]) if parts else 0
        while rows < self.capacity and not self.exhausted:
            try:
                arrays = next(self.stream)
            except StopIteration:
                self.exhausted = True
                break
            self.consumed += 1
            parts = parts or [[] for _ in arrays]
            for part, a in zip(parts, arrays, strict=True):
                part.append(a)
            rows += len(arrays[0])
        if rows < size:
            return False
        order = self.rng.permutation(rows)
        mixed = [np.concatenate(p)[order] for p in parts]
        out = rows if self.exhausted else max(size, rows // 2)
        out -= out % size
        self.ready = [a[:out] for a in mixed]
        self.held = [a[out:] for a in mixed]
        return True

    def next_batch(self, size: int) -> tuple[np.ndarray, ...] | None:
        """The next `size` rows, or None when the stream and the buffer have run dry."""
        while self.ready is None or len(self.ready[0]) < size:
            if not self._refill(size):
                return None
        out = tuple(a[:size] for a in self.ready)
        self.ready = [a[size:] for a in self.ready]
        return out

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, ...]]:
        """Batches of `size` rows until the stream and the buffer run dry (a last partial
        batch is dropped)."""
        while (batch := self.next_batch(size)) is not None:
            yield batch

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able counters and random state, the rows held) at a batch boundary."""
        rows = {}
        for name, arrays in (("ready", self.ready), ("held", self.held)):
            for i, a in enumerate(arrays or ()):
                rows[f"{name}_{i}"] = a
        return {"rng": self.rng.bit_generator.state, "exhausted": self.exhausted,
                "consumed": self.consumed}, rows

    def restore(self, meta: dict[str, Any], rows: dict[str, np.ndarray]) -> None:
        self.rng.bit_generator.state = meta["rng"]
        self.exhausted, self.consumed = bool(meta["exhausted"]), int(meta["consumed"])
        for name in ("ready", "held"):
            found = sorted((k for k in rows if k.startswith(name + "_")),
                           key=lambda k: int(k.rsplit("_", 1)[1]))
            setattr(self, name, [rows[k] for k in found] or None)


@dataclass
class TrainLog:
    """What a training run measured, per logged step."""

    steps: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    losses: list[dict[str, float]] = dataclasses.field(default_factory=list)
    l0: list[float] = dataclasses.field(default_factory=list)
    explained_variance: list[float] = dataclasses.field(default_factory=list)
    dead_fraction: list[float] = dataclasses.field(default_factory=list)
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds_model: float = 0.0  # producing activations: the model's forward, or the cache
    seconds_step: float = 0.0


def training_curves_png(log: TrainLog) -> bytes:
    """A PNG of the run's curves against training tokens: the loss terms, L0, explained
    variance and dead fraction as logged, with the held-out evaluations as points."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    tokens = np.asarray(log.tokens, float)
    for name in (log.losses[0] if log.losses else {}):
        axes[0].plot(tokens, [terms[name] for terms in log.losses], label=name)
    axes[0].set_yscale("log")
    axes[0].set_title("loss terms (train batches)")
    if log.losses:
        axes[0].legend(fontsize=7)
    held = log.evaluations
    for ax, key, held_key, title in (
            (axes[1], "l0", "l0", "L0"),
            (axes[2], "explained_variance", "explained_variance", "explained variance"),
            (axes[3], "dead_fraction", "dead_fraction_held_out", "dead fraction")):
        ax.plot(tokens, getattr(log, key), label="train: not fired in the window"
                if key == "dead_fraction" else "train batches")
        if held and held_key in held[0]:
            ax.plot([e["tokens"] for e in held], [e[held_key] for e in held], "o-",
                    label="held out: never fired" if key == "dead_fraction" else "held out")
        ax.set_title(title)
        ax.legend(fontsize=7)
    if held and "ce_loss_recovered" in held[0]:
        axes[2].plot([e["tokens"] for e in held], [e["ce_loss_recovered"] for e in held],
                     "s--", label="CE loss recovered (held out)")
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("training tokens")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)
    return out.getvalue()


def _step_metrics(target: Array, out: StepOutput) -> tuple[float, float]:
    """L0 and explained variance of one step, as SAELens logs them."""
    l0 = float((out.feature_acts != 0).sum(-1).mean())
    residual = ((out.sae_out - target) ** 2).sum(-1).mean()
    variance = ((target - target.mean(0)) ** 2).sum(-1).mean()
    return l0, float(1 - residual / variance)


def initial_state(config: TrainConfig, sample: Sequence[np.ndarray], *, seed: int,
                  b_dec_init: str = "geometric_median") -> TrainState:
    """The state `fit` starts from, given a sample of rows `(x,)` or `(x, target)`: the
    normalisation factors estimated on it, `b_dec` at the (scaled) targets' geometric median
    or mean (or zeros), the rest as `init_params` draws it from `seed`."""
    into = out_of = 1.0
    if config.normalize_activations == "expected_average_only_in":
        into = out_of = norm_scaling_factor(sample[0])
        if len(sample) > 1:
            out_of = norm_scaling_factor(sample[-1])
    targets = np.asarray(sample[-1], np.float32) * np.float32(out_of)
    b_dec = None
    if b_dec_init == "geometric_median":
        b_dec = geometric_median(jnp.asarray(targets))
    elif b_dec_init == "mean":
        b_dec = jnp.asarray(targets.mean(0))
    params = init_params(config, sample[0].shape[-1], sample[-1].shape[-1],
                         key=jax.random.key(seed), b_dec=b_dec)
    return init_state(config, params, input_scale=into, target_scale=out_of)


def _axis(mesh: jax.sharding.Mesh, name: str) -> str | None:
    return name if name in mesh.axis_names else None


def check_mesh(config: TrainConfig, batch_rows: int, mesh: jax.sharding.Mesh) -> None:
    """Refuse, in one sentence, a mesh the width or the batch does not divide."""
    for axis, what, size in (("model", "width", config.width),
                             ("data", "batch_rows", batch_rows)):
        if axis in mesh.axis_names and size % mesh.shape[axis]:
            raise ValueError(f"{what} {size} does not divide over the mesh's '{axis}' axis of "
                             f"{mesh.shape[axis]} devices; pick a multiple of "
                             f"{mesh.shape[axis]}")


def shard_train_state(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """`state` placed on `mesh`: every latent axis (the parameters', Adam's moments', the
    counters') split over the `model` axis, the rest replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    model = _axis(mesh, "model")
    specs = {"w_enc": P(None, model), "b_enc": P(model), "w_dec": P(model, None),
             "b_dec": P(), "threshold": P(model), "w_skip": P()}

    def place_params(params: TrainParams) -> TrainParams:
        return TrainParams(**{
            k: None if getattr(params, k) is None else jax.device_put(
                getattr(params, k), NamedSharding(mesh, spec)) for k, spec in specs.items()})

    def place(node: Any) -> Any:
        if isinstance(node, TrainParams):
            return place_params(node)
        return jax.device_put(node, NamedSharding(mesh, P()))

    latents = NamedSharding(mesh, P(model))
    return TrainState(
        place_params(state.params),
        jax.tree_util.tree_map(place, state.opt_state,
                               is_leaf=lambda n: isinstance(n, TrainParams)),
        place(state.step), jax.device_put(state.since_fired, latents),
        jax.device_put(state.fired, latents), place(state.topk_threshold),
        place(state.input_scale), place(state.target_scale))


class TrainingStopped(RuntimeError):
    """The loss became NaN or infinite: the message names the step and the batch."""


def fit(model: Any, windows: Any, reads: Any, config: TrainConfig, *, writes: Any = None,
        batch_rows: int = 4096, sequences: int = 8, buffer_rows: int = 2**17, seed: int = 0,
        b_dec_init: str = "geometric_median", log_every: int = 50,
        checkpoints: str | os.PathLike | None = None, checkpoint_every: int = 0,
        mesh: jax.sharding.Mesh | None = None, evaluation: Any = None, eval_every: int = 0,
        show_progress: bool | None = None) -> tuple[TrainState, TrainLog]:
    """Train a dictionary reading hook point `reads` (writing `writes`: a transcoder) of
    `model` for `config.total_steps` steps of `batch_rows` rows, streamed from `windows`'
    train split through a `ShuffleBuffer` of `buffer_rows` rows; nothing is written to disk
    but checkpoints. `b_dec` starts at the geometric median (or the mean, or zeros) of the
    first buffer's targets. The same arguments give bit-identical parameters. `windows` may
    instead be a `CachedActivations` (`interp.features.activations`): the same rows read from disk,
    the same parameters, no model run (`model` may be None).

    With a `mesh`, each batch is split over its `data` axis and the dictionary's latents over
    its `model` axis (`shard_train_state`): the parameters one device computes, to float
    rounding. `evaluation(state, step)`, called every `eval_every` steps, returns a dict of
    metrics for the log (e.g. `evaluate` on held-out windows).

    With `checkpoints` (a folder), the state, the buffer and the log are saved there every
    `checkpoint_every` steps (and when the run is interrupted: Ctrl-C, SIGTERM), and a run
    with the same arguments resumes from the newest checkpoint whose files match their
    checksums (a damaged one is named in a warning and the one before it used), with the
    result an uninterrupted run gives. A NaN or infinite loss stops the run with
    `TrainingStopped`, naming the step and the batch; the checkpoints stay as they were."""
    import time

    from gemma_eqx.core.runtime import progress

    if b_dec_init not in ("geometric_median", "mean", "zeros"):
        raise ValueError(f"b_dec_init must be geometric_median, mean or zeros; got "
                         f"{b_dec_init!r}")
    for name, value in (("batch_rows", batch_rows), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if checkpoint_every and checkpoints is None:
        raise ValueError("checkpoint_every needs checkpoints= (the folder to write them to)")
    if eval_every and evaluation is None:
        raise ValueError("eval_every needs evaluation= (what to compute)")
    if mesh is not None:
        check_mesh(config, batch_rows, mesh)
        # Sharding propagated by the compiler (Auto axes), whatever axis types it came with:
        # explicit axes would make every top-k and contraction over the latents ask for an
        # out_sharding.
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names)
    points = [reads] if writes is None or writes == reads else [reads, writes]
    cached = isinstance(windows, CachedActivations)
    if cached:
        windows.check_points(points)
    folder = None if checkpoints is None else Path(checkpoints)
    run_key = None if folder is None else _run_key(
        config, reads, writes, batch_rows, sequences, buffer_rows, seed, b_dec_init, windows)
    log = TrainLog()
    buffer = ShuffleBuffer(iter(()), max(buffer_rows, 2 * batch_rows), seed)
    state, first = None, 0
    if folder is not None:
        resumed = _resume(folder, run_key, config)
        if resumed is not None:
            state, buffer_meta, rows, saved_log = resumed
            buffer.restore(buffer_meta, rows)
            log = TrainLog(**saved_log)
            first = int(state.step)
    if mesh is not None and state is not None:
        state = shard_train_state(state, mesh)
    rows_sharding = None if mesh is None else jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(_axis(mesh, "data"), None))
    buffer.stream = _timed(
        windows.stream(points, skip=buffer.consumed) if cached else stream_activations(
            model, windows, points, sequences=sequences, skip=buffer.consumed), log)
    clock = time.perf_counter()
    steps = progress(range(first, config.total_steps), "training", unit="step",
                     show=show_progress, total=config.total_steps - first)
    snapshot = buffer.state()  # the buffer as the state's next step will find it
    try:
        for step in steps:
            snapshot = buffer.state()
            batch = buffer.next_batch(batch_rows)
            if batch is None:
                raise ValueError(f"the corpus ran out after {step} of {config.total_steps} "
                                 f"steps of {batch_rows} rows: fewer steps or more text")
            x = jax.device_put(batch[0], rows_sharding)
            target = jax.device_put(batch[-1], rows_sharding)
            if state is None:
                # The rows waiting in the buffer: a sample of many contexts.
                held = buffer.held if buffer.held and len(buffer.held[0]) else batch
                state = initial_state(config, held, seed=seed, b_dec_init=b_dec_init)
                if mesh is not None:
                    state = shard_train_state(state, mesh)
            start = time.perf_counter()
            new, out = train_step(state, x, None if len(batch) == 1 else target, config)
            loss = float(out.loss)  # one number per step: the NaN check and the sync
            if not np.isfinite(loss):
                raise TrainingStopped(
                    f"the loss is {loss} at step {step} (batch {step}: rows "
                    f"{step * batch_rows}-{(step + 1) * batch_rows - 1} of the shuffled "
                    f"stream; terms {({k: float(v) for k, v in out.losses.items()})}); "
                    + ("the last checkpoint is kept" if folder is not None else
                       "nothing was saved"))
            state = new
            if config.resample_every and (step + 1) % config.resample_every == 0:
                state = resample_dead(state, x, None if len(batch) == 1 else target, config,
                                      jax.random.fold_in(jax.random.key(seed), step + 1))
            log.seconds_step += time.perf_counter() - start
            if (step + 1) % log_every == 0 or step + 1 == config.total_steps:
                # in the units the step trained in (the targets scaled, as its output is)
                l0, explained = _step_metrics(target * state.target_scale, out)
                log.steps.append(step + 1)
                log.tokens.append((step + 1) * batch_rows)
                log.losses.append({k: float(v) for k, v in out.losses.items()})
                log.l0.append(l0)
                log.explained_variance.append(explained)
                log.dead_fraction.append(float(
                    (state.since_fired > config.dead_feature_window).mean()))
                if hasattr(steps, "set_postfix"):
                    done = log.tokens[-1] - first * batch_rows
                    steps.set_postfix(l0=f"{l0:.1f}", ev=f"{explained:.3f}",
                                      dead=f"{log.dead_fraction[-1]:.3f}",
                                      tok_s=f"{done / (time.perf_counter() - clock):.0f}")
            if eval_every and ((step + 1) % eval_every == 0 or step + 1 == config.total_steps):
                log.evaluations.append({"step": step + 1, "tokens": (step + 1) * batch_rows,
                                        **evaluation(state, step + 1)})
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save_checkpoint(folder, state, buffer.state(), log, run_key)
    except KeyboardInterrupt:
        if folder is not None and state is not None:
            _save_checkpoint(folder, state, snapshot, log, run_key)
        raise
    return state, log


def _run_key(config, reads, writes, batch_rows, sequences, buffer_rows, seed, b_dec_init,
             windows) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run."""
    digest = windows.key if isinstance(windows, CachedActivations) else windows_digest(
        windows.train)
    return {"config": dataclasses.asdict(config), "reads": str(reads),
            "writes": str(writes or reads), "batch_rows": batch_rows, "sequences": sequences,
            "buffer_rows": buffer_rows, "seed": seed, "b_dec_init": b_dec_init,
            "windows_sha256": digest}


def _file_digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _save_checkpoint(folder: Path, state: TrainState, buffer: tuple[dict, dict],
                     log: TrainLog, run_key: dict[str, Any], keep: int = 2) -> Path:
    """`folder/step_<N>`: the state's leaves (orbax), the buffer's rows (.npy), the counters
    and the log (JSON), a manifest of checksums; written aside and renamed into place. Only
    the newest `keep` checkpoints this writer made are kept."""
    import json
    import shutil

    import orbax.checkpoint as ocp

    from gemma_eqx.core.atomic import remove_partials, replace_directory

    step = int(state.step)
    target = folder / f"step_{step:09d}"
    folder.mkdir(parents=True, exist_ok=True)
    remove_partials(target)
    buffer_meta, rows = buffer
    leaves = jax.tree_util.tree_leaves(state)
    with replace_directory(target) as new:
        new.mkdir()
        ocp.PyTreeCheckpointer().save(
            (new / "state").absolute(),
            {f"{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        for name, array in rows.items():
            np.save(new / f"{name}.npy", array)
        (new / "meta.json").write_text(json.dumps({
            "step": step, "run": run_key, "buffer": buffer_meta,
            "log": dataclasses.asdict(log), "d_in": int(state.params.w_enc.shape[0]),
            "d_out": int(state.params.w_dec.shape[1])}))
        (new / "manifest.json").write_text(json.dumps(_file_digests(new)))
    for old in sorted(folder.glob("step_*"))[:-keep]:
        if (old / "manifest.json").is_file():  # one of ours
            shutil.rmtree(old, ignore_errors=True)
    return target


def _resume(folder: Path, run_key: dict[str, Any], config: TrainConfig) -> Any:
    """(state, buffer counters, buffer rows, log) of the newest sound checkpoint in `folder`
    made by a run with these arguments, or None."""
    import json
    import warnings

    import orbax.checkpoint as ocp

    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("step_*"), reverse=True):
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            if manifest != _file_digests(path):
                raise ValueError("its files do not match their checksums")
            meta = json.loads((path / "meta.json").read_text())
            if meta["run"] != run_key:
                changed = sorted(k for k in run_key if meta["run"].get(k) != run_key[k])
                raise ValueError(f"it was made by a run with other arguments "
                                 f"({', '.join(changed)}); use another checkpoints folder")
            template = init_state(config, init_params(config, meta["d_in"], meta["d_out"],
                                                      key=jax.random.key(0)))
            leaves, treedef = jax.tree_util.tree_flatten(template)
            saved = ocp.PyTreeCheckpointer().restore((path / "state").absolute())
            restored = [jnp.asarray(saved[f"{i:04d}"], leaf.dtype)
                        for i, leaf in enumerate(leaves)]
            rows = {p.stem: np.load(p) for p in path.glob("*.npy")}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            if isinstance(e, ValueError) and "other arguments" in str(e):
                raise ValueError(f"checkpoint {path}: {e}") from None
            warnings.warn(f"checkpoint {path} is damaged ({e}); trying the one before it",
                          stacklevel=3)
            continue
        return (jax.tree_util.tree_unflatten(treedef, restored), meta["buffer"], rows,
                meta["log"])
    return None


def remove_checkpoints(folder: str | os.PathLike) -> None:
    """Delete the checkpoints `fit` wrote in `folder` (those with its manifest), and the
    folder when nothing else is left in it."""
    import shutil

    folder = Path(folder)
    for path in folder.glob("step_*"):
        if (path / "manifest.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _timed(stream: Iterator[Any], log: TrainLog) -> Iterator[Any]:
    import time

    while True:
        start = time.perf_counter()
        try:
            item = next(stream)
        except StopIteration:
            return
        log.seconds_model += time.perf_counter() - start
        yield item
