"""Writes the SAELens reference fixture of tests/test_features.py (run in a virtual environment
with `sae-lens==6.54.12` and the CPU torch 2.13.0, never in the package's own):

    python3 -m venv /tmp/saelens && /tmp/saelens/bin/pip install torch==2.13.0 \
        && /tmp/saelens/bin/pip install -c <(echo torch==2.13.0) sae-lens==6.54.12
    /tmp/saelens/bin/python tests/data/make_saelens_reference.py

For each case it makes a small dictionary with random weights, saves it in its published
layout (SAELens' `save_model`; Gemma Scope 2's `params.safetensors` + `config.json`; Gemma
Scope 1's `params.npz` under a path naming its repository), loads it back through SAELens' own
loader (Gemma Scope's Hub loaders pointed at the local files), and records on fixed inputs
what SAELens computes: the feature activations, the reconstruction and its evaluation metrics
(`sae_lens.evals.get_sparsity_and_variance_metrics`, fed the same activations through a
stand-in model and activation store). Outputs: tests/data/dictionaries/ (the folders) and
tests/data/saelens_reference.npz / .json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import sae_lens
import torch
from sae_lens import SAE, evals
from sae_lens.loading import pretrained_sae_loaders as loaders
from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
from safetensors.numpy import save_file

HERE = Path(__file__).parent
OUT = HERE / "dictionaries"
D_IN, WIDTH, BATCHES, BATCH, SEQ = 16, 24, 2, 3, 5
BOS = 0


def random_weights(rng, d_in, width, d_out, threshold=True, skip=False):
    w = dict(W_enc=rng.normal(size=(d_in, width)) * 0.4, b_enc=rng.normal(size=width) * 0.3,
             W_dec=rng.normal(size=(width, d_out)) * 0.3, b_dec=rng.normal(size=d_out) * 0.2)
    if threshold:
        w["threshold"] = np.abs(rng.normal(size=width)) * 0.3
    if skip:
        w["W_skip"] = rng.normal(size=(d_out, d_in)) * 0.2
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in w.items()}


SAELENS_CASES = {
    # name: (architecture, extra config, d_out, hook, hook out)
    "standard-b-dec-in": ("standard", dict(apply_b_dec_to_input=True), None,
                          "blocks.1.hook_resid_post", None),
    "jumprelu": ("jumprelu", dict(apply_b_dec_to_input=False), None,
                 "blocks.0.hook_mlp_out", None),
    "topk": ("topk", dict(k=5, apply_b_dec_to_input=True), None, "blocks.1.hook_resid_pre",
             None),
    "layer-norm": ("standard", dict(normalize_activations="layer_norm",
                                    apply_b_dec_to_input=True), None,
                   "blocks.2.hook_resid_mid", None),
    "z": ("jumprelu", dict(apply_b_dec_to_input=False, reshape_activations="none"), None,
          "blocks.1.attn.hook_z", None),
    "transcoder": ("transcoder", dict(apply_b_dec_to_input=False), 12,
                   "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
    "jumprelu-skip-transcoder": ("jumprelu_skip_transcoder", dict(apply_b_dec_to_input=False),
                                 D_IN, "blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out"),
}


def saelens_case(name, rng):
    architecture, extra, d_out, hook, hook_out = SAELENS_CASES[name]
    cfg = dict(architecture=architecture, d_in=D_IN, d_sae=WIDTH, dtype="float32",
               device="cpu", metadata=dict(hook_name=hook, model_name="tiny-gemma-eqx"), **extra)
    if d_out is not None:
        cfg["d_out"] = d_out
        cfg["metadata"]["hook_name_out"] = hook_out
    config_cls = SAE.get_sae_config_class_for_architecture(architecture)
    config = config_cls.from_dict(cfg)
    sae = SAE.get_sae_class_for_architecture(architecture)(config)
    weights = random_weights(rng, D_IN, WIDTH, d_out or D_IN,
                             threshold=architecture.startswith("jumprelu"),
                             skip="skip" in architecture)
    sae.load_state_dict(weights, strict=True)
    folder = OUT / "saelens" / name
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_model(folder)
    return SAE.load_from_disk(folder), folder


def gemma_scope_2(name, rng, monkey):
    """A folder in Gemma Scope 2's layout, loaded by SAELens' `gemma_3_sae_huggingface_loader`
    (its Hub reads pointed at the local files)."""
    transcoder = "transcoder" in name
    folder_name = ("transcoder/layer_1_width_16k_l0_small_affine" if transcoder
                   else "resid_post/layer_2_width_16k_l0_small")
    folder = OUT / "gemma-scope-2" / folder_name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    w = {k: v.numpy() for k, v in random_weights(rng, D_IN, WIDTH, D_IN).items()}
    params = {"w_enc": w["W_enc"], "b_enc": w["b_enc"], "w_dec": w["W_dec"],
              "b_dec": w["b_dec"], "threshold": w["threshold"]}
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
              "hf_hook_point_in": "model.layers.2.output", "width": WIDTH}
    if transcoder:
        params["affine_skip_connection"] = rng.normal(size=(D_IN, D_IN)).astype(np.float32) * .2
        config.update(hf_hook_point_in="model.layers.1.pre_feedforward_layernorm.output",
                      hf_hook_point_out="model.layers.1.post_feedforward_layernorm.output",
                      affine_connection=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
              folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    monkey(folder.parent.parent)
    cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt",
                                                            folder_name)
    cfg = handle_config_defaulting(cfg)  # as SAE.from_pretrained does
    sae = SAE.get_sae_class_for_architecture(cfg["architecture"])(
        SAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg))
    sae.load_state_dict(state, strict=True)
    return sae, folder


def gemma_scope_1(rng, monkey, kind="res"):
    """A `params.npz` under a path naming its repository, loaded by SAELens'
    `gemma_2_sae_huggingface_loader` (`kind` "res") or `gemma_2_transcoder_huggingface_loader`
    ("transcoders"; sizes overridden: the real ones are 2304 x 16k)."""
    repo = OUT / "gemma-scope-1" / f"gemma-scope-2b-pt-{kind}"
    folder_name = "layer_1/width_16k/average_l0_5"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / folder_name).mkdir(parents=True)
    w = {k: v.numpy() for k, v in random_weights(rng, D_IN, WIDTH, D_IN).items()}
    np.savez(repo / folder_name / "params.npz", W_enc=w["W_enc"], W_dec=w["W_dec"],
             b_enc=w["b_enc"], b_dec=w["b_dec"], threshold=w["threshold"])
    monkey(repo)
    sizes = {"d_in": D_IN, "d_sae": WIDTH}
    if kind == "transcoders":
        sizes["d_out"] = D_IN
        cfg, state, _ = loaders.gemma_2_transcoder_huggingface_loader(
            "google/gemma-scope-2b-pt-transcoders", folder_name, cfg_overrides=sizes)
    else:
        cfg, state, _ = loaders.gemma_2_sae_huggingface_loader(
            "google/gemma-scope-2b-pt-res", folder_name, cfg_overrides=sizes)
    cfg = handle_config_defaulting(cfg)  # as SAE.from_pretrained does
    sae = SAE.get_sae_class_for_architecture(cfg["architecture"])(
        SAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg))
    sae.load_state_dict(state, strict=True)
    return sae, repo / folder_name


class _Store:
    """Stands in for SAELens' ActivationsStore: batch i's "tokens" (with BOS at position 0)."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def get_batch_tokens(self, n):
        self.i += 1
        return self.tokens[self.i - 1]


class _Model:
    """Stands in for a HookedTransformer: its cache holds the given activations."""

    def __init__(self, hook, activations):
        self.hook, self.activations, self.i = hook, activations, 0

    def run_with_cache(self, tokens, **kwargs):
        self.i += 1
        x = self.activations[self.i - 1]
        if self.hook.endswith("hook_z"):  # [batch, seq, heads, head_dim]: SAELens flattens
            x = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
        return None, {self.hook: x}


def metrics(sae, x, tokens):
    hook = sae.cfg.metadata.hook_name
    scaler = evals.ActivationScaler() if hasattr(evals, "ActivationScaler") else None
    if scaler is None:
        from sae_lens.training.activation_scaler import ActivationScaler
        scaler = ActivationScaler()
    scalars, per_feature = evals.get_sparsity_and_variance_metrics(
        sae, _Model(hook, [torch.tensor(b) for b in x]), _Store([torch.tensor(t) for t in tokens]),
        scaler, n_batches=len(x), compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=BATCH, model_kwargs={}, ignore_tokens=[BOS])
    return {**scalars, "feature_density": per_feature["feature_density"]}


def main():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    real_download = loaders.hf_hub_download

    def monkey(root):
        def download(repo_id=None, filename=None, subfolder=None, **kwargs):
            path = Path(root) / (f"{subfolder}/{filename}" if subfolder else filename)
            return str(path)

        def shapes(repo_id, filename):
            from safetensors import safe_open
            with safe_open(str(Path(root) / filename), "np") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

        loaders.hf_hub_download = download
        loaders.get_safetensors_tensor_shapes = shapes

    arrays, summary = {}, {"sae_lens": sae_lens.__version__, "cases": {}}
    cases = [(name, *saelens_case(name, rng)) for name in SAELENS_CASES]
    cases += [(name, *gemma_scope_2(name, rng, monkey)) for name in
              ("gemma-scope-2-sae", "gemma-scope-2-transcoder")]
    cases.append(("gemma-scope-1-res", *gemma_scope_1(rng, monkey)))
    # Added later, with its own random stream so the earlier cases' arrays stay as they were.
    cases.append(("gemma-scope-1-transcoder",
                  *gemma_scope_1(np.random.default_rng(1), monkey, "transcoders")))
    loaders.hf_hub_download = real_download
    tokens = rng.integers(1, 50, size=(BATCHES, BATCH, SEQ))
    tokens[:, :, 0] = BOS
    for name, sae, folder in cases:
        x = rng.normal(size=(BATCHES, BATCH, SEQ, D_IN)).astype(np.float32) * 1.5 + 0.3
        with torch.no_grad():
            features = sae.encode(torch.tensor(x))
            recon = sae(torch.tensor(x))  # forward: a skip-transcoder adds its skip term
        arrays[f"{name}/x"] = x
        arrays[f"{name}/features"] = features.numpy()
        arrays[f"{name}/reconstruction"] = recon.numpy()
        arrays[f"{name}/tokens"] = tokens
        case = {"folder": str(folder.relative_to(HERE)), "class": type(sae).__name__}
        # SAELens evaluates against the input hook's activations: an SAE's metrics only.
        if "Transcoder" not in type(sae).__name__:
            case["metrics"] = metrics(sae, x, tokens)
        summary["cases"][name] = case
    np.savez_compressed(HERE / "saelens_reference.npz", **arrays)
    (HERE / "saelens_reference.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("wrote", len(cases), "cases")


if __name__ == "__main__":
    main()
