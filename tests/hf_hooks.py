"""Exact edge patching in transformers' eager PyTorch Gemma (1, 2, 3), with torch hooks: the
independent reference of `interp.circuits` (tests/test_circuits.py, tests/test_patching_hf.py).

For an edge `s -> r`, only `r`'s input changes, by `delta = (what s sends r when patched) -
(what it sends clean)`:
- `input`: the corrupted embedding minus the clean one (the input of HF's layer 0);
- head `a{l}.h{i}`: `post_norm(o_proj(z'))` - `post_norm(o_proj(z))`, where `z` is the input of
  layer l's `o_proj` on the clean run and `z'` the same with head i's slice taken from the
  corrupted run (Gemma 2 and 3 norm the layer's heads together after `o_proj`);
- MLP `m{l}`: its output (after the post-FFW norm) corrupted minus clean.
The clean run is then repeated with `r`'s input moved by `delta`: the query, key or value
projection's output slice of that head recomputed from `input_layernorm(x + delta)` (`x` the
clean input of r's layer), or `delta` added to the input of the pre-MLP norm or of the final
norm.
"""

from __future__ import annotations

import numpy as np
import torch


def _record(hf, tokens):
    """What the reference needs of one run: each layer's input, each `o_proj` input, each
    MLP's output after its post-norm."""
    layers, gemma1 = hf.model.layers, not hasattr(hf.model.layers[0], "post_feedforward_layernorm")
    out = {"x": {}, "z": {}, "mlp": {}}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: out["x"].__setitem__(
                i, (args[0] if args else kwargs["hidden_states"]).clone()), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: out["z"].__setitem__(i, args[0].clone())))
        after = layer.mlp if gemma1 else layer.post_feedforward_layernorm
        handles.append(after.register_forward_hook(
            lambda m, args, o, i=i: out["mlp"].__setitem__(i, o.clone())))
    with torch.no_grad():
        hf(torch.tensor(np.asarray(tokens)))
    for h in handles:
        h.remove()
    return out


def record_pair(hf, clean, corrupted) -> tuple[dict, dict]:
    """What `edge_patched_metric` reads of the clean and the corrupted run (record once for
    many edges)."""
    return _record(hf, clean), _record(hf, corrupted)


def edge_patched_metric(hf, clean, corrupted, sender: str, receiver: str, metric,
                        records: tuple[dict, dict] | None = None) -> float:
    """`metric(hf, clean tokens)` with the one edge `sender -> receiver` patched (module
    docstring); `records` from `record_pair`, or recorded here."""
    a, b = records or record_pair(hf, clean, corrupted)
    layers = hf.model.layers
    gemma1 = not hasattr(layers[0], "post_feedforward_layernorm")
    hd = hf.config.head_dim
    with torch.no_grad():
        if sender == "input":
            delta = b["x"][0] - a["x"][0]
        elif sender.startswith("m"):
            delta = b["mlp"][int(sender[1:])] - a["mlp"][int(sender[1:])]
        else:
            layer, head = int(sender[1:].split(".")[0]), int(sender.split(".h")[1])
            attn = layers[layer]
            sends = lambda z: z if gemma1 else attn.post_attention_layernorm(z)  # noqa: E731
            mixed = a["z"][layer].clone()
            mixed[..., head * hd:(head + 1) * hd] = b["z"][layer][..., head * hd:(head + 1) * hd]
            project = attn.self_attn.o_proj
            delta = sends(project(mixed)) - sends(project(a["z"][layer]))
    if receiver == "logits":
        module, hook = hf.model.norm, "pre"
    elif receiver.endswith("<in>"):
        layer = layers[int(receiver[1:].split("<")[0])]
        module, hook = (layer.post_attention_layernorm if gemma1
                        else layer.pre_feedforward_layernorm), "pre"
    else:
        index = int(receiver[1:].split(".")[0])
        kind = receiver[-2]
        unit = int(receiver.split(".")[1][1 if kind == "q" else 2:].split("<")[0])
        layer = layers[index]
        module = getattr(layer.self_attn, f"{kind}_proj")
        x = a["x"][index] + delta

        def hook_fn(m, args, out):
            out = out.clone()
            with torch.no_grad():  # the module's own linear map, without its hook
                new = torch.nn.functional.linear(layer.input_layernorm(x), m.weight, m.bias)
            out[..., unit * hd:(unit + 1) * hd] = new[..., unit * hd:(unit + 1) * hd]
            return out
        hook = None
    if hook == "pre":
        handle = module.register_forward_pre_hook(lambda m, args: (args[0] + delta,))
    else:
        handle = module.register_forward_hook(hook_fn)
    try:
        with torch.no_grad():
            return metric(hf, torch.tensor(np.asarray(clean)))
    finally:
        handle.remove()
