"""Sparse dictionaries (`interp.features`): each published format against SAELens 6.54.12 (the
fixture of tests/data/make_saelens_reference.py: SAELens' own loaders, activations,
reconstructions and metrics), splicing with and without the error term on every hook point,
features as sites (patching against numpy, gradients against finite differences, steering,
no recompilation for new values), and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interp
from factories import varied_model
from gemma_eqx.core.checks import NonFiniteError
from gemma_eqx.model.sites import feature_site
from interp import patching
from interp.features import (
    CrossLayerTranscoder,
    HookPoint,
    SparseDictionary,
    feature_gradients,
    splice,
)
from interp.features.evaluate import ReconstructionStats, evaluate
from interp.features.load import load_dictionary

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "saelens_reference.json").read_text())
ARRAYS = np.load(DATA / "saelens_reference.npz")
# float32 on both sides, the same operations in another order.
RTOL, ATOL = 1e-5, 1e-6

# What each case's config says it reads and writes, as our sites.
EXPECTED_POINTS = {
    "standard-b-dec-in": ("resid_post", 1, "resid_post", 1),
    "jumprelu": ("mlp_out_normed", 0, "mlp_out_normed", 0),
    "topk": ("resid_pre", 1, "resid_pre", 1),
    "layer-norm": ("resid_mid", 2, "resid_mid", 2),
    "z": ("mixed_values_flat", 1, "mixed_values_flat", 1),
    "transcoder": ("mlp_in", 1, "mlp_out_normed", 1),
    "jumprelu-skip-transcoder": ("mlp_in", 2, "mlp_out_normed", 2),
    "gemma-scope-2-sae": ("resid_post", 2, "resid_post", 2),
    "gemma-scope-2-transcoder": ("mlp_in", 1, "mlp_out_normed", 1),
    "gemma-scope-1-res": ("resid_post", 1, "resid_post", 1),
    "gemma-scope-1-transcoder": ("mlp_in", 1, "mlp_out_normed", 1),
}


@pytest.fixture(params=sorted(REFERENCE["cases"]))
def case(request):
    name = request.param
    entry = REFERENCE["cases"][name]
    return name, entry, load_dictionary(DATA / entry["folder"])


def test_each_format_reads_its_hook_point(case):
    name, _, d = case
    site_in, layer_in, site_out, layer_out = EXPECTED_POINTS[name]
    assert (d.reads, d.writes) == (HookPoint(site_in, layer_in), HookPoint(site_out, layer_out))
    expected_kind = "sae" if "transcoder" not in name else (
        "skip-transcoder" if "skip" in name or "gemma-scope-2" in name else "transcoder")
    assert d.kind == expected_kind


def test_activations_and_reconstructions_equal_saelens(case):
    name, _, d = case
    x = ARRAYS[f"{name}/x"]
    features = np.asarray(d.encode(jnp.asarray(x)))
    np.testing.assert_allclose(features, ARRAYS[f"{name}/features"], rtol=RTOL, atol=ATOL)
    # the same latents fire (not only close values): a threshold is a hard decision
    np.testing.assert_array_equal(features != 0, ARRAYS[f"{name}/features"] != 0)
    assert 0 < (features != 0).mean() < 1, name
    recon = np.asarray(d(jnp.asarray(x)))
    np.testing.assert_allclose(recon, ARRAYS[f"{name}/reconstruction"], rtol=RTOL, atol=ATOL)


def test_metrics_equal_saelens(case):
    name, entry, d = case
    if "metrics" not in entry:
        pytest.skip("SAELens evaluates transcoders against their input: no reference")
    x, tokens = ARRAYS[f"{name}/x"], ARRAYS[f"{name}/tokens"]
    stats = ReconstructionStats(d.width)
    for batch, ids in zip(x, tokens, strict=True):
        features = d.encode(jnp.asarray(batch))
        stats.add(batch, d.decode(features, jnp.asarray(batch)), features, ids != 0)
    ours, theirs = stats.summary(), entry["metrics"]
    for key in ("l0", "l1", "mse", "explained_variance", "explained_variance_legacy", "cossim",
                "l2_ratio", "relative_reconstruction_bias"):
        assert ours[key] == pytest.approx(theirs[key], rel=RTOL, abs=ATOL), key
    np.testing.assert_allclose(ours["density"], theirs["feature_density"], rtol=RTOL)
    assert ours["tokens"] == int((tokens != 0).sum())


@pytest.mark.skipif(not os.environ.get("SAELENS_PYTHON"),
                    reason="SAELENS_PYTHON names no interpreter with sae-lens 6.54.12")
def test_the_fixture_is_what_saelens_computes(tmp_path):
    """Reruns the fixture's script with SAELens (the interpreter in SAELENS_PYTHON) and
    compares with the committed fixture."""
    shutil.copy(DATA / "make_saelens_reference.py", tmp_path)
    subprocess.run([os.environ["SAELENS_PYTHON"], str(tmp_path / "make_saelens_reference.py")],
                   check=True, capture_output=True)
    fresh = np.load(tmp_path / "saelens_reference.npz")
    for key in ARRAYS.files:
        np.testing.assert_allclose(fresh[key], ARRAYS[key], rtol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- splicing


@pytest.fixture(scope="module")
def model():
    return varied_model("gemma3")  # 3 layers, post-norms: every hook point differs


def _dictionary(model, reads, writes, *, activation="jumprelu", skip=False, seed=0, width=40):
    rng = np.random.default_rng(seed)
    c = model.config
    size = lambda site: c.num_heads * c.head_dim if site == "mixed_values_flat" else c.embed_dim  # noqa: E731
    d_in, d_out = size(reads.site), size(writes.site)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return SparseDictionary(
        f32(rng.normal(size=(d_in, width)) * 0.4), f32(rng.normal(size=width) * 0.2),
        f32(rng.normal(size=(width, d_out)) * 0.2), f32(rng.normal(size=d_out) * 0.1),
        f32(np.abs(rng.normal(size=width)) * 0.2) if activation == "jumprelu" else None,
        f32(rng.normal(size=(d_in, d_out)) * 0.1) if skip else None,
        activation, 4 if activation == "topk" else None, reads, writes, name=f"test-{reads}")


@pytest.fixture(scope="module")
def tokens(model):
    return jnp.asarray(np.random.default_rng(3).integers(1, model.config.vocab_size, (2, 11)))


POINTS = [("resid_post", 1), ("mixed_values_flat", 0), ("attn_out_normed", 2), ("mlp_in", 1),
          ("mlp_out_normed", 0), ("resid_pre", 2), ("attn_out", 1), ("mlp_out", 2)]


@pytest.mark.parametrize("site, layer", POINTS)
def test_an_sae_with_its_error_term_changes_nothing(model, tokens, site, layer):
    point = HookPoint(site, layer)
    d = _dictionary(model, point, point, activation="topk" if layer == 2 else "jumprelu")
    clean = interp.run(model, tokens)
    np.testing.assert_allclose(interp.run(splice(model, d), tokens), clean, rtol=0, atol=1e-5)
    # without it, the reconstruction alone: the logits move
    assert float(jnp.abs(interp.run(splice(model, d, error=False), tokens) - clean).max()) > 1e-2


def test_transcoders_and_a_cross_layer_transcoder_with_errors_change_nothing(model, tokens):
    c = model.config
    clean = interp.run(model, tokens)
    transcoder = _dictionary(model, HookPoint("mlp_in", 1), HookPoint("mlp_out_normed", 1),
                             skip=True)
    rng = np.random.default_rng(1)
    layers, width = c.num_layers, 20
    clt = CrossLayerTranscoder(
        jnp.asarray(rng.normal(size=(layers, c.embed_dim, width)) * 0.4, jnp.float32),
        jnp.zeros((layers, width)), jnp.full((layers, width), 0.1),
        tuple(jnp.asarray(rng.normal(size=(width, layers - i, c.embed_dim)) * 0.2, jnp.float32)
              for i in range(layers)), jnp.zeros((layers, c.embed_dim)), "jumprelu", None,
        "mlp_in", "mlp_out_normed")
    for d in (transcoder, clt):
        np.testing.assert_allclose(interp.run(splice(model, d), tokens), clean, atol=1e-5)
        assert float(jnp.abs(interp.run(splice(model, d, error=False), tokens) - clean).max()) \
            > 1e-2


def test_a_cross_layer_transcoder_writes_the_sum_of_its_layers_decoders(model, tokens):
    """Without the error term, the MLP output written into each layer is, in numpy, the sum
    over earlier layers of their features through their decoders."""
    c = model.config
    rng = np.random.default_rng(2)
    layers, width = c.num_layers, 12
    w_enc = rng.normal(size=(layers, c.embed_dim, width)).astype(np.float32) * 0.4
    w_dec = [rng.normal(size=(width, layers - i, c.embed_dim)).astype(np.float32) * 0.2
             for i in range(layers)]
    b_dec = rng.normal(size=(layers, c.embed_dim)).astype(np.float32) * 0.1
    clt = CrossLayerTranscoder(jnp.asarray(w_enc), jnp.zeros((layers, width)), None,
                               tuple(map(jnp.asarray, w_dec)), jnp.asarray(b_dec), "relu",
                               None, "mlp_in", "mlp_out_normed")
    spliced = splice(model, clt, error=False)
    _, cache = interp.capture(spliced, tokens, sites=["mlp_in", "mlp_out_normed"])
    inputs = [np.asarray(cache["mlp_in", i]) for i in range(layers)]
    features = [np.maximum(x @ w_enc[i], 0) for i, x in enumerate(inputs)]
    for target in range(layers):
        expected = b_dec[target] + sum(features[s] @ w_dec[s][:, target - s]
                                       for s in range(target + 1))
        np.testing.assert_allclose(np.asarray(cache["mlp_out_normed", target]), expected,
                                   rtol=1e-5, atol=1e-5)


def test_features_are_sites_patched_as_numpy_says(model, tokens):
    """Patching latents 0-9 of the features at resid_post 1 from row 1 into row 0: the stream
    there becomes x + (f' - f) @ W_dec (numpy), and the logits those of the model with the
    stream set to that value."""
    point = HookPoint("resid_post", 1)
    d = _dictionary(model, point, point)
    spliced = splice(model, d)
    site = feature_site("resid_post")
    _, cache = interp.capture(spliced, tokens, sites=[site, "resid_post"], layers=[1])
    f = np.asarray(cache[site, 1])
    x = np.asarray(cache["resid_post", 1])
    # the features recorded are the dictionary's of the stream (numpy)
    pre = x @ np.asarray(d.w_enc) + np.asarray(d.b_enc)
    np.testing.assert_allclose(f, np.where(pre > np.asarray(d.threshold), pre, 0), rtol=1e-5,
                               atol=1e-5)
    donor = np.broadcast_to(f[1:2], f.shape).copy()
    weight = np.zeros(f.shape, np.float32)  # per unit: [batch, seq, latents]
    weight[0, :, :10] = 1  # row 0, latents 0-9
    patched_features = np.where(weight > 0, donor, f)
    edited = interp.add_interventions(spliced, {1: interp.Replace(
        site, value=jnp.asarray(donor), weight=jnp.asarray(weight))})
    _, after = interp.capture(edited, tokens, sites=["resid_post"], layers=[1])
    expected = x + (patched_features - f) @ np.asarray(d.w_dec)
    np.testing.assert_allclose(np.asarray(after["resid_post", 1]), expected, rtol=1e-5,
                               atol=1e-5)
    direct = interp.add_interventions(model, {1: interp.Replace("resid_post",
                                                                value=jnp.asarray(expected))})
    np.testing.assert_allclose(interp.run(edited, tokens), interp.run(direct, tokens),
                               rtol=1e-5, atol=1e-5)


def test_steering_a_latent_adds_its_decoder_row(model, tokens):
    point = HookPoint("mlp_out_normed", 2)
    d = _dictionary(model, point, point)
    spliced = splice(model, d)
    _, before = interp.capture(spliced, tokens, sites=["mlp_out_normed"], layers=[2])
    steered = interp.steer(spliced, feature_site("mlp_out_normed"), jnp.eye(d.width)[7],
                           coefficient=3.0, layers=[2], positions=[4])
    _, after = interp.capture(steered, tokens, sites=["mlp_out_normed"], layers=[2])
    delta = np.asarray(after["mlp_out_normed", 2] - before["mlp_out_normed", 2])
    expected = np.zeros_like(delta)
    expected[:, 4] = 3.0 * np.asarray(d.w_dec[7])
    np.testing.assert_allclose(delta, expected, atol=1e-5)


def test_latents_are_the_units_of_a_feature_site(model, tokens):
    """Zero-ablating chosen latents (`heads=`, and per-unit weights `[batch, seq, latents]`)
    removes exactly their decoder rows from the site, against numpy."""
    point = HookPoint("resid_post", 1)
    d = _dictionary(model, point, point)
    spliced = splice(model, d)
    site = feature_site("resid_post")
    _, clean = interp.capture(spliced, tokens, sites=["resid_post", site], layers=[1])
    acts = np.asarray(clean[site, 1], np.float64)
    w_dec = np.asarray(d.w_dec, np.float64)
    chosen = [int(i) for i in np.argsort(-(acts != 0).sum(axis=(0, 1)))[:3]]
    expected = np.asarray(clean["resid_post", 1], np.float64) - acts[..., chosen] @ w_dec[chosen]
    by_index = interp.ablate(spliced, site, layers=[1], heads=chosen)
    weights = np.ones((*tokens.shape, d.width), np.float32)
    weights[..., chosen] = 0
    by_weight = interp.scale(spliced, site, jnp.asarray(weights), layers=[1])
    for ablated in (by_index, by_weight):
        _, after = interp.capture(ablated, tokens, sites=["resid_post"], layers=[1])
        # float32 sums of ~40 terms of size ~1: a few ulps of the stream's scale
        np.testing.assert_allclose(np.asarray(after["resid_post", 1]), expected, atol=2e-5)
    with pytest.raises(ValueError, match="head 40 is out of range for site features@resid_post "
                       "with 40 latents"):
        interp.run(interp.ablate(spliced, site, layers=[1], heads=[40]), tokens)


def test_feature_gradients_match_finite_differences(model, tokens):
    point = HookPoint("resid_post", 0)
    d = _dictionary(model, point, point, width=16)
    spliced = splice(model, d)
    metric = patching.logit_difference([5, 6], [7, 8], [9, 10])
    total, features, grads = feature_gradients(spliced, tokens, metric)
    key = "blocks.0.features@resid_post"
    assert grads[key].shape == features[key].shape == (2, 11, 16)
    attribution = np.asarray(features[key] * grads[key])  # activation x gradient
    assert np.abs(attribution).max() > 0
    at = jnp.broadcast_to(jnp.asarray([9, 10]), (2, 2))

    def value(delta):
        edited = interp.add_interventions(spliced, {0: interp.Add(feature_site("resid_post"),
                                                                  value=delta)})
        return float(metric(interp.run(edited, tokens, logits_at=at)).sum())

    eps = 1e-2
    for b, s, latent in ((0, 3, 2), (1, 8, 11), (0, 9, 5)):
        bump = np.zeros((2, 11, 16), np.float32)
        bump[b, s, latent] = eps
        numeric = (value(jnp.asarray(bump)) - value(jnp.asarray(-bump))) / (2 * eps)
        assert float(grads[key][b, s, latent]) == pytest.approx(numeric, rel=2e-2, abs=1e-3)
    assert float(total) == pytest.approx(value(jnp.zeros((2, 11, 16))), rel=1e-5)


def test_new_feature_values_do_not_recompile(model, tokens):
    point = HookPoint("resid_post", 1)
    spliced = splice(model, _dictionary(model, point, point))
    traces = []

    @eqx.filter_jit
    def forward(m, t):
        traces.append(1)
        return m(t)

    outputs = []
    for scale in (0.0, 2.0):
        scaled = interp.scale(spliced, feature_site("resid_post"), scale, layers=[1])
        outputs.append(forward(scaled, tokens))
    assert len(traces) == 1
    assert float(jnp.abs(outputs[0] - outputs[1]).max()) > 1e-3
    # new dictionary weights of the same shapes: no recompile either
    other = splice(model, _dictionary(model, point, point, seed=5))
    forward(interp.scale(other, feature_site("resid_post"), 1.0, layers=[1]), tokens)
    assert len(traces) == 1


def test_gradients_reach_the_dictionary(model, tokens):
    point = HookPoint("resid_post", 1)
    d = _dictionary(model, point, point)

    def loss(dictionary):
        return splice(model, dictionary, error=False)(tokens).sum()

    grads = eqx.filter_grad(loss)(d)
    assert float(jnp.abs(grads.w_dec).max()) > 0 and float(jnp.abs(grads.w_enc).max()) > 0


def test_evaluation_on_the_model(model, tokens):
    """Spliced CE and KL against numpy on the logits; zero ablation worse than the SAE."""
    point = HookPoint("resid_post", 1)
    d = _dictionary(model, point, point)
    result = evaluate(model, d, [tokens], ignore_tokens=[int(tokens[0, 0])])
    logits = np.asarray(interp.run(model, tokens), np.float64)
    spliced = np.asarray(interp.run(splice(model, d, error=False), tokens), np.float64)
    keep = np.asarray(tokens) != int(tokens[0, 0])

    def ce(lg):
        logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - lg.max(-1, keepdims=True)
        nll = -np.take_along_axis(logp[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
        return nll[keep[:, :-1]].mean(), logp

    clean_ce, p = ce(logits)
    spliced_ce, q = ce(spliced)
    kl = (np.exp(p) * (p - q)).sum(-1)[keep].mean()
    assert result.ce_loss_clean == pytest.approx(clean_ce, rel=1e-5)
    assert result.ce_loss_spliced == pytest.approx(spliced_ce, rel=1e-5)
    assert result.kl_spliced == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert result.tokens == int(keep.sum())
    assert result.density.shape == (d.width,) and result.dead + result.dense <= d.width


def test_a_sharded_dictionary_computes_what_one_device_does(model, tokens):
    from gemma_eqx.parallel.sharding import default_mesh
    from interp.features import shard_dictionary

    point = HookPoint("resid_post", 1)
    d = _dictionary(model, point, point, width=48)
    sharded = shard_dictionary(d, default_mesh())
    assert len(sharded.w_enc.sharding.device_set) == len(jax.devices())
    assert sharded.w_enc.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    np.testing.assert_allclose(interp.run(splice(model, sharded, error=False), tokens),
                               interp.run(splice(model, d, error=False), tokens), atol=1e-5)


# ------------------------------------------------------------------------------ bad input


def _copy(case: str, tmp_path) -> Path:
    source = DATA / REFERENCE["cases"][case]["folder"]
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_a_dictionary_for_another_width_is_refused(model):
    d = load_dictionary(DATA / REFERENCE["cases"]["jumprelu"]["folder"])  # 16 wide; model 32
    with pytest.raises(ValueError, match=r"width 16 at site mlp_out_normed, which is 32 wide "
                                         r"in tiny3: the dictionary was made for another model"):
        splice(model, d)


def test_a_dictionary_for_another_model_size_is_refused():
    import dataclasses

    from factories import random_model, shrink

    small = random_model(shrink("gemma3-270m", name="gemma3-270m-shrunk", num_layers=2))
    point = HookPoint("resid_post", 1)
    d = dataclasses.replace(_dictionary(small, point, point), model_name="google/gemma-3-1b-pt")
    with pytest.raises(ValueError, match=r"made for google/gemma-3-1b-pt, not "
                                         r"gemma3-270m-shrunk"):
        splice(small, d)
    splice(small, dataclasses.replace(d, model_name="google/gemma-3-270m-pt"))  # fits


def test_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a dictionary folder: .* it holds weights.bin"):
        load_dictionary(tmp_path)


def test_a_missing_file_is_named(tmp_path):
    folder = _copy("gemma-scope-2-sae", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json is missing"):
        load_dictionary(folder)


def test_an_unknown_hook_point_is_refused(tmp_path):
    folder = _copy("jumprelu", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.0.attn.hook_pattern"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cfg.json: hook_name 'blocks.0.attn.hook_pattern' is "
                                         r"not a hook this library maps to a site"):
        load_dictionary(folder)
    folder = _copy("gemma-scope-2-sae", tmp_path / "2")
    config = json.loads((folder / "config.json").read_text())
    config["hf_hook_point_in"] = "model.layers.2.self_attn.q_proj.output"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hf_hook_point_in 'model.layers.2.self_attn.q_proj."
                                         r"output' is not a hook point"):
        load_dictionary(folder)


def _rewrite(folder: Path, change) -> None:
    from safetensors.numpy import save_file

    from gemma_eqx.formats.hf import read_safetensors

    path = folder / "params.safetensors"
    tensors = read_safetensors(path)
    change(tensors)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def test_nan_weights_are_named(tmp_path):
    folder = _copy("gemma-scope-2-sae", tmp_path)
    _rewrite(folder, lambda t: t["w_dec"].__setitem__((3, 5), np.nan))
    with pytest.raises(NonFiniteError, match=r"params.safetensors: tensor 'w_dec' holds nan at "
                                             r"index \(3, 5\)"):
        load_dictionary(folder)


def test_a_threshold_of_the_wrong_shape_is_refused(tmp_path):
    folder = _copy("gemma-scope-2-sae", tmp_path)
    _rewrite(folder, lambda t: t.__setitem__("threshold", t["threshold"][:-1].copy()))
    with pytest.raises(ValueError, match=r"threshold has shape \(23,\); a width of 24 needs "
                                         r"\(24,\)"):
        load_dictionary(folder)


def test_an_offline_hub_id_says_what_to_download(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from gemma_eqx.formats.hub import ModelUnavailableError

    def offline(*args, **kwargs):
        raise errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelUnavailableError, match=r"cannot reach the Hugging Face Hub to "
                       r"download google/gemma-scope-2-270m-pt.* run `hf download "
                       r"google/gemma-scope-2-270m-pt --include 'resid_post/layer_5_width_16k_"
                       r"l0_small/\*'`"):
        load_dictionary("google/gemma-scope-2-270m-pt", "resid_post/layer_5_width_16k_l0_small")


def test_a_transcoder_reading_after_it_writes_is_refused(model):
    d = _dictionary(model, HookPoint("mlp_out_normed", 1), HookPoint("mlp_in", 1))
    with pytest.raises(ValueError, match=r"reads mlp_out_normed, which the block computes after "
                                         r"mlp_in"):
        splice(model, d)


def test_two_dictionaries_on_one_site_are_refused(model):
    point = HookPoint("resid_post", 1)
    with pytest.raises(ValueError, match=r"another dictionary already writes resid_post of layer "
                                         r"1"):
        splice(model, [_dictionary(model, point, point), _dictionary(model, point, point, seed=1)])

