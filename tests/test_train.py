"""The training step against SAELens 6.54.12's own trainer (`SAETrainer._train_step`): five
steps of each architecture from SAELens' initial parameters, on the same batches and dead-latent
counters, give the same parameters and loss terms to 1e-5 (`tests/data/saelens_training_
reference.npz`, made by `tests/data/make_saelens_training_reference.py`; rerun against SAELens
itself when SAELENS_PYTHON is set). And the pieces on their own: the schedules, the geometric
median, the straight-through gradients, bad configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from interp.features import train
from interp.features.train import TrainConfig, TrainParams

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "saelens_training_reference.npz"
SCRIPT = DATA / "make_saelens_training_reference.py"
STEPS, WINDOW, BATCH = 5, 5, 32

# The SAELens configs of the script, in our fields; trainer: lr 1e-2 warmed up over 2 steps,
# decayed over the last 3 of 6, Adam betas (0.8, 0.99).
SCHEDULE = dict(lr=1e-2, lr_warm_up_steps=2, lr_decay_steps=3, total_steps=6,
                adam_beta1=0.8, adam_beta2=0.99, dead_feature_window=WINDOW, width=64)
CASES = {
    "relu": dict(architecture="relu", l1_coefficient=2.0, sparsity_warm_up_steps=2,
                 apply_b_dec_to_input=True),
    "jumprelu": dict(architecture="jumprelu", l0_coefficient=0.5, sparsity_warm_up_steps=2,
                     jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2),
    "jumprelu-tanh": dict(architecture="jumprelu", l0_coefficient=0.5, jumprelu_bandwidth=0.5,
                          jumprelu_init_threshold=0.2, jumprelu_sparsity_loss="tanh",
                          jumprelu_ste_to_input=True, pre_act_loss_coefficient=0.1,
                          apply_b_dec_to_input=True),
    "topk": dict(architecture="topk", k=6, aux_coefficient=0.5),
    "batchtopk": dict(architecture="batchtopk", k=6.0, aux_coefficient=0.5,
                      topk_threshold_lr=0.1, apply_b_dec_to_input=True),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The committed fixture, or SAELens run now when SAELENS_PYTHON names its interpreter."""
    python = os.environ.get("SAELENS_PYTHON")
    if not python:
        return dict(np.load(REFERENCE))
    out = tmp_path_factory.mktemp("saelens") / "reference.npz"
    subprocess.run([python, str(SCRIPT), str(out)], check=True, capture_output=True)
    fresh = dict(np.load(out))
    committed = dict(np.load(REFERENCE))
    assert fresh.keys() == committed.keys()
    for key in fresh:  # the committed fixture is what SAELens computes today
        np.testing.assert_allclose(fresh[key], committed[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)
    return fresh


def _params(ref: dict, prefix: str) -> TrainParams:
    get = lambda name: jnp.asarray(ref[f"{prefix}/{name}"], jnp.float32)  # noqa: E731
    threshold = f"{prefix}/threshold"
    return TrainParams(get("W_enc"), get("b_enc"), get("W_dec"), get("b_dec"),
                       get("threshold") if threshold in ref else None)


@pytest.mark.parametrize("case", list(CASES))
def test_five_steps_equal_saelens_trainer(reference, case):
    config = TrainConfig(**SCHEDULE, **CASES[case])
    state = train.init_state(config, _params(reference, f"{case}/init"))
    state = jax.tree_util.tree_map(lambda a: a, state)
    state = train.TrainState(state.params, state.opt_state, state.step,
                             jnp.asarray(reference[f"{case}/since_fired"]), state.fired,
                             state.topk_threshold)
    batches = reference[f"{case}/batches"]
    for step in range(STEPS):
        state, out = train.train_step(state, jnp.asarray(batches[step]), None, config)
        where = f"{case}/step{step}"
        # float32 on both sides, five Adam steps of 1e-2: parameters agree to rounding
        # (about 1e-7 relative per operation over a few hundred operations).
        for name, ours in (("W_enc", state.params.w_enc), ("b_enc", state.params.b_enc),
                           ("W_dec", state.params.w_dec), ("b_dec", state.params.b_dec),
                           ("threshold", state.params.threshold)):
            if ours is None:
                assert f"{where}/{name}" not in reference
                continue
            np.testing.assert_allclose(np.asarray(ours), reference[f"{where}/{name}"],
                                       rtol=1e-5, atol=1e-6, err_msg=f"{where}/{name}")
        losses = {k.rsplit("/", 1)[1]: float(v) for k, v in reference.items()
                  if k.startswith(f"{where}/loss/")}
        ours = {k: float(v) for k, v in out.losses.items()} | {"total": float(out.loss)}
        assert ours.keys() == losses.keys(), where
        for name in losses:
            assert ours[name] == pytest.approx(losses[name], rel=1e-5, abs=1e-6), (where, name)
        np.testing.assert_allclose(np.asarray(out.feature_acts),
                                   reference[f"{where}/feature_acts"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(state.since_fired),
                                      reference[f"{where}/since_fired"])
        if case == "batchtopk":
            assert float(state.topk_threshold) == pytest.approx(
                float(reference[f"{where}/topk_threshold"]), rel=1e-5)


def test_the_schedules_step_by_step():
    config = TrainConfig(lr=1.0, lr_warm_up_steps=4, lr_decay_steps=2, total_steps=10,
                         architecture="relu", l1_coefficient=3.0, sparsity_warm_up_steps=3)
    lrs = [float(train.learning_rate(config, s)) for s in range(10)]
    # LinearLR from 1/4 to 1 over 3 steps, constant, then 1 -> 0 over the last 2.
    np.testing.assert_allclose(lrs, [0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 0.5], rtol=1e-6)
    coefficients = [float(train.sparsity_coefficient(config, s)) for s in range(5)]
    np.testing.assert_allclose(coefficients, [0, 1, 2, 3, 3], rtol=1e-6)


def test_geometric_median_minimises_the_summed_distance():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(200, 5)), rng.normal(size=(10, 5)) + 50])
    median = np.asarray(train.geometric_median(jnp.asarray(points)))
    cost = lambda c: np.linalg.norm(points - c, axis=-1).sum()  # noqa: E731
    for direction in np.eye(5):  # a minimum: no step along any axis lowers the cost
        for h in (1e-2, -1e-2):
            assert cost(median) <= cost(median + h * direction) + 1e-6
    # ... and the 10 far points pull it much less than they pull the mean
    assert np.linalg.norm(median) < 0.5 < np.linalg.norm(points.mean(0))


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel():
    x = jnp.asarray([[0.05, 0.3, 0.58], [0.9, 0.45, -1.0]])
    threshold = jnp.asarray([0.1, 0.5, 0.5])
    bandwidth = 0.2
    # d/dθ of sum(JumpReLU): -(θ/bw) per row where |x - θ| < bw/2; the input gets the gate
    g_x, g_t = jax.grad(lambda a, t: train._jumprelu(bandwidth, False, a, t).sum(),
                        argnums=(0, 1))(x, threshold)
    near = np.abs(np.asarray(x - threshold)) < bandwidth / 2
    np.testing.assert_allclose(np.asarray(g_t), -(near * np.asarray(threshold) / bandwidth
                                                  ).sum(0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_x), np.asarray(x > threshold, np.float32))
    _, g_step = jax.grad(lambda a, t: train._step(bandwidth, False, a, t).sum(),
                         argnums=(0, 1))(x, threshold)
    np.testing.assert_allclose(np.asarray(g_step), -(near / bandwidth).sum(0), rtol=1e-6)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(architecture="gated"), "field 'architecture' must be one of relu, jumprelu, topk"),
    (dict(width=0), "field 'width' must be a positive integer"),
    (dict(k=5000, width=4096), "field 'k' must lie in (0, width=4096]"),
    (dict(k=2.5), "field 'k' must be a whole number of latents for topk"),
    (dict(lr=float("nan")), "field 'lr' must be a positive number"),
    (dict(lr_warm_up_steps=600, lr_decay_steps=600), "must fit in total_steps (1000)"),
    (dict(jumprelu_sparsity_loss="l1"), "field 'jumprelu_sparsity_loss' must be one of"),
])
def test_a_bad_config_is_refused_in_one_sentence(fields, message):
    with pytest.raises(ValueError, match=None) as e:
        TrainConfig(**fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_init_follows_saelens():
    config = TrainConfig(width=64, architecture="jumprelu", jumprelu_init_threshold=0.3)
    params = train.init_params(config, 16, key=jax.random.key(0))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(params.w_dec), axis=-1), 0.1,
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(params.w_enc), np.asarray(params.w_dec).T)
    assert float(params.threshold[0]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="the parameters have 64 latents; the config says"):
        train.init_state(config.replace(width=32), params)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
