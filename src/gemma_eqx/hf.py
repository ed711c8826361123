"""Hugging Face Gemma / Gemma2 / Gemma3 models: a loaded transformers object, or a model
directory (`config.json`, safetensors, `tokenizer.model`) read without torch, leaf by leaf
into each leaf's sharding, or a Hub repo id through `huggingface_hub`'s cache."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from jaxtyping import DTypeLike

from . import params
from .config import GemmaConfig, family_config
from .modules import Transformer
from .sharding import ShardingRules, leaf_sharding
from .weights import model_from_arrays


def config_from_hf(hf_config: Any, name: str = "hf") -> GemmaConfig:
    """Our config from a transformers `GemmaConfig`, `Gemma2Config` or `Gemma3TextConfig`."""
    c = getattr(hf_config, "text_config", None) or hf_config
    families = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
    if c.model_type not in families:
        raise ValueError(f"unsupported Hugging Face model type {c.model_type!r}")
    family = families[c.model_type]
    # What the config says overrides the family's defaults (config.family_config).
    read: dict[str, Any] = dict(norm_eps=c.rms_norm_eps,
                                context_length=int(c.max_position_embeddings))
    layer_types = getattr(c, "layer_types", None)
    if family == "gemma":
        read.update(global_rope_base=_rope_theta(c))
    else:
        if layer_types is not None:
            read["attention_kinds"] = tuple(
                "local" if t == "sliding_attention" else "global" for t in layer_types)
        read.update(query_pre_attn_scalar=float(c.query_pre_attn_scalar),
                    sliding_window=c.sliding_window,
                    attn_logit_softcap=_opt_float(c.attn_logit_softcapping),
                    final_logit_softcap=_opt_float(c.final_logit_softcapping))
    if family == "gemma2":
        read.update(local_rope_base=_rope_theta(c), global_rope_base=_rope_theta(c))
    if family == "gemma3":
        global_base, local_base, scale = _gemma3_rope(c)
        read.update(local_rope_base=local_base, global_rope_base=global_base,
                    global_rope_scale=scale)
    return family_config(
        family, name=name, num_layers=c.num_hidden_layers, embed_dim=c.hidden_size,
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, hidden_dim=c.intermediate_size, vocab_size=c.vocab_size, **read,
    )


def _opt_float(x: float | None) -> float | None:
    return None if x is None else float(x)


def _rope_theta(c: Any) -> float:
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(c, "rope_theta", 10_000.0))


def _gemma3_rope(c: Any) -> tuple[float, float, float]:
    """(global base, local base, global position scale) across transformers versions."""
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, Mapping) and "full_attention" in params:
        full, sliding = params["full_attention"], params["sliding_attention"]
        scale = full.get("factor", 1.0) if full.get("rope_type") == "linear" else 1.0
        return float(full["rope_theta"]), float(sliding["rope_theta"]), float(scale)
    scaling = getattr(c, "rope_scaling", None) or {}
    scale = scaling.get("factor", 1.0) if scaling.get("rope_type") == "linear" else 1.0
    return float(c.rope_theta), float(c.rope_local_base_freq), float(scale)


# Where transformers puts the text model's tensors (causal LM, multimodal old and new).
_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def arrays_from_hf(state_dict: Mapping[str, Any], config: GemmaConfig) -> dict[str, np.ndarray]:
    """Our `{path: array}` from a transformers state dict (torch tensors or numpy arrays);
    `params.PARAMS` names each tensor and its layout."""

    def get(name: str) -> np.ndarray:
        for prefix in _PREFIXES:
            if prefix + name in state_dict:
                t = state_dict[prefix + name]
                return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        raise KeyError(f"Hugging Face state dict has no {name!r}")

    return params.arrays_from_tensors(config, get, names="hf",
                                      check=lambda name, w, shape: w.reshape(shape))


def from_hf(
    hf_model: Any,
    *,
    dtype: DTypeLike = jnp.float32,
    activation_dtype: DTypeLike | None = None,
    check_finite: bool = True,
) -> Transformer:
    """Our model with the weights of a transformers Gemma causal LM (any of the three); a
    weight holding NaN or infinity is refused by name unless `check_finite=False`."""
    config = config_from_hf(hf_model.config)
    arrays = arrays_from_hf(hf_model.state_dict(), config)
    arrays = {p: jnp.asarray(a, dtype) for p, a in arrays.items()}
    return model_from_arrays(
        config, arrays, activation_dtype=activation_dtype, source="Hugging Face model",
        check_finite=check_finite,
    )


# ------------------------------------------------------------------------ model directories

# safetensors dtype names; BF16 through ml_dtypes (numpy has none).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsReader:
    """The tensors of a model directory's `.safetensors` file(s) (one file, or several named
    by `model.safetensors.index.json`), read one at a time: only the tensor asked for is in
    memory. Needs neither torch nor the safetensors package."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map")
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory} holds no .safetensors file")
            self._file_of = {name: f for f in files for name in self._header(f)[0]}
        self._headers: dict[Path, tuple[dict, int]] = {}

    @staticmethod
    def _header(path: Path) -> tuple[dict, int]:
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n < 100 * 2**20:
                    raise ValueError("the header length is not plausible")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        return header, 8 + n

    def names(self) -> list[str]:
        return list(self._file_of)

    def find(self, name: str) -> str:
        """The stored name of `name` under the prefixes transformers uses (`model.`, ...)."""
        for prefix in _PREFIXES:
            if prefix + name in self._file_of:
                return prefix + name
        raise KeyError(f"{self.directory}: no tensor {name!r} in its safetensors files "
                       f"(tried the prefixes {', '.join(p for p in _PREFIXES if p)})")

    def read(self, name: str) -> np.ndarray:
        """One tensor, in its stored dtype (a fresh array, the file closed)."""
        path = self._file_of[name]
        if path not in self._headers:
            self._headers[path] = self._header(path)
        header, start = self._headers[path]
        if name not in header:
            raise ValueError(f"{path}: the index names {name!r} but the file does not hold it")
        entry = header[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which Gemma "
                             f"weights never use")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        count = int(np.prod(shape))
        if end - begin != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        with open(path, "rb") as f:
            f.seek(start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ValueError(f"{path} is truncated: tensor {name} needs {count} values, the "
                             f"file holds {data.size}")
        return data.reshape(shape)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def config_from_json(path: str | os.PathLike, name: str | None = None) -> GemmaConfig:
    """Our config from a Hugging Face `config.json` (what `config_from_hf` reads, with the
    library defaults for what an older file leaves out)."""
    path = Path(path)
    raw = _read_json(path)
    text = raw.get("text_config") or raw
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=8192, rope_theta=10_000.0,
                    attn_logit_softcapping=None, final_logit_softcapping=None,
                    rope_local_base_freq=10_000.0, rope_scaling=None, sliding_window=None,
                    layer_types=None)
    if "head_dim" not in text and "hidden_size" in text and "num_attention_heads" in text:
        defaults["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    defaults["query_pre_attn_scalar"] = text.get("head_dim", defaults.get("head_dim", 256))
    if "model_type" not in text:
        raise ValueError(f"{path}: no model_type; is this a Gemma config.json?")
    try:
        return config_from_hf(SimpleNamespace(**{**defaults, **text}),
                              name=name or path.parent.name)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Gemma config this library reads ({e})") from None


def load_hf_directory(
    directory: str | os.PathLike,
    *,
    dtype: DTypeLike | None = None,
    activation_dtype: DTypeLike | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    check_finite: bool = True,
    progress: bool | None = None,
) -> Transformer:
    """A Hugging Face model directory (`save_pretrained`'s layout) as our model, without torch.

    Each leaf is read on its own, converted to our layout and placed in the sharding its rule
    names over `mesh` (default: the first local device), so host memory holds the model's
    shards plus about one leaf. Weights keep their stored dtype unless `dtype` is given;
    activations default to float32. `progress` shows a bar (default: when stderr is a
    terminal)."""
    from .runtime import progress as bar

    directory = Path(directory)
    config = config_from_json(directory / "config.json")
    reader = SafetensorsReader(directory)
    single = SingleDeviceSharding(jax.local_devices()[0])
    arrays = {}
    leaves = params.leaves(config)
    for leaf in bar(leaves, f"loading {directory.name}", show=progress, unit="leaf"):
        names = tuple(reader.find(n) for n in leaf.hf)
        stored = [reader.read(n) for n in names]
        for name, array, want in zip(names, stored, params.stored_shapes(leaf), strict=True):
            if array.shape != want:
                raise ValueError(f"{directory}: tensor {name} has shape {array.shape}; leaf "
                                 f"{leaf.path} of {config.name} needs {want}")
        host = params.from_storage(leaf, stored, names, lambda _, a, shape: a.reshape(shape))
        if dtype is not None:
            host = host.astype(dtype)
        sharding = single if mesh is None else leaf_sharding(leaf.path, host.shape, mesh, rules)
        arrays[leaf.path] = jax.make_array_from_callback(
            host.shape, sharding, lambda index, host=host: np.ascontiguousarray(host[index]))
        del stored, host
    return model_from_arrays(config, arrays, activation_dtype=activation_dtype or jnp.float32,
                             source=str(directory), check_finite=check_finite)


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")))


def looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


HF_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def hf_download(repo_id: str, *, revision: str | None = None) -> Path:
    """The repo's snapshot in the Hugging Face cache, downloaded if needed (token from
    `HF_TOKEN` or `hf auth login`); failures become one sentence that says what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    from .pretrained import ModelUnavailableError

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                      allow_patterns=HF_FILES))
    except errors.GatedRepoError:
        raise ModelUnavailableError(
            f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} with "
            f"the account whose token this machine uses (HF_TOKEN or `hf auth login`)"
        ) from None
    except errors.RepositoryNotFoundError:
        token = huggingface_hub.get_token()
        raise ModelUnavailableError(
            f"the Hugging Face Hub has no repo {repo_id}"
            + ("" if token else ", or it is private and no token is set (HF_TOKEN or "
               "`hf auth login`)")
        ) from None
    except errors.LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"cannot reach the Hugging Face Hub to download {repo_id}, and it is not in the "
            f"local cache ({huggingface_hub.constants.HF_HUB_CACHE}): connect, or run "
            f"`hf download {repo_id}` on a connected machine and pass the directory"
        ) from None
    except errors.HfHubHTTPError as e:
        raise ModelUnavailableError(f"the Hugging Face Hub refused {repo_id}: {e}") from None
