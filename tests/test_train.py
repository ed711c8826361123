"""The training step against SAELens 6.54.12's own trainer (`SAETrainer._train_step`): five
steps of each architecture from SAELens' initial parameters, on the same batches and dead-latent
counters, give the same parameters and loss terms to 1e-5 (`tests/data/saelens_training_
reference.npz`, made by `tests/data/make_saelens_training_reference.py`; rerun against SAELens
itself when SAELENS_PYTHON is set). And the pieces on their own: the schedules, the geometric
median, the straight-through gradients, bad configs."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
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
    state = eqx.tree_at(lambda s: s.since_fired, state,
                        jnp.asarray(reference[f"{case}/since_fired"]))
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


@pytest.mark.parametrize("case", list(CASES))
def test_a_trained_dictionary_saves_as_gemma_scope_2_and_loads_back(reference, case, tmp_path):
    """Five steps, then `to_dictionary` and `save_gemma_scope_2`: `load_dictionary` reads the
    folder back to a dictionary whose features (TopK: the training forward's, its decoder
    norms folded in) and reconstruction are the trained ones."""
    from interp.features import HookPoint, load_dictionary
    from interp.features.load import save_gemma_scope_2

    config = TrainConfig(**SCHEDULE, **CASES[case])
    state = train.init_state(config, _params(reference, f"{case}/init"))
    batches = jnp.asarray(reference[f"{case}/batches"])
    for step in range(STEPS):
        state, out = train.train_step(state, batches[step], None, config)
    point = HookPoint("resid_post", 6)
    trained = train.to_dictionary(state, config, point, model_name="gemma-v3-270m-pt")
    folder = save_gemma_scope_2(trained, tmp_path / "resid_post" / "layer_6",
                                extra={"training": {"architecture": config.architecture}})
    assert sorted(p.name for p in folder.parent.iterdir()) == ["layer_6"]  # no partials left
    loaded = load_dictionary(folder)
    assert (loaded.reads, loaded.writes, loaded.width) == (point, point, 64)
    x = batches[-1]
    _, final = train.train_step(state, x, None, config)  # the forward at the final params
    acts = np.asarray(loaded.encode(x))
    if case != "batchtopk":
        # the training forward's features (TopK's were already scaled by the decoder norms
        # that the export folds into the encoder)
        np.testing.assert_allclose(acts, np.asarray(final.feature_acts), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(loaded.decode(jnp.asarray(acts))),
                                   np.asarray(final.sae_out), rtol=1e-5, atol=1e-5)
    else:  # BatchTopK infers with one learned threshold: JumpReLU at it
        pre = np.asarray(loaded.pre_activations(x))
        threshold = float(state.topk_threshold)
        np.testing.assert_allclose(acts, np.where(pre > threshold, pre, 0), rtol=1e-6)
    # A folder of someone else's files is refused, and left as it was.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds files other than a Gemma Scope 2"):
        save_gemma_scope_2(trained, other)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]


class _Bytes:
    """A tokenizer of bytes mod 60 + 1 (the tiny model's 61-token vocabulary), BOS 0."""

    bos_id = 0

    def encode(self, text):
        return [1 + b % 60 for b in text.encode()]


@pytest.fixture(scope="module")
def tiny_setup():
    import gemma_eqx
    from factories import tiny
    from interp.corpus import token_windows

    model = gemma_eqx.Transformer(tiny(("global", "global", "global")), key=jax.random.key(0))
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "war", "fool"]
    documents = [(f"doc{i}", " ".join(rng.choice(words, 400))) for i in range(12)]
    return model, token_windows(_Bytes(), documents, 16, seed=0)


def test_streamed_activations_are_the_captured_ones_without_bos(tiny_setup):
    import interp
    from interp.features import HookPoint

    model, windows = tiny_setup
    points = [HookPoint("mlp_in", 1), HookPoint("resid_post", 0)]
    first = next(train.stream_activations(model, windows, points, sequences=4))
    _, cache = interp.capture(model, windows.train[:4], sites=["mlp_in", "resid_post"])
    for got, point in zip(first, points, strict=True):
        want = np.asarray(cache[point.site, point.layer])[:, 1:].reshape(-1, 32)
        np.testing.assert_array_equal(got, want)
    # The forward stops after the last layer a point needs: a layer above it is never run
    # (its intervention would raise as it is traced).
    def boom(x):
        raise AssertionError("layer 2 ran")

    guarded = interp.apply_fn(model, "resid_pre", boom, layers=[2])
    next(train.stream_activations(guarded, windows, points, sequences=4))


def test_the_shuffle_buffer_hands_out_each_row_once_mixed_across_contexts():
    chunks = [(np.full((10, 1), i, np.float32) * 100 + np.arange(10)[:, None],)
              for i in range(9)]
    buffer = train.ShuffleBuffer(iter(chunks), capacity=40, seed=0)
    out = np.concatenate([b[0] for b in buffer.batches(5)])[:, 0]
    every = np.concatenate([c[0] for c in chunks])[:, 0]
    assert len(out) == 90 and sorted(out.tolist()) == sorted(every.tolist())
    assert len({int(v) // 100 for v in out[:5]}) > 1  # the first batch mixes contexts
    again = np.concatenate([b[0] for b in train.ShuffleBuffer(
        iter(chunks), capacity=40, seed=0).batches(5)])[:, 0]
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_fit_learns_and_is_deterministic(tiny_setup, architecture):
    from interp.features import HookPoint

    model, windows = tiny_setup
    config = TrainConfig(architecture=architecture, width=64, k=4, lr=3e-3, total_steps=60,
                         l0_coefficient=1e-3, jumprelu_init_threshold=0.01,
                         dead_feature_window=20)
    point = HookPoint("resid_post", 1)
    runs = [train.fit(model, windows, point, config, batch_rows=64, sequences=4,
                      buffer_rows=512, log_every=20, show_progress=False) for _ in range(2)]
    (state, log), (again, _) = runs
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    assert log.steps == [20, 40, 60] and log.tokens[-1] == 60 * 64
    assert log.explained_variance[-1] > log.explained_variance[0]
    assert log.explained_variance[-1] > 0.5, log.explained_variance
    assert log.seconds_model > 0 and log.seconds_step > 0


def test_fit_trains_a_transcoder_between_two_sites(tiny_setup):
    from interp.features import HookPoint

    model, windows = tiny_setup
    config = TrainConfig(architecture="topk", width=64, k=4, lr=3e-3, total_steps=30)
    reads, writes = HookPoint("mlp_in", 1), HookPoint("mlp_out_normed", 1)
    state, log = train.fit(model, windows, reads, config, writes=writes, batch_rows=64,
                           sequences=4, buffer_rows=512, log_every=10, show_progress=False)
    assert log.explained_variance[-1] > log.explained_variance[0]
    transcoder = train.to_dictionary(state, config, reads, writes)
    assert transcoder.kind == "transcoder" and transcoder.d_out == 32


def test_fit_refuses_bad_arguments_before_any_work(tiny_setup):
    from interp.features import HookPoint

    model, windows = tiny_setup
    config = TrainConfig(width=64, k=4, total_steps=10_000)
    with pytest.raises(ValueError, match="b_dec_init must be geometric_median, mean or zeros"):
        train.fit(model, windows, HookPoint("resid_post", 1), config, b_dec_init="median")
    with pytest.raises(ValueError, match="the corpus ran out after"):
        train.fit(model, windows, HookPoint("resid_post", 1), config, batch_rows=64,
                  sequences=4, buffer_rows=512, show_progress=False)


def _train_command(tmp_path, monkeypatch, *extra):
    from factories import gguf_arrays, gguf_config, write_tiny_gguf
    from gemma_eqx.cli import main

    monkeypatch.setenv("GEMMA_EQX_CACHE", str(tmp_path / "cache"))
    config = gguf_config("gemma3").replace(vocab_size=320)
    gguf = write_tiny_gguf(tmp_path / "digits.gguf", config, gguf_arrays(config),
                           arch="gemma3", digits=True)
    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(6):  # a folder of .txt files: one document each
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(list("0123456789"), 3000)))
    return main(["features", "train", "--model", str(gguf), "--corpus", str(corpus),
                 "--length", "16", "--sequences", "4", "--batch-rows", "64",
                 "--buffer-rows", "512", "--eval-windows", "8", *extra])


def test_the_train_command_writes_a_folder_the_loaders_read(tmp_path, monkeypatch, capsys):
    import json

    from interp.features import HookPoint, load_dictionary

    out = tmp_path / "trained"
    assert _train_command(tmp_path, monkeypatch, "--site", "resid_post", "--layer", "1",
                          "--architecture", "topk", "--width", "32", "--k", "4",
                          "--tokens", "1280", "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors",
                                                      "training.json", "training.png"]
    loaded = load_dictionary(out)
    assert (loaded.reads, loaded.width, loaded.activation, loaded.k) == (
        HookPoint("resid_post", 1), 32, "topk", 4)
    report = json.loads((out / "training.json").read_text())
    assert report["tokens"] == 1280 and report["log"]["steps"][-1] == 20
    assert report["held_out"]["l0"] <= 4 and "explained_variance" in report["held_out"]
    assert json.loads((out / "config.json").read_text())["training"]["architecture"] == "topk"
    assert "held out explained_variance" in capsys.readouterr().out
    # Run again into the same folder: the earlier result, all of it ours, is replaced.
    assert _train_command(tmp_path, monkeypatch, "--site", "resid_post", "--layer", "1",
                          "--architecture", "relu", "--width", "32", "--tokens", "640",
                          "--out", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors",
                                                      "training.json", "training.png"]
    assert load_dictionary(out).activation == "relu"
    assert json.loads((out / "training.json").read_text())["tokens"] == 640


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "{config}"], "unknown field(s) learning_rate; TrainConfig has"),
    (["--site", "pattern"], "site 'pattern' is not one of"),
    (["--site", "resid_mid"], "site resid_mid has no Hugging Face hook point"),
    (["--layer", "9"], "--layer 9: "),
    (["--tokens", "10"], "--tokens 10 is less than one step of --batch-rows 64"),
    (["--architecture", "gated"], "field 'architecture' must be one of"),
])
def test_the_train_command_refuses_bad_input_in_one_line(tmp_path, monkeypatch, capsys, args,
                                                         message):
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"learning_rate": 1e-3}))
    out = tmp_path / "trained"
    args = [a.replace("{config}", str(config)) for a in args]
    assert _train_command(tmp_path, monkeypatch, *args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def _fit(tiny_setup, **kwargs):
    from interp.features import HookPoint

    model, windows = tiny_setup
    config = TrainConfig(architecture="topk", width=64, k=4, lr=3e-3, total_steps=30,
                         dead_feature_window=5)
    arguments = dict(batch_rows=64, sequences=4, buffer_rows=512, log_every=5,
                     show_progress=False) | kwargs
    return train.fit(model, windows, HookPoint("resid_post", 1), config, **arguments)


def _interrupt_at(monkeypatch, call: int):
    real = train.train_step
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == call + 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "train_step", interrupted)
    return real


def _same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_setup, tmp_path,
                                                                 monkeypatch):
    baseline, baseline_log = _fit(tiny_setup)
    folder = tmp_path / "checkpoints"
    real = _interrupt_at(monkeypatch, 16)  # Ctrl-C (or SIGTERM) inside step 16
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_setup, checkpoints=folder, checkpoint_every=10)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000010", "step_000000016"]
    monkeypatch.setattr(train, "train_step", real)
    resumed, log = _fit(tiny_setup, checkpoints=folder, checkpoint_every=10)
    _same_params(resumed, baseline)
    assert log.steps == baseline_log.steps and log.l0 == baseline_log.l0
    # Another run's arguments: refused, by name, before any work.
    with pytest.raises(ValueError, match=r"step_000000030: it was made by a run with other "
                                         r"arguments \(batch_rows\)"):
        _fit(tiny_setup, checkpoints=folder, batch_rows=32)
    train.remove_checkpoints(folder)
    assert not folder.exists()


def test_a_damaged_checkpoint_is_named_and_the_one_before_used(tiny_setup, tmp_path,
                                                               monkeypatch):
    baseline, _ = _fit(tiny_setup)
    folder = tmp_path / "checkpoints"
    real = _interrupt_at(monkeypatch, 16)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_setup, checkpoints=folder, checkpoint_every=10)
    monkeypatch.setattr(train, "train_step", real)
    damaged = folder / "step_000000016"
    victim = sorted(p for p in damaged.rglob("*") if p.is_file() and p.suffix == ".npy")[0]
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match=r"checkpoint .*step_000000016 is damaged \(its files "
                                         r"do not match their checksums\)"):
        resumed, _ = _fit(tiny_setup, checkpoints=folder, checkpoint_every=10)
    _same_params(resumed, baseline)


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoints(
        tiny_setup, tmp_path, monkeypatch):
    real = train.train_step
    calls = []

    def poisoned(state, x, target, config):
        calls.append(1)
        if len(calls) == 7:
            x = x.at[3, 0].set(jnp.nan)
        return real(state, x, target, config)

    monkeypatch.setattr(train, "train_step", poisoned)
    folder = tmp_path / "checkpoints"
    with pytest.raises(train.TrainingStopped, match=r"the loss is nan at step 6 \(batch 6: "
                                                    r"rows 384-447"):
        _fit(tiny_setup, checkpoints=folder, checkpoint_every=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000004", "step_000000006"]


# --- The activation cache, normalisation, skip-transcoders, the mesh, evaluation ------------

def _write_cache(tiny_setup, folder, monkeypatch=None, stop_after=None, **kwargs):
    from interp.features import HookPoint, activations
    from interp.features.activations import write_activation_cache

    model, windows = tiny_setup
    if stop_after is not None:  # Ctrl-C after `stop_after` forward passes
        real = activations.stream_activations

        def stopping(*args, **kw):
            for i, item in enumerate(real(*args, **kw)):
                if i == stop_after:
                    raise KeyboardInterrupt
                yield item

        monkeypatch.setattr(activations, "stream_activations", stopping)
    points = [HookPoint("resid_post", 1), HookPoint("mlp_in", 1), HookPoint("mlp_out_normed", 1)]
    arguments = dict(sequences=4, flush_every=2, show_progress=False) | kwargs
    return write_activation_cache(model, windows, points, folder, **arguments)


def test_an_interrupted_cache_finishes_and_trains_to_the_streamed_parameters(
        tiny_setup, tmp_path, monkeypatch):
    from interp.features import HookPoint
    from interp.features.activations import open_activation_cache

    model, windows = tiny_setup
    folder = tmp_path / "activations"
    with pytest.raises(KeyboardInterrupt):
        _write_cache(tiny_setup, folder, monkeypatch, stop_after=5)
    with pytest.raises(ValueError, match=r"is unfinished \(5 of \d+ batches\): rerun"):
        open_activation_cache(folder)
    monkeypatch.undo()
    cache = _write_cache(tiny_setup, folder)
    assert cache.meta["complete"] and cache.meta["batches_written"] == cache.meta["batches"]
    # Every row is the one the model streams, in the same order.
    points = list(cache.points)
    for got, want in zip(cache.stream(points),
                         train.stream_activations(model, windows, points, sequences=4),
                         strict=False):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    # Training from it gives the bit-identical parameters of training from the model.
    config = TrainConfig(architecture="topk", width=64, k=4, lr=3e-3, total_steps=20)
    reads, writes = HookPoint("mlp_in", 1), HookPoint("mlp_out_normed", 1)
    arguments = dict(writes=writes, batch_rows=64, sequences=4, buffer_rows=512,
                     show_progress=False)
    streamed, _ = train.fit(model, windows, reads, config, **arguments)
    cached, log = train.fit(None, cache, reads, config, **arguments)
    _same_params(cached, streamed)
    assert log.seconds_model > 0
    with pytest.raises(ValueError, match=r"holds resid_post of layer 1, mlp_in of layer 1, "
                                         r"mlp_out_normed of layer 1, not attn_out of layer 1"):
        train.fit(None, cache, HookPoint("attn_out", 1), config, **arguments)


def test_a_cache_checks_its_files_and_refuses_what_it_did_not_write(tiny_setup, tmp_path):
    import fcntl
    import json
    import os

    from interp.features.activations import open_activation_cache

    folder = tmp_path / "activations"
    cache = _write_cache(tiny_setup, folder, rows=200)
    # Other arguments into the same folder: refused by name, the cache untouched.
    before = (folder / "meta.json").read_text()
    with pytest.raises(ValueError, match=r"was made with other arguments \(batches\)"):
        _write_cache(tiny_setup, folder, rows=400)
    assert (folder / "meta.json").read_text() == before
    # A folder holding someone else's files.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"holds files that are not an activation cache "
                                         r"\(mine.txt\)"):
        _write_cache(tiny_setup, other)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    # A second writer while one holds the folder.
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ValueError, match="is being written by another process"):
            _write_cache(tiny_setup, folder, rows=200)
    finally:
        os.close(fd)
    # Fields and files checked before a row is read.
    meta = json.loads(before)
    for change, message in (
            ({"format": "npy"}, r"field 'format' is 'npy'"),
            ({"batches_written": "all"}, r"field 'batches_written' must be an integer"),
            ({"rows_per_batch": 7}, r"field 'rows_per_batch' \(7\) is not sequences x"),
            ({"points": [["pattern", 1]] * 3}, r"field 'points': .*site 'pattern' is not one of"),
            ({"batches": cache.meta["batches"] + 1}, r"resid_post.1.npy: holds float32 "
                                                     r"\(\d+, 32\); meta.json says float32")):
        (folder / "meta.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=message):
            open_activation_cache(folder)
    (folder / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json: not a readable JSON file"):
        open_activation_cache(folder)
    with pytest.raises(ValueError, match="is not an activation cache"):
        open_activation_cache(tmp_path)


def test_normalised_training_is_folded_into_the_exported_transcoder(tiny_setup):
    from interp.features import HookPoint

    model, windows = tiny_setup
    config = TrainConfig(architecture="jumprelu", width=64, lr=3e-3, total_steps=15,
                         l0_coefficient=1e-3, normalize_activations="expected_average_only_in",
                         skip_connection=True)
    reads, writes = HookPoint("mlp_in", 1), HookPoint("mlp_out_normed", 1)
    state, _ = train.fit(model, windows, reads, config, writes=writes, batch_rows=64,
                         sequences=4, buffer_rows=512, show_progress=False)
    x, target = (np.concatenate(a) for a in zip(*itertools.islice(
        train.stream_activations(model, windows, [reads, writes], sequences=4), 4),
        strict=True))
    # The factors make the mean norm sqrt(d) on a sample of the stream (this one: close).
    for scale, rows in ((state.input_scale, x), (state.target_scale, target)):
        mean_norm = float(np.linalg.norm(rows * float(scale), axis=-1).mean())
        assert abs(mean_norm / 32**0.5 - 1) < 0.2, mean_norm
    assert float(state.input_scale) != float(state.target_scale)
    dictionary = train.to_dictionary(state, config, reads, writes)
    assert dictionary.kind == "skip-transcoder"
    # In the site's units, the exported dictionary computes what training computed.
    _, out = train.train_step(state, jnp.asarray(x), jnp.asarray(target), config)
    np.testing.assert_allclose(np.asarray(dictionary.encode(jnp.asarray(x))),
                               np.asarray(out.feature_acts), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dictionary(jnp.asarray(x))),
                               np.asarray(out.sae_out) / float(state.target_scale),
                               rtol=1e-4, atol=1e-4 * float(np.abs(target).max()))


def test_a_skip_transcoder_saves_as_gemma_scope_2_and_loads_back(tiny_setup, tmp_path):
    from interp.features import HookPoint, load_gemma_scope_2
    from interp.features.load import save_gemma_scope_2

    config = TrainConfig(architecture="jumprelu", width=16, total_steps=3,
                         skip_connection=True)
    params = train.init_params(config, 32, 32, key=jax.random.key(1))
    params = eqx.tree_at(lambda p: p.w_skip, params,
                         jax.random.normal(jax.random.key(2), (32, 32)))
    state = train.init_state(config, params, input_scale=2.0, target_scale=0.5)
    d = train.to_dictionary(state, config, HookPoint("mlp_in", 1),
                            HookPoint("mlp_out_normed", 1))
    loaded = load_gemma_scope_2(save_gemma_scope_2(d, tmp_path / "skip"))
    x = jax.random.normal(jax.random.key(3), (5, 32))
    assert loaded.kind == "skip-transcoder"
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(d(x)), rtol=1e-6, atol=1e-6)
    # x @ w_skip in the site's units: trained on 2x, predicting 0.5 y -> w_skip * 2 / 0.5
    np.testing.assert_allclose(np.asarray(loaded.w_skip), np.asarray(params.w_skip) * 4,
                               rtol=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "batchtopk"])
def test_a_mesh_trains_the_parameters_one_device_does(tiny_setup, architecture):
    from interp.features import HookPoint

    model, windows = tiny_setup
    assert jax.device_count() == 8  # tests/conftest.py simulates eight
    config = TrainConfig(architecture=architecture, width=64, k=4, lr=3e-3, total_steps=12,
                         l0_coefficient=1e-3, dead_feature_window=3)
    arguments = dict(batch_rows=64, sequences=4, buffer_rows=512, show_progress=False)
    point = HookPoint("resid_post", 1)
    one, _ = train.fit(model, windows, point, config, **arguments)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    spread, _ = train.fit(model, windows, point, config, mesh=mesh, **arguments)
    assert spread.params.w_enc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len(spread.params.w_dec.addressable_shards) == 8
    assert spread.params.w_dec.addressable_shards[0].data.shape == (16, 32)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(spread),
                    strict=True):
        # float32 sums split over devices add in another order: 1e-5 of each value
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_a_width_or_batch_the_mesh_does_not_divide_is_refused_before_any_work(tiny_setup):
    from interp.features import HookPoint

    model, windows = tiny_setup
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ValueError, match=r"^width 66 does not divide over the mesh's 'model' "
                                         r"axis of 4 devices; pick a multiple of 4$"):
        train.fit(model, windows, HookPoint("resid_post", 1),
                  TrainConfig(width=66, k=4), mesh=mesh, show_progress=False)
    with pytest.raises(ValueError, match=r"^batch_rows 63 does not divide over the mesh's "
                                         r"'data' axis of 2 devices"):
        train.fit(model, windows, HookPoint("resid_post", 1), TrainConfig(width=64, k=4),
                  batch_rows=63, mesh=mesh, show_progress=False)


def test_the_train_command_from_a_cache_with_evaluations_every_n_steps(tmp_path, monkeypatch,
                                                                       capsys):
    import json

    from safetensors.numpy import load_file

    from gemma_eqx.cli import main

    common = ["--site", "mlp_in", "--writes", "mlp_out_normed", "--layer", "1",
              "--architecture", "topk", "--width", "32", "--k", "4", "--tokens", "640"]
    streamed = tmp_path / "streamed"
    assert _train_command(tmp_path, monkeypatch, *common, "--out", str(streamed)) == 0
    cache = tmp_path / "activations"
    gguf = tmp_path / "digits.gguf"
    assert main(["features", "cache", "--model", str(gguf), "--corpus", str(tmp_path / "corpus"),
                 "--length", "16", "--sequences", "4", "--tokens", "2000",
                 "--points", "mlp_in:1,mlp_out_normed:1", "--out", str(cache)]) == 0
    cached = tmp_path / "cached"
    assert _train_command(tmp_path, monkeypatch, *common, "--cache", str(cache),
                          "--eval-every", "4", "--mesh", "2x4", "--out", str(cached)) == 0
    # The same parameters, from the cache on eight devices as from the model on one.
    theirs, ours = load_file(streamed / "params.safetensors"), load_file(
        cached / "params.safetensors")
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5)
    report = json.loads((cached / "training.json").read_text())
    assert [e["step"] for e in report["log"]["evaluations"]] == [4, 8, 10]
    assert set(report["log"]["evaluations"][0]) == {
        "step", "tokens", "l0", "explained_variance", "ce_loss_recovered",
        "dead_fraction_held_out"}
    assert (cached / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reading the cache" in capsys.readouterr().out
    # A cache of other windows is refused before training.
    assert _train_command(tmp_path, monkeypatch, *common, "--cache", str(cache), "--length",
                          "12", "--out", str(tmp_path / "other")) == 2
    assert "was made from other windows" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    # A site the cache does not hold: refused by name.
    assert _train_command(tmp_path, monkeypatch, "--site", "resid_post", "--layer", "1",
                          "--cache", str(cache), "--out", str(tmp_path / "other")) == 2
    assert ("holds mlp_in of layer 1, mlp_out_normed of layer 1, not resid_post of layer 1"
            in capsys.readouterr().err)


def test_resampling_resets_only_dead_latents_toward_the_rows_reconstructed_worst():
    config = TrainConfig(architecture="relu", width=2000, total_steps=10,
                         dead_feature_window=2, resample_every=5)
    x = jax.random.normal(jax.random.key(1), (8, 16)) * jnp.arange(1, 9)[:, None]
    state = train.init_state(config, train.init_params(config, 16, key=jax.random.key(0)))
    state, _ = train.train_step(state, x, None, config)  # Adam's moments now non-zero
    dead = np.arange(2000) % 3 == 0
    state = eqx.tree_at(lambda s: s.since_fired, state, jnp.where(dead, 3.0, 0.0))
    new = train.resample_dead(state, x, None, config, jax.random.key(2))
    old_p, new_p = state.params, new.params
    # Live latents: bit for bit.
    np.testing.assert_array_equal(np.asarray(new_p.w_dec)[~dead], np.asarray(old_p.w_dec)[~dead])
    np.testing.assert_array_equal(np.asarray(new_p.w_enc)[:, ~dead],
                                  np.asarray(old_p.w_enc)[:, ~dead])
    np.testing.assert_array_equal(np.asarray(new_p.b_enc)[~dead], np.asarray(old_p.b_enc)[~dead])
    # Dead ones: a unit decoder row along a row of the batch, the encoder column along it at
    # 0.2 x the live columns' mean norm, bias 0, counters and Adam's moments at 0.
    rows = np.asarray(x) / np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
    w_dec = np.asarray(new_p.w_dec)[dead]
    drawn = np.abs(w_dec @ rows.T).argmax(1)
    np.testing.assert_allclose(w_dec, rows[drawn], atol=1e-6)
    live_norm = np.linalg.norm(np.asarray(old_p.w_enc)[:, ~dead], axis=0).mean()
    np.testing.assert_allclose(np.asarray(new_p.w_enc)[:, dead].T, 0.2 * live_norm * rows[drawn],
                               rtol=1e-5, atol=1e-7)
    assert not np.asarray(new_p.b_enc)[dead].any() and not np.asarray(new.since_fired)[dead].any()
    moments = [n for n in jax.tree_util.tree_leaves(
        new.opt_state, is_leaf=lambda n: isinstance(n, TrainParams))
        if isinstance(n, TrainParams)]
    assert len(moments) == 2  # Adam's mu and nu
    for m in moments:
        assert not np.asarray(m.w_dec)[dead].any() and np.asarray(m.w_dec)[~dead].any()
    # Rows are drawn in proportion to their squared error (667 draws: within 0.05 each).
    _, out = train._forward(old_p, x, x, config, jnp.asarray(dead, jnp.float32),
                            jnp.asarray(1.0))
    error = np.asarray(((out.sae_out - x) ** 2).sum(-1))
    np.testing.assert_allclose(np.bincount(drawn, minlength=8) / dead.sum(),
                               error / error.sum(), atol=0.05)
