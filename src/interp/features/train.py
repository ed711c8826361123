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
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk")
SPARSITY_LOSSES = ("step", "tanh")


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
    decoder_init_norm: float | None = 0.1
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    total_steps: int = 1000
    dead_feature_window: int = 1000

    def __post_init__(self):
        def bad(field: str, why: str) -> None:
            raise ValueError(f"TrainConfig field '{field}' {why}; got "
                             f"{getattr(self, field)!r}")

        if self.architecture not in ARCHITECTURES:
            bad("architecture", f"must be one of {', '.join(ARCHITECTURES)}")
        if self.jumprelu_sparsity_loss not in SPARSITY_LOSSES:
            bad("jumprelu_sparsity_loss", f"must be one of {', '.join(SPARSITY_LOSSES)}")
        for field in ("width", "total_steps", "dead_feature_window"):
            if isinstance(getattr(self, field), bool) or not isinstance(
                    getattr(self, field), int) or getattr(self, field) < 1:
                bad(field, "must be a positive integer")
        for field in ("lr_warm_up_steps", "lr_decay_steps", "sparsity_warm_up_steps"):
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


class TrainState(eqx.Module):
    """Parameters, Adam's state and the counters a step reads and advances."""

    params: TrainParams
    opt_state: Any
    step: Int[Array, ""]
    since_fired: Float[Array, " latents"]  # steps since each latent last fired
    fired: Float[Array, " latents"]  # rows on which each latent fired, in all
    topk_threshold: Float[Array, ""]  # batchtopk's inference threshold


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
    JumpReLU thresholds at `jumprelu_init_threshold`."""
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
    )


def init_state(config: TrainConfig, params: TrainParams) -> TrainState:
    width = params.w_enc.shape[1]
    if width != config.width:
        raise ValueError(f"the parameters have {width} latents; the config says width="
                         f"{config.width}")
    return TrainState(params, optimizer(config).init(params), jnp.zeros((), jnp.int32),
                      jnp.zeros(width, jnp.float32), jnp.zeros(width, jnp.float32),
                      jnp.zeros((), jnp.float32))


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
    return x * (x > threshold), (x, threshold)


def _jumprelu_bwd(bandwidth, ste_to_input, residuals, g):
    x, threshold = residuals
    ste = threshold / bandwidth * _rectangle((x - threshold) / bandwidth) * g
    x_grad = (x > threshold) * g + (ste if ste_to_input else 0)
    return x_grad, -ste.sum(0)


def _step_vjp(bandwidth: float, ste_to_input: bool, x: Array, threshold: Array) -> Array:
    return (x > threshold).astype(x.dtype)


def _step_fwd(bandwidth, ste_to_input, x, threshold):
    return (x > threshold).astype(x.dtype), (x, threshold)


def _step_bwd(bandwidth, ste_to_input, residuals, g):
    x, threshold = residuals
    ste = 1 / bandwidth * _rectangle((x - threshold) / bandwidth) * g
    return (ste if ste_to_input else jnp.zeros_like(x)), -ste.sum(0)


_jumprelu = jax.custom_vjp(_jumprelu_vjp, nondiff_argnums=(0, 1))
_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)
_step = jax.custom_vjp(_step_vjp, nondiff_argnums=(0, 1))
_step.defvjp(_step_fwd, _step_bwd)


def _top_values(x: Array, k: int) -> Array:
    """x with all but its top `k` entries per row set to 0 (ties: the lower index wins)."""
    values, indices = jax.lax.top_k(x, k)
    return jnp.zeros_like(x).at[jnp.arange(x.shape[0])[:, None], indices].set(values)


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
        acts = jax.nn.relu(_top_values(pre, int(config.k)))
    else:
        flat = jax.nn.relu(pre).reshape(-1)
        acts = _top_values(flat[None], int(config.k * pre.shape[0]))[0].reshape(pre.shape)

    def decode(a):
        return (a / dec_norm if rescale else a) @ params.w_dec

    sae_out = decode(acts) + params.b_dec
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
        scale = jnp.minimum(num_dead / k_aux, 1.0)
        masked = jnp.where(dead, pre, -jnp.inf)
        values, indices = jax.lax.top_k(masked, min(k_aux, pre.shape[-1]))
        values = jnp.where(jnp.isfinite(values), values, 0)
        aux_acts = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], indices].set(
            values)
        residual = jax.lax.stop_gradient(target - sae_out)
        aux = ((decode(aux_acts) - residual) ** 2).sum(-1).mean()
        losses["auxiliary_reconstruction_loss"] = jnp.where(
            num_dead > 0, config.aux_coefficient * scale * aux, 0.0)
    total = sum(losses.values())
    return total, StepOutput(losses, total, acts, sae_out)


@eqx.filter_jit
def train_step(state: TrainState, x: Float[Array, "rows d_in"],
               target: Float[Array, "rows d_out"] | None, config: TrainConfig
               ) -> tuple[TrainState, StepOutput]:
    """One step of SAELens' trainer on the rows `x` (an SAE reconstructs them; a transcoder
    predicts `target`)."""
    target = x if target is None else target
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
                     state.fired + fired_now.sum(0), topk_threshold)
    return new, out
