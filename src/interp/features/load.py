"""Sparse dictionaries from their published folders: Gemma Scope 2 (`params.safetensors` +
`config.json`), Gemma Scope 1 (`params.npz`) and SAELens (`cfg.json` +
`sae_weights.safetensors`), local or from the Hugging Face Hub.

The hook point comes from the dictionary's own config (Gemma Scope 2's Hugging Face module
names, SAELens' TransformerLens names) or, for Gemma Scope 1, from its repository's name and
folder; it is mapped to our site (`HOOKS` below: two of Gemma Scope's points are not the sites
of the same name). Everything is checked before an array is built: the files, each tensor's
name, shape and finiteness, the activation and its parameters.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gemma_eqx.core.checks import NonFiniteError
from gemma_eqx.formats.hub import ModelUnavailableError

from .dictionary import HookPoint, SparseDictionary, check_arrays

# Hugging Face module hook points (Gemma Scope 2's `hf_hook_point_in/out`) -> our sites.
_HF_HOOKS = {
    "": "resid_post",                                  # model.layers.L.output
    "self_attn.o_proj.input": "mixed_values_flat",     # Gemma Scope's "attn_out"
    "self_attn.output": "attn_out",
    "post_attention_layernorm.output": "attn_out_normed",
    "pre_feedforward_layernorm.output": "mlp_in",      # transcoders' input
    "mlp.input": "mlp_in",
    "mlp.output": "mlp_out",
    "post_feedforward_layernorm.output": "mlp_out_normed",  # Gemma Scope's "mlp_out"
}
_HF_HOOK = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)"
                      r"(?:\.(.+))?$")

# TransformerLens hook names (SAELens' `hook_name`) -> our sites. TransformerLens' attn_out
# and mlp_out come after Gemma 2/3's post-norms (ours of those names before them), and
# SAELens' `hook_mlp_in` of Gemma Scope transcoders is the MLP's normed input.
TL_HOOKS = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post", "hook_attn_out": "attn_out_normed",
    "hook_mlp_out": "mlp_out_normed", "attn.hook_z": "mixed_values_flat",
    "hook_mlp_in": "mlp_in", "ln2.hook_normalized": "mlp_in", "mlp.hook_post": "mlp_hidden",
}
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Gemma Scope 1 repositories end in -res, -att or -mlp (and transcoders in -transcoders).
# Gemma Scope 1's repositories by suffix: (site read, site written). Its transcoders read the
# MLP's normed input and write the MLP's output after the post-MLP norm, as Gemma Scope 2's do.
_SCOPE1_SITES = {"res": ("resid_post", "resid_post"),
                 "att": ("mixed_values_flat", "mixed_values_flat"),
                 "mlp": ("mlp_out_normed", "mlp_out_normed"),
                 "transcoders": ("mlp_in", "mlp_out_normed")}


def hook_from_hf(point: Any, source: str, field: str) -> HookPoint:
    """Our hook point of a Hugging Face module hook point (`model.layers.5.output`)."""
    match = _HF_HOOK.match(point) if isinstance(point, str) else None
    module = (match.group(2) or "") if match else None
    if module == "output":
        module = ""
    elif module is not None and module not in _HF_HOOKS and module + ".output" in _HF_HOOKS:
        module += ".output"
    if module not in _HF_HOOKS:
        raise ValueError(f"{source}: {field} {point!r} is not a hook point this library maps "
                         f"to a site (model.layers.<L>[.{'|.'.join(k for k in _HF_HOOKS if k)}])")
    return HookPoint(_HF_HOOKS[module], int(match.group(1)))


def hook_from_tl(name: Any, source: str, field: str = "hook_name") -> HookPoint:
    """Our hook point of a TransformerLens hook name (`blocks.8.hook_resid_pre`)."""
    match = _TL_HOOK.match(name) if isinstance(name, str) else None
    if not match or match.group(2) not in TL_HOOKS:
        raise ValueError(f"{source}: {field} {name!r} is not a hook this library maps to a site "
                         f"(blocks.<L>.{', blocks.<L>.'.join(TL_HOOKS)})")
    return HookPoint(TL_HOOKS[match.group(2)], int(match.group(1)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(value).__name__}")
    return value


def _tensor(arrays: dict[str, np.ndarray], names: tuple[str, ...], source: Path,
            required: bool = True) -> np.ndarray | None:
    """The first of `names` in `arrays`, as float32, checked finite."""
    name = next((n for n in names if n in arrays), None)
    if name is None:
        if required:
            raise ValueError(f"{source}: no tensor {names[0]!r} (it holds "
                             f"{', '.join(sorted(arrays)) or 'nothing'})")
        return None
    value = np.asarray(arrays[name])
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
        raise ValueError(f"{source}: tensor {name!r} has dtype {value.dtype}; expected floats")
    value = value.astype(np.float32)
    bad = np.argwhere(~np.isfinite(value))
    if len(bad):
        raise NonFiniteError(f"{source}: tensor {name!r} holds {value[tuple(bad[0])]} at index "
                             f"{tuple(int(i) for i in bad[0])}")
    return value


def _dictionary(arrays: dict[str, np.ndarray], source: Path, *, activation: str,
                reads: HookPoint, writes: HookPoint, k: int | None = None,
                skip: tuple[str, ...] = (), skip_transposed: bool = False,
                subtract_decoder_bias: bool = False, dtype: Any = jnp.float32,
                names: dict[str, tuple[str, ...]], model_name: str | None = None,
                input_norm: str = "none") -> SparseDictionary:
    w_enc = _tensor(arrays, names["w_enc"], source)
    w_skip = _tensor(arrays, skip, source, required=False) if skip else None
    if w_skip is not None and skip_transposed:
        w_skip = w_skip.T
    threshold = _tensor(arrays, names["threshold"], source,
                        required=activation in ("jumprelu", "batchtopk"))
    if threshold is not None and activation in ("relu", "topk"):
        threshold = None
    if threshold is not None and np.ndim(threshold) == 0:
        # BatchTopK's one learned threshold, stored as a scalar
        threshold = np.full(np.shape(w_enc)[-1:], threshold, np.float32)
    leaves = dict(w_enc=w_enc, b_enc=_tensor(arrays, names["b_enc"], source),
                  w_dec=_tensor(arrays, names["w_dec"], source),
                  b_dec=_tensor(arrays, names["b_dec"], source), threshold=threshold,
                  w_skip=w_skip)
    check_arrays(str(source), leaves, activation, k, subtract_decoder_bias, input_norm)
    convert = {n: None if v is None else jnp.asarray(v, dtype) for n, v in leaves.items()}
    return SparseDictionary(**convert, activation=activation, k=k, reads=reads, writes=writes,
                            subtract_decoder_bias=subtract_decoder_bias, name=str(source),
                            input_norm=input_norm, model_name=model_name)


def load_gemma_scope_2(folder: str | os.PathLike, *, dtype: Any = jnp.float32
                       ) -> SparseDictionary:
    """A Gemma Scope 2 SAE or transcoder folder (`params.safetensors`, `config.json`)."""
    from gemma_eqx.formats.hf import read_safetensors

    folder = Path(folder)
    config_path, params = folder / "config.json", folder / "params.safetensors"
    for path in (config_path, params):
        if not path.is_file():
            raise ValueError(f"{folder}: a Gemma Scope 2 folder holds params.safetensors and "
                             f"config.json; {path.name} is missing")
    config = _read_json(config_path)
    architecture = config.get("architecture", "jump_relu")
    # Google's folders are JumpReLU; `interp.features.train` writes ReLU and TopK (with "k")
    # dictionaries in the same layout.
    activation = {"jump_relu": "jumprelu", "jumprelu": "jumprelu", "relu": "relu",
                  "topk": "topk"}.get(architecture) if isinstance(architecture, str) else None
    if activation is None:
        raise ValueError(f"{config_path}: architecture {architecture!r} is not a Gemma Scope "
                         f"2 activation this library reads (jump_relu, relu, topk)")
    k = config.get("k")
    if activation == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{config_path}: architecture 'topk' needs field 'k', a positive "
                         f"integer; got {k!r}")
    if "hf_hook_point_in" not in config:
        raise ValueError(f"{config_path}: no field 'hf_hook_point_in' (the hook point it reads)")
    reads = hook_from_hf(config["hf_hook_point_in"], str(config_path), "hf_hook_point_in")
    out = config.get("hf_hook_point_out")
    writes = reads if out is None else hook_from_hf(out, str(config_path), "hf_hook_point_out")
    arrays = read_safetensors(params)
    if config.get("affine_connection") and "affine_skip_connection" not in arrays:
        raise ValueError(f"{params}: config.json says affine_connection but the file has no "
                         f"tensor 'affine_skip_connection'")
    names = {"w_enc": ("w_enc",), "b_enc": ("b_enc",), "w_dec": ("w_dec",),
             "b_dec": ("b_dec",), "threshold": ("threshold",)}
    unknown = sorted(set(arrays) - {n for v in names.values() for n in v}
                     - {"affine_skip_connection"})
    if unknown:
        raise ValueError(f"{params}: tensor(s) {', '.join(unknown)} are not part of a Gemma "
                         f"Scope 2 dictionary")
    return _dictionary(arrays, params, activation=activation, reads=reads, writes=writes,
                       k=k if activation == "topk" else None,
                       skip=("affine_skip_connection",), dtype=dtype, names=names,
                       model_name=config.get("model_name"))


def hf_hook_point(point: HookPoint) -> str:
    """The Hugging Face module hook point of a site (Gemma Scope 2's `hf_hook_point_in`)."""
    for module, site in _HF_HOOKS.items():
        if site == point.site and module not in ("mlp.input",):
            return f"model.layers.{point.layer}" + (f".{module}" if module else ".output")
    raise ValueError(f"site {point.site} has no Hugging Face hook point; Gemma Scope 2's layout "
                     f"names one ({', '.join(sorted(set(_HF_HOOKS.values())))})")


GEMMA_SCOPE_2_FILES = ("params.safetensors", "config.json")


def check_writable_folder(folder: str | os.PathLike, names: Sequence[str]) -> Path:
    """`folder`, refused when it exists and holds anything but files named in `names` (what
    this program writes there, and may replace)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(
            p.name not in names for p in folder.iterdir())):
        raise ValueError(f"{folder} exists and holds files other than a Gemma Scope 2 "
                         f"dictionary's; choose a new or empty folder")
    return folder


def save_gemma_scope_2(dictionary: SparseDictionary, folder: str | os.PathLike, *,
                       extra: dict[str, Any] | None = None,
                       files: dict[str, str] | None = None,
                       binary: dict[str, bytes] | None = None) -> Path:
    """Write `dictionary` as a Gemma Scope 2 folder (`params.safetensors`, `config.json`;
    `extra` adds fields, e.g. the training config; `files` and `binary` more text and
    binary files beside them),
    atomically: a folder already there is replaced only when it holds such a dictionary (and
    those files). `load_gemma_scope_2` reads it back.
    ReLU and TopK dictionaries write `architecture` "relu" / "topk" (with `k`), BatchTopK its
    inference threshold as JumpReLU's; a subtracted decoder bias is folded into `b_enc`."""
    from safetensors.numpy import save_file

    from gemma_eqx.core.atomic import remove_partials, replace_directory

    d = dictionary
    if d.input_norm != "none":
        raise ValueError(f"{d.name}: a run-time input normalisation has no place in this "
                         f"writer's Gemma Scope 2 folders")
    files, binary = files or {}, binary or {}
    folder = check_writable_folder(folder, (*GEMMA_SCOPE_2_FILES, *files, *binary))
    config: dict[str, Any] = {
        "architecture": {"jumprelu": "jump_relu", "batchtopk": "jump_relu"}.get(
            d.activation, d.activation),
        "hf_hook_point_in": hf_hook_point(d.reads),
        "width": d.width, "model_name": d.model_name,
    }
    if d.writes != d.reads:
        config["hf_hook_point_out"] = hf_hook_point(d.writes)
    if d.activation == "topk":
        config["k"] = int(d.k)
    if d.w_skip is not None:
        config["affine_connection"] = True
    b_enc = np.asarray(d.b_enc, np.float32)
    if d.subtract_decoder_bias:  # (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc)
        b_enc = b_enc - np.asarray(d.b_dec, np.float32) @ np.asarray(d.w_enc, np.float32)
    arrays = {"w_enc": d.w_enc, "b_enc": b_enc, "w_dec": d.w_dec, "b_dec": d.b_dec}
    if d.threshold is not None:
        arrays["threshold"] = d.threshold
    if d.w_skip is not None:
        arrays["affine_skip_connection"] = d.w_skip
    arrays = {n: np.ascontiguousarray(np.asarray(a, np.float32)) for n, a in arrays.items()}
    config.update(extra or {})
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(folder)
    with replace_directory(folder) as new:
        new.mkdir()
        save_file(arrays, str(new / "params.safetensors"))
        (new / "config.json").write_text(json.dumps(config, indent=1))
        for name, text in files.items():
            (new / name).write_text(text)
        for name, data in binary.items():
            (new / name).write_bytes(data)
    return folder


def load_gemma_scope_1(path: str | os.PathLike, *, site: str | None = None,
                       layer: int | None = None, dtype: Any = jnp.float32) -> SparseDictionary:
    """A Gemma Scope 1 `params.npz` (or its folder): an SAE, or a transcoder (reads `mlp_in`,
    writes `mlp_out_normed`). Its kind comes from the repository's name in the path
    (`gemma-scope-2b-pt-res` / `-att` / `-mlp` / `-transcoders`) unless `site` (an SAE's site)
    is given, its layer from a `layer_<L>` folder unless `layer` is."""
    path = Path(path)
    params = path / "params.npz" if path.is_dir() else path
    if not params.is_file():
        raise ValueError(f"{path}: a Gemma Scope 1 dictionary is a params.npz file; none here")
    text = str(params.resolve())
    if site is None:
        kind = re.search(r"gemma-scope-[\w.-]+?-(res|att|mlp|transcoders)(?:[-/]|$)", text)
        if kind is None:
            raise ValueError(f"{params}: the path names no Gemma Scope 1 repository "
                             f"(gemma-scope-<size>-<pt|it>-res|att|mlp|transcoders): give "
                             f"site=")
        reads, writes = _SCOPE1_SITES[kind.group(1)]
    else:
        reads = writes = site
    if "embedding" in text:
        raise ValueError(f"{params}: Gemma Scope 1's embedding SAEs read the token embeddings "
                         f"(not a layer's site); they are not supported")
    if layer is None:
        found = re.findall(r"layer_(\d+)", text)
        if not found:
            raise ValueError(f"{params}: no layer_<L> folder in the path: give layer=")
        layer = int(found[-1])
    try:
        with np.load(params, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{params} is not a readable .npz file ({e})") from None
    scale = arrays.pop("scaling_factor", None)
    if scale is not None and not np.allclose(scale, 1.0):
        raise ValueError(f"{params}: a scaling_factor other than 1 is not supported")
    names = {f: (f.replace("w_", "W_"), f) for f in ("w_enc", "w_dec")}
    names.update({f: (f,) for f in ("b_enc", "b_dec", "threshold")})
    return _dictionary(arrays, params, activation="jumprelu", reads=HookPoint(reads, layer),
                       writes=HookPoint(writes, layer), dtype=dtype, names=names)


_SAELENS_ACTIVATIONS = {
    "standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
    "batchtopk": "batchtopk", "transcoder": "relu", "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu",
}
_SAELENS_NORMS = ("none", None, "expected_average_only_in", "layer_norm",
                  "constant_norm_rescale")


def load_saelens(folder: str | os.PathLike, *, dtype: Any = jnp.float32) -> SparseDictionary:
    """An SAELens folder (`cfg.json`, `sae_weights.safetensors`): standard (ReLU), JumpReLU,
    TopK, BatchTopK saved for inference, transcoders and skip-transcoders."""
    from gemma_eqx.formats.hf import read_safetensors

    folder = Path(folder)
    config_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise ValueError(f"{folder}: an SAELens folder holds cfg.json and "
                             f"sae_weights.safetensors; {path.name} is missing")
    cfg = _read_json(config_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    where = str(config_path)
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_ACTIVATIONS:
        raise ValueError(f"{where}: architecture {architecture!r} is not one this library "
                         f"reads ({', '.join(_SAELENS_ACTIVATIONS)})")
    activation = _SAELENS_ACTIVATIONS[architecture]
    norm = cfg.get("normalize_activations", "none")
    if norm not in _SAELENS_NORMS:
        raise ValueError(f"{where}: normalize_activations {norm!r} is not supported "
                         f"({', '.join(n for n in _SAELENS_NORMS if n)})")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{where}: rescale_acts_by_decoder_norm = true is not supported")
    if cfg.get("hook_head_index") is not None or meta.get("hook_head_index") is not None:
        raise ValueError(f"{where}: hook_head_index (one head's z) is not supported")
    hook = cfg.get("hook_name", meta.get("hook_name"))
    reads = hook_from_tl(hook, where)
    out = cfg.get("hook_name_out", meta.get("hook_name_out"))
    writes = reads if out is None else hook_from_tl(out, where, "hook_name_out")
    k = cfg.get("k")
    if activation == "topk" and (isinstance(k, bool) or not isinstance(k, int)):
        raise ValueError(f"{where}: a topk dictionary needs an integer k; got {k!r}")
    arrays = read_safetensors(weights)
    names = {"w_enc": ("W_enc",), "b_enc": ("b_enc",), "w_dec": ("W_dec",),
             "b_dec": ("b_dec",), "threshold": ("threshold",)}
    d = _dictionary(arrays, weights, activation=activation, reads=reads, writes=writes,
                    k=k if activation == "topk" else None, skip=("W_skip",),
                    skip_transposed=True, dtype=dtype, names=names,
                    subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True))
                    and reads == writes,
                    model_name=cfg.get("model_name", meta.get("model_name")),
                    input_norm="none" if norm in (None, "expected_average_only_in") else norm)
    for field, want in (("d_in", d.d_in), ("d_sae", d.width)):
        got = cfg.get(field)
        if got is not None and got != want:
            raise ValueError(f"{where}: {field} is {got}, but the weights make it {want}")
    return d


def load_dictionary(source: str | os.PathLike, folder: str | None = None, *,
                    dtype: Any = jnp.float32, **hints: Any) -> SparseDictionary:
    """A dictionary from a local folder (or `params.npz`) of any of the three formats, or from
    a Hugging Face repo id plus the folder inside it (downloaded once into the Hub cache).
    `hints` (`site=`, `layer=`) place a Gemma Scope 1 file whose path does not say."""
    path = Path(source)
    if folder is not None or not path.exists():
        if folder is None or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            raise ValueError(f"{source}: neither a local folder nor a Hub repo id with a folder "
                             f"inside it (load_dictionary('google/gemma-scope-2-270m-pt', "
                             f"'resid_post/layer_5_width_16k_l0_small'))")
        path = _download(str(source), folder) / folder
    if path.is_file() and path.suffix == ".npz" or (path / "params.npz").is_file():
        return load_gemma_scope_1(path, dtype=dtype, **hints)
    if (path / "params.safetensors").exists() or (path / "config.json").exists():
        return load_gemma_scope_2(path, dtype=dtype)
    if (path / "cfg.json").exists() or (path / "sae_weights.safetensors").exists():
        return load_saelens(path, dtype=dtype)
    present = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
    raise ValueError(f"{path}: not a dictionary folder: Gemma Scope 2 holds params.safetensors "
                     f"+ config.json, Gemma Scope 1 params.npz, SAELens cfg.json + "
                     f"sae_weights.safetensors; it holds {', '.join(present) or 'nothing'}")


def _download(repo_id: str, folder: str) -> Path:
    from gemma_eqx.formats import hub

    try:
        return hub.hf_download(repo_id, allow_patterns=[f"{folder.strip('/')}/*"])
    except ModelUnavailableError as e:
        raise ModelUnavailableError(
            f"{e}; the dictionary is the folder {folder!r} of {repo_id}: on a connected "
            f"machine run `hf download {repo_id} --include '{folder.strip('/')}/*'` and pass "
            f"the folder it prints") from None


def nbytes(d: SparseDictionary) -> int:
    """Bytes of the dictionary's arrays."""
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in
               (d.w_enc, d.b_enc, d.w_dec, d.b_dec, d.threshold, d.w_skip) if a is not None)


__all__ = ["TL_HOOKS", "hook_from_hf", "hook_from_tl", "load_dictionary", "load_gemma_scope_1",
           "load_gemma_scope_2", "load_saelens", "nbytes"]
