"""Gemma Scope 2's hook points on the real Gemma 3 270M: the site each dictionary folder maps
to holds what Hugging Face's forward holds at the module its config names (input or output,
by forward hooks on transformers' own model of the same GGUF), and a dictionary of each hook
point, in Gemma Scope 2's layout, spliced with its error term changes no logit (beyond what
any edit at that site does to XLA's fusion of the rest of the forward)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import interp
from gemma_eqx.model.sites import feature_site
from interp.features import splice
from interp.features.load import load_dictionary

pytestmark = pytest.mark.slow

LAYERS = (5, 12)
# Gemma Scope 2's hook points (`hf_hook_point_in`), the module and whether it is read at its
# input or output.
POINTS = {
    "model.layers.{L}.output": ("", "output"),
    "model.layers.{L}.self_attn.o_proj.input": ("self_attn.o_proj", "input"),
    "model.layers.{L}.post_feedforward_layernorm.output": ("post_feedforward_layernorm",
                                                          "output"),
    "model.layers.{L}.pre_feedforward_layernorm.output": ("pre_feedforward_layernorm", "output"),
    "model.layers.{L}.post_attention_layernorm.output": ("post_attention_layernorm", "output"),
}


@pytest.fixture(scope="module")
def text(gemma270m):
    _, tokenizer = gemma270m
    tokens, _ = tokenizer.encode_batch(["The quick brown fox jumps over the lazy dog, and then "
                                        "it sleeps in the warm afternoon sun."])
    return tokens


@pytest.fixture(scope="module")
def hf_activations(hf270m, text):
    import torch

    layers = hf270m.model.layers
    seen = {}
    handles = []
    for template, (module, where) in POINTS.items():
        for layer in LAYERS:
            target = layers[layer]
            for part in filter(None, module.split(".")):
                target = getattr(target, part)
            key = template.format(L=layer)
            if where == "input":
                handles.append(target.register_forward_pre_hook(
                    lambda m, args, key=key: seen.__setitem__(key, args[0].detach().numpy())))
            else:
                handles.append(target.register_forward_hook(
                    lambda m, args, out, key=key: seen.__setitem__(
                        key, (out[0] if isinstance(out, tuple) else out).detach().numpy())))
    with torch.no_grad():
        hf270m(torch.tensor(np.asarray(text)))
    for h in handles:
        h.remove()
    return seen


def _gemma_scope_2_folder(root, point: str, width: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    folder = root / point.replace(".", "_")
    folder.mkdir(parents=True)
    transcoder = "pre_feedforward" in point
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
              "hf_hook_point_in": point}
    if transcoder:
        config["hf_hook_point_out"] = point.replace("pre_feedforward", "post_feedforward")
    save_file({"w_enc": (rng.normal(size=(d, width)) * d ** -0.5).astype(np.float32),
               "b_enc": np.zeros(width, np.float32),
               "w_dec": (rng.normal(size=(width, 640 if transcoder else d)) * 0.1).astype(
                   np.float32),
               "b_dec": np.zeros(640 if transcoder else d, np.float32),
               "threshold": np.full(width, 0.05, np.float32)}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_each_hook_point_reads_what_hugging_face_holds_there(gemma270m, text, hf_activations,
                                                              tmp_path):
    model, _ = gemma270m
    clean = interp.run(model, text)
    scale = float(jnp.abs(clean).max())
    points = [(template.format(L=layer), layer) for template in POINTS for layer in LAYERS]
    dictionaries = [load_dictionary(_gemma_scope_2_folder(
        tmp_path / str(layer), point, 64, 1024 if "o_proj" in point else 640, layer))
        for point, layer in points]
    # Every hook point of both layers read by one capture ...
    _, cache = interp.capture(model, text, sites=sorted({d.reads.site for d in dictionaries}),
                              layers=list(LAYERS))
    for (point, layer), d in zip(points, dictionaries, strict=True):
        ours = np.asarray(cache[d.reads.site, layer])
        theirs = hf_activations[point]
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), (point, d.reads)
    # ... and spliced together, each with its error term, in two groups: the transcoders write
    # mlp_out_normed, where an SAE also sits. Their features recorded (the encoders run) and
    # scaled by 1 (the decoders run: each site becomes x + (f * 1 - f) @ W_dec), the logits
    # are the model's to 1e-5 of their scale (30): any edit at a site, even x * 1, makes XLA
    # fuse the rest of the forward otherwise, which alone moved them by up to 7e-5 at these
    # sites one dictionary at a time, and by 7.2e-5 and 7.7e-5 for the two groups (measured).
    for transcoders in (False, True):
        group = [d for d in dictionaries if (d.kind != "sae") == transcoders]
        sites = sorted({feature_site(d.reads.site) for d in group})
        edited = splice(model, group)
        for site in sites:
            edited = interp.scale(edited, site, 1.0, layers=list(LAYERS))
        for variant in (splice(model, group), edited):
            spliced, features = interp.capture(variant, text, sites=sites, layers=list(LAYERS))
            for site in sites:
                for layer in LAYERS:
                    assert features[site, layer].shape == (*text.shape, 64)
            moved = float(jnp.abs(spliced - clean).max())
            print(f"{len(group)} dictionaries, transcoders {transcoders}: largest logit change "
                  f"spliced with the error terms {moved:.2g}")
            assert moved <= 1e-5 * scale, (transcoders, moved)
