"""Experiment 8 of the study (`gemma-eqx induction --dictionary`): the latents of an SAE that
fire on the second occurrence of a repeated digit and what ablating them costs, against an
independent computation (numpy over a capture; one plain forward per ablation), and the
command end to end on a tiny model with a dictionary folder in Gemma Scope 2's layout."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import interp
from factories import CharTokenizer, varied_model
from gemma_eqx.cli import main
from gemma_eqx.model.sites import feature_site
from interp import analyses
from interp.features import HookPoint, SparseDictionary, splice
from interp.study import digit_task
from interp.study.features import feature_experiment

WIDTH = 32


@pytest.fixture(scope="module")
def model():
    return varied_model("gemma3")


def _arrays(model, seed=0):
    c = model.config
    d_in = c.num_heads * c.head_dim  # Gemma Scope's attn_out: the o_proj input
    rng = np.random.default_rng(seed)
    return {"w_enc": rng.normal(size=(d_in, WIDTH)) * 0.4, "b_enc": rng.normal(size=WIDTH) * .1,
            "w_dec": rng.normal(size=(WIDTH, d_in)) * 0.3, "b_dec": rng.normal(size=d_in) * .1,
            "threshold": np.abs(rng.normal(size=WIDTH)) * 0.05}


def _sae(model, layer):
    a = {k: jnp.asarray(v, jnp.float32) for k, v in _arrays(model).items()}
    point = HookPoint("mixed_values_flat", layer)
    return SparseDictionary(a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"],
                            None, "jumprelu", None, point, point, name="test-attn-sae")


def test_the_experiment_against_numpy_and_plain_ablations(model):
    task = digit_task(model, CharTokenizer(), period=6, strings=3, seed=1)
    d = _sae(model, 1)
    out = feature_experiment(model, task, d, [(1, 0), (2, 3)], count=4)
    site = feature_site("mixed_values_flat")
    spliced = splice(model, d)
    _, cache = interp.capture(spliced, task.tokens, sites=[site], layers=[1])
    acts = np.asarray(cache[site, 1], np.float64)
    first, second = acts[:, 1:7].mean(axis=(0, 1)), acts[:, 7:13].mean(axis=(0, 1))
    expected = np.argsort(-(second - first), kind="stable")[:4]
    assert [f.latent for f in out.latents] == expected.tolist()
    assert (out.site, out.layer, out.width, out.head_layers) == (site, 1, WIDTH, (1, 2))
    mask = interp.knockout_mask(model)
    plain = analyses.knockout_eval(model, task.tokens, mask, task.eval_mask)
    # the spliced model with its error term is the model: its metric is the model's
    assert out.baseline_logprob == pytest.approx(float(np.mean(plain.logprob)), rel=1e-5)
    for f in out.latents:
        assert f.first == pytest.approx(first[f.latent], rel=1e-5, abs=1e-7)
        assert f.second == pytest.approx(second[f.latent], rel=1e-5, abs=1e-7)
        assert f.fires_second == pytest.approx((acts[:, 7:13, f.latent] > 0).mean())
        one = analyses.knockout_eval(interp.ablate(spliced, site, layers=[1], heads=[f.latent]),
                                     task.tokens, mask, task.eval_mask)
        # the sweep batches the ablations: float32 rounding of a few ulps
        assert f.ablated_logprob == pytest.approx(float(np.mean(one.logprob)), rel=1e-5,
                                                  abs=1e-5)
        assert f.ablated_accuracy == pytest.approx(float(np.mean(one.accuracy)))
    every = analyses.knockout_eval(
        interp.ablate(spliced, site, layers=[1], heads=[f.latent for f in out.latents]),
        task.tokens, mask, task.eval_mask)
    assert out.all_ablated_logprob == pytest.approx(float(np.mean(every.logprob)), rel=1e-5,
                                                    abs=1e-5)
    assert out.all_ablated_logprob != pytest.approx(out.baseline_logprob, abs=1e-4)


def test_a_transcoder_is_refused(model):
    task = digit_task(model, CharTokenizer(), period=6, strings=2, seed=1)
    d = _sae(model, 1)
    reads = HookPoint("mlp_in", 1)
    c = model.config
    transcoder = SparseDictionary(jnp.zeros((c.embed_dim, 4)), jnp.zeros(4),
                                  jnp.zeros((4, c.embed_dim)), jnp.zeros(c.embed_dim), None,
                                  None, "relu", None, reads, HookPoint("mlp_out_normed", 1))
    with pytest.raises(ValueError, match="takes an SAE .* is a transcoder from"):
        feature_experiment(model, task, transcoder, [(1, 0)])
    with pytest.raises(ValueError, match="count must be >= 1"):
        feature_experiment(model, task, d, [(1, 0)], count=0)


def _scope2_folder(model, root, layer):
    """An SAE in Gemma Scope 2's layout at Gemma Scope's attn_out of `layer`."""
    folder = root / "attn_out" / f"layer_{layer}_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in _arrays(model).items()},
              folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "tiny3",
        "hf_hook_point_in": f"model.layers.{layer}.self_attn.o_proj.input"}))
    return folder


@pytest.fixture
def tiny_pretrained(model, monkeypatch):
    import gemma_eqx.formats.pretrained as pretrained

    monkeypatch.setattr(pretrained, "from_pretrained", lambda name: (model, CharTokenizer()))
    monkeypatch.setenv("GEMMA_EQX_NO_COMPILE_CACHE", "1")


STUDY = ["--period", "6", "--strings", "2", "--top", "2", "--residual-stride", "2"]


def test_the_command_adds_experiment_8(tmp_path, tiny_pretrained, model, capsys, monkeypatch):
    import interp.features.load as load

    folder = _scope2_folder(model, tmp_path / "hub", 0)
    for layer in (1, 2):
        _scope2_folder(model, tmp_path / "hub", layer)
    out = tmp_path / "report"
    # A Hub id with a folder template: the folder of the top induction head's layer.
    monkeypatch.setattr(load, "_download", lambda repo, folder: tmp_path / "hub")
    assert main(["induction", *STUDY, "--latents", "3", "--dictionary", "someone/tiny-scope",
                 "--dictionary-folder", "attn_out/layer_{layer}_width_16k_l0_small",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    top_layer = report["scores"]["ranked"][0]["layer"]
    features = report["features"]
    assert features["layer"] == top_layer and len(features["latents"]) == 3
    assert f"attn_out/layer_{top_layer}_width_16k_l0_small" in printed.err
    assert "features (features@mixed_values_flat of layer" in printed.out
    assert "features" in report["timings"]
    assert "8. Features of a sparse dictionary" in (out / "report.html").read_text()
    # A local folder; without --dictionary no experiment 8
    assert main(["induction", *STUDY, "--dictionary", str(folder), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["features"]["layer"] == 0
    assert main(["induction", *STUDY, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["features"] is None


@pytest.mark.parametrize("args, message", [
    (["--dictionary-folder", "attn_out/layer_{layer}"], "--dictionary-folder needs "
     "--dictionary"),
    (["--dictionary", "a/b", "--dictionary-folder", "x/{width}"], r"only '\{layer\}' is "
     r"replaced; got \{width\}"),
    (["--dictionary", "a/b", "--dictionary-folder", "x/{layer"], "--dictionary-folder "
     "'x/{layer': "),
    (["--latents", "0"], "--latents must be >= 1; got 0"),
])
def test_bad_dictionary_options_exit_2_before_any_work(tmp_path, tiny_pretrained, capsys, args,
                                                        message):
    out = tmp_path / "report"
    assert main(["induction", *STUDY, *args, "--out", str(out)]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_a_dictionary_of_another_width_is_refused_before_the_study(tmp_path, tiny_pretrained,
                                                                    capsys):
    folder = tmp_path / "scope" / "resid_post" / "layer_1_width_16k_l0_small"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"w_enc": rng.normal(size=(48, 8)).astype(np.float32),
               "b_enc": np.zeros(8, np.float32), "w_dec": np.zeros((8, 48), np.float32),
               "b_dec": np.zeros(48, np.float32), "threshold": np.zeros(8, np.float32)},
              folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "hf_hook_point_in": "model.layers.1.output"}))
    out = tmp_path / "report"
    assert main(["induction", *STUDY, "--dictionary", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "48" in err and "capturing attention" not in err
    assert not out.exists()
