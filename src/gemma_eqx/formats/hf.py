"""Hugging Face Gemma / Gemma2 / Gemma3 models: a loaded transformers object, or a model
directory (`config.json`, safetensors, `tokenizer.model`) read without torch, leaf by leaf
into each leaf's sharding, or a Hub repo id through `huggingface_hub`'s cache."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding
from jaxtyping import DTypeLike

from ..core.checks import check_model_file
from ..core.config import GemmaConfig, family_config
from ..model import params
from ..model.families import FAMILIES, family_of_hf
from ..model.modules import Transformer
from ..model.weights import model_from_arrays
from ..parallel.sharding import ShardingRules, leaf_sharding


def config_from_hf(hf_config: Any, name: str = "hf") -> GemmaConfig:
    """Our config from a transformers `GemmaConfig`, `Gemma2Config` or `Gemma3TextConfig`
    (or a multimodal config holding one as `text_config`)."""
    raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    return config_from_dict(raw, source=f"Hugging Face config of {name}", name=name)


_FAMILIES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}
_REQUIRED = object()


class _Fields:
    """Typed reads from one config mapping: each refusal is one sentence naming the source
    and the field (a string where a number belongs, a bool for a count, a negative size)."""

    def __init__(self, raw: Mapping[str, Any], source: str):
        self.raw, self.source = raw, source

    def _get(self, name: str, default: Any) -> Any:
        if name in self.raw and self.raw[name] is not None:
            return self.raw[name]
        if default is _REQUIRED:
            raise ValueError(f"{self.source}: field {name!r} is missing")
        return default

    def _bad(self, name: str, value: Any, want: str) -> ValueError:
        return ValueError(f"{self.source}: field {name!r} must be {want}; got {value!r} "
                          f"({type(value).__name__})")

    def count(self, name: str, default: Any = _REQUIRED) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._bad(name, value, "a positive integer")
        return value

    def number(self, name: str, default: Any = _REQUIRED, *, optional: bool = False) -> Any:
        value = self._get(name, None if optional else default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value <= 0:
            raise self._bad(name, value, "a positive number" + (" or null" if optional else ""))
        return float(value)

    def mapping(self, name: str) -> Mapping[str, Any] | None:
        value = self.raw.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(name, value, "an object")
        return value

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def flag(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, value, "true or false")
        return value

    def text(self, name: str, default: Any = _REQUIRED) -> Any:
        return self._get(name, default)

    def nested(self, name: str) -> _Fields | None:
        value = self.mapping(name)
        return None if value is None else _Fields(value, f"{self.source} {name}")


def config_from_dict(raw: Any, *, source: str, name: str) -> GemmaConfig:
    """Our config from a Hugging Face config mapping (`config.json`'s object, or
    `to_dict()` of a transformers config): every field we read is type-checked, and what the
    mapping says overrides the family's defaults (`config.family_config`)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source} must hold a JSON object; got {type(raw).__name__}")
    text = _Fields(raw, source).mapping("text_config") or raw
    f = _Fields(text, source)
    model_type = text.get("model_type")
    zoo = None if model_type in _FAMILIES else family_of_hf(model_type)
    if model_type not in _FAMILIES and zoo is None:
        known = [*_FAMILIES, *(t for fam in FAMILIES.values() for t in fam.hf_model_types)]
        raise ValueError(f"{source}: model_type {model_type!r} is not an architecture this "
                         f"library reads (it reads {', '.join(known)})")
    if zoo is not None and zoo.hf_sizes is not None:
        sizes = zoo.hf_sizes(f)
        head_dim = sizes["head_dim"]
    else:
        layers, width, heads = (f.count("num_hidden_layers"), f.count("hidden_size"),
                                f.count("num_attention_heads"))
        head_dim = f.count("head_dim", width // heads if width >= heads else _REQUIRED)
    if zoo is not None:
        if zoo.hf_sizes is None:
            sizes = dict(num_layers=layers, embed_dim=width, num_heads=heads,
                         num_kv_heads=f.count("num_key_value_heads", heads), head_dim=head_dim,
                         hidden_dim=f.count("intermediate_size"),
                         vocab_size=f.count("vocab_size"))
        try:
            # What the file says overrides the family's defaults.
            fields = {**zoo.defaults, "query_pre_attn_scalar": float(head_dim),
                      **zoo.from_hf(f, sizes)}
            return GemmaConfig(name=name, architecture=zoo.name, **sizes, **fields)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(source) else f"{source}: {e}") from None
    family = _FAMILIES[model_type]
    read: dict[str, Any] = dict(norm_eps=f.number("rms_norm_eps", 1e-6),
                                context_length=f.count("max_position_embeddings", 8192))
    if family == "gemma":
        read.update(global_rope_base=_rope_theta(f))
    else:
        layer_types = text.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or len(layer_types) != layers or any(
                    t not in _LAYER_TYPES for t in layer_types):
                raise f._bad("layer_types", layer_types, f"a list of {layers} entries, each "
                             f"one of {', '.join(_LAYER_TYPES)}")
            read["attention_kinds"] = tuple(_LAYER_TYPES[t] for t in layer_types)
        window = f._get("sliding_window", None)
        if window is not None:
            window = f.count("sliding_window")
        read.update(query_pre_attn_scalar=f.number("query_pre_attn_scalar", float(head_dim)),
                    sliding_window=window,
                    attn_logit_softcap=f.number("attn_logit_softcapping", optional=True),
                    final_logit_softcap=f.number("final_logit_softcapping", optional=True))
    if family == "gemma2":
        read.update(local_rope_base=_rope_theta(f), global_rope_base=_rope_theta(f))
    if family == "gemma3":
        global_base, local_base, scale = _gemma3_rope(f)
        read.update(local_rope_base=local_base, global_rope_base=global_base,
                    global_rope_scale=scale)
    try:
        return family_config(
            family, name=name, num_layers=layers, embed_dim=width, num_heads=heads,
            num_kv_heads=f.count("num_key_value_heads", heads), head_dim=head_dim,
            hidden_dim=f.count("intermediate_size"), vocab_size=f.count("vocab_size"), **read,
        )
    except ValueError as e:  # fields that disagree with each other (GemmaConfig's checks)
        raise ValueError(f"{source}: {e}") from None


def _rope_theta(f: _Fields) -> float:
    params = f.mapping("rope_parameters")
    if params is not None and "rope_theta" in params:
        return _Fields(params, f"{f.source} rope_parameters").number("rope_theta")
    return f.number("rope_theta", 10_000.0)


def _gemma3_rope(f: _Fields) -> tuple[float, float, float]:
    """(global base, local base, global position scale) across transformers versions."""
    params = f.mapping("rope_parameters")
    if params is not None and "full_attention" in params:
        full = _Fields(params, f"{f.source} rope_parameters").mapping("full_attention")
        sliding = _Fields(params, f"{f.source} rope_parameters").mapping("sliding_attention")
        if sliding is None:
            raise ValueError(f"{f.source}: rope_parameters has full_attention but no "
                             f"sliding_attention")
        full_f = _Fields(full, f"{f.source} rope_parameters.full_attention")
        sliding_f = _Fields(sliding, f"{f.source} rope_parameters.sliding_attention")
        scale = full_f.number("factor", 1.0) if full.get("rope_type") == "linear" else 1.0
        return full_f.number("rope_theta"), sliding_f.number("rope_theta"), scale
    scaling = f.mapping("rope_scaling") or {}
    scale = (_Fields(scaling, f"{f.source} rope_scaling").number("factor", 1.0)
             if scaling.get("rope_type") == "linear" else 1.0)
    return f.number("rope_theta", 10_000.0), f.number("rope_local_base_freq", 10_000.0), scale


# Where transformers puts the text model's tensors (causal LM, multimodal old and new; GPT-2's
# and GPT-NeoX's own names).
_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "transformer.",
             "gpt_neox.", "")
# The output projection: Gemma ties it to the embedding; a copy may be stored.
_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def _not_text_model(name: str) -> bool:
    """Tensors of a multimodal checkpoint that the text model does not read."""
    parts = name.split(".")
    return "vision_tower" in parts or "multi_modal_projector" in parts


def _ignorer(config: GemmaConfig):
    """What a checkpoint of `config` may hold that no leaf reads: a tied model's copy of the
    output projection (checked equal to the embedding), a vision tower."""
    family = FAMILIES.get(config.architecture)
    return lambda name: ((config.tie_embeddings and name in _LM_HEADS) or _not_text_model(name)
                         or (family is not None and family.hf_ignored(name)))


def _check_tied(lm_head: np.ndarray, embedding: np.ndarray, source: str, name: str) -> None:
    if lm_head.shape != embedding.shape or not np.array_equal(lm_head, embedding):
        raise ValueError(f"{source}: {name} differs from the token embedding, but the "
                         f"config ties the output projection to the embedding (Gemma always "
                         f"does; other families say tie_word_embeddings)")


def arrays_from_hf(state_dict: Mapping[str, Any], config: GemmaConfig) -> dict[str, np.ndarray]:
    """Our `{path: array}` from a transformers state dict (torch tensors or numpy arrays);
    `params.PARAMS` names each tensor and its layout, and every tensor of the dict must be
    read (`params.match_tensors`)."""
    found = params.match_tensors(config, list(state_dict), names="hf",
                                 source="Hugging Face state dict", prefixes=_PREFIXES,
                                 ignored=_ignorer(config))

    def get(name: str) -> np.ndarray:
        t = state_dict[found[name]]
        return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    arrays = params.arrays_from_tensors(config, get, names="hf",
                                        check=lambda name, w, shape: w.reshape(shape))
    for head in _LM_HEADS if config.tie_embeddings else ():
        if head in state_dict:
            t = state_dict[head]
            t = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
            _check_tied(t, arrays["embedder.embedding"], "Hugging Face state dict", head)
    return arrays


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
    family = FAMILIES.get(config.architecture)
    renamed = {} if family is None else family.hf_in_memory
    state = {renamed.get(k, k): v for k, v in hf_model.state_dict().items()}
    arrays = arrays_from_hf(state, config)
    arrays = {p: jnp.asarray(a, dtype) for p, a in arrays.items()}
    return model_from_arrays(
        config, arrays, activation_dtype=activation_dtype, source="Hugging Face model",
        check_finite=check_finite,
    )


# ------------------------------------------------------------------------ model directories

# safetensors dtype names of the floating types a weight may have; BF16 through ml_dtypes.
_SAFETENSORS_FLOATS = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
}
_SAFETENSORS_OTHERS = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
                       "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64")
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class _Header:
    """One safetensors file's validated table: `{name: (dtype, shape, begin, end)}` (byte
    offsets from the start of the file)."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ValueError(f"{path} is not a safetensors file ({size} bytes)")
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= min(_MAX_HEADER, size - 8):
                    raise ValueError(f"{path} is not a safetensors file (its header length "
                                     f"{n} does not fit the file's {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the safetensors file ({e.strerror})") \
                from None
        try:
            table = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: "
                             f"{e})") from None
        if not isinstance(table, dict):
            raise ValueError(f"{path}: the safetensors header must be a JSON object; got "
                             f"{type(table).__name__}")
        table.pop("__metadata__", None)
        start, data_size = 8 + n, size - 8 - n
        entries = sorted((self._entry(name, e) for name, e in table.items()),
                         key=lambda t: (t[4], t[5]))
        position = 0
        for name, dtype, shape, nbytes, begin, end in entries:
            if begin != position:
                what = "overlaps the tensor before it" if begin < position else \
                    f"leaves a gap of {begin - position} bytes before it"
                raise ValueError(f"{path}: tensor {name} starts at byte {begin} of the data "
                                 f"section, which {what} (its tensors must be packed in order)")
            if end > data_size:
                raise ValueError(f"{path} is truncated: tensor {name} needs bytes up to "
                                 f"{end} of the data section; the file holds {data_size}")
            if end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name} spans {end - begin} bytes; its shape "
                                 f"{shape} of {np.dtype(dtype).name} needs {nbytes}")
            self.tensors[name] = (dtype, shape, start + begin, start + end)
            position = end
        if position != data_size:
            raise ValueError(f"{path}: {data_size - position} bytes follow the last tensor; "
                             f"the header and the data disagree")

    def _entry(self, name: str, entry: Any) -> tuple:
        where = f"{self.path}: tensor {name}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{where}: header entry must be an object with dtype, shape and "
                             f"data_offsets; got {entry!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in _SAFETENSORS_FLOATS:
            known = code in _SAFETENSORS_OTHERS
            raise ValueError(f"{where} has dtype {code!r}; " + (
                "weights must be floating point (F32, F16, BF16 or F64)" if known else
                "not a safetensors dtype"))
        if not isinstance(shape, list) or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative integers; got "
                             f"{shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or any(
                isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets) \
                or offsets[0] > offsets[1]:
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= "
                             f"end; got {offsets!r}")
        dtype = np.dtype(_SAFETENSORS_FLOATS[code])
        return (name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize, *offsets)


class SafetensorsReader:
    """The tensors of a model directory's `.safetensors` file(s) (one file, or several named
    by `model.safetensors.index.json`), read one at a time: only the tensor asked for is in
    memory. Needs neither torch nor the safetensors package.

    Everything is checked when the reader is made, before a tensor is read: every file is a
    regular file inside the directory; every header is well formed (float dtypes, shapes and
    offsets that tile the data section exactly); each tensor is stored once (in the file the
    index names for it)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        self._headers: dict[Path, _Header] = {}
        if os.path.lexists(index):
            index = check_model_file(self.directory, index.name, "the index")
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map object naming the tensors' files")
            self._file_of = {}
            for name, file in weight_map.items():
                path = check_model_file(self.directory, file,
                                        f"the index's file for tensor {name}")
                self._file_of[name] = self._header_of(path).path
            for path, header in self._headers.items():
                for name in header.tensors:
                    if self._file_of.get(name) != path:
                        elsewhere = self._file_of.get(name)
                        raise ValueError(
                            f"{path.name} holds tensor {name}, which the index "
                            + (f"places in {elsewhere.name}: a tensor stored twice"
                               if elsewhere else "does not name: a tensor no loader reads")
                            + f" ({self.directory})")
            for name, path in self._file_of.items():
                if name not in self._headers[path].tensors:
                    raise ValueError(f"{path}: the index names tensor {name!r} but the file "
                                     f"does not hold it")
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.directory} holds no .safetensors file")
            self._file_of = {}
            for file in files:
                path = check_model_file(self.directory, file, "weights file")
                for name in self._header_of(path).tensors:
                    if name in self._file_of:
                        raise ValueError(f"{self.directory}: tensor {name} is stored twice, in "
                                         f"{self._file_of[name].name} and {path.name}")
                    self._file_of[name] = path

    def _header_of(self, path: Path) -> _Header:
        if path not in self._headers:
            self._headers[path] = _Header(path)
        return self._headers[path]

    def names(self) -> list[str]:
        return list(self._file_of)

    def find(self, name: str) -> str:
        """The stored name of `name` under the prefixes transformers uses (`model.`, ...)."""
        for prefix in _PREFIXES:
            if prefix + name in self._file_of:
                return prefix + name
        raise ValueError(f"{self.directory}: no tensor {name!r} in its safetensors files "
                         f"(tried the prefixes {', '.join(p for p in _PREFIXES if p)})")

    def read(self, name: str) -> np.ndarray:
        """One tensor, in its stored dtype (a fresh array, the file closed)."""
        if name not in self._file_of:
            self.find(name)  # raises, naming the tensor
        path = self._file_of[name]
        dtype, shape, begin, _ = self._headers[path].tensors[name]
        count = math.prod(shape)
        with open(path, "rb") as f:
            f.seek(begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ValueError(f"{path} is truncated: tensor {name} needs {count} values, the "
                             f"file holds {data.size}")
        return data.reshape(shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one `.safetensors` file (floating point), its header checked first as
    a model directory's are (dtypes, shapes, offsets that tile the data exactly)."""
    header = _Header(Path(path))
    out = {}
    with open(header.path, "rb") as f:
        for name, (dtype, shape, begin, _) in header.tensors.items():
            f.seek(begin)
            out[name] = np.fromfile(f, dtype=dtype, count=math.prod(shape)).reshape(shape)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def config_from_json(path: str | os.PathLike, name: str | None = None) -> GemmaConfig:
    """Our config from a Hugging Face `config.json` (what `config_from_hf` reads, with the
    library defaults for what an older file leaves out); each field is type-checked."""
    path = Path(path)
    path = check_model_file(path.parent, path.name, "the config")
    return config_from_dict(_read_json(path), source=str(path), name=name or path.parent.name)


def _plan(directory: Path) -> tuple[GemmaConfig, SafetensorsReader, dict[str, str]]:
    config = config_from_json(directory / "config.json")
    reader = SafetensorsReader(directory)
    found = params.match_tensors(config, reader.names(), names="hf", source=str(directory),
                                 prefixes=_PREFIXES, ignored=_ignorer(config))
    return config, reader, found


def check_hf_directory(directory: str | os.PathLike) -> GemmaConfig:
    """The config of a Hugging Face model directory, after every check `load_hf_directory`
    makes before reading a tensor (files, headers, names); reads no tensor data."""
    return _plan(Path(directory))[0]


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
    terminal). The config, the files and every header are checked before a tensor is read:
    each stored tensor must be read exactly once."""
    from ..core.runtime import progress as bar

    directory = Path(directory)
    config, reader, found = _plan(directory)
    single = SingleDeviceSharding(jax.local_devices()[0])
    arrays = {}
    leaves = params.leaves(config)
    for leaf in bar(leaves, f"loading {directory.name}", show=progress, unit="leaf"):
        names = tuple(found[n] for n in leaf.hf)
        stored = [reader.read(n) for n in names]
        for name, array, want in zip(names, stored, params.stored_shapes(leaf), strict=True):
            if array.shape != want:
                raise ValueError(f"{directory}: tensor {name} has shape {array.shape}; leaf "
                                 f"{leaf.path} of {config.name} needs {want}")
        host = params.from_storage(leaf, stored, names, lambda _, a, shape: a.reshape(shape))
        if leaf.path == "embedder.embedding" and config.tie_embeddings:
            for head in (h for h in _LM_HEADS if h in reader.names()):
                _check_tied(reader.read(head), host, str(directory), head)
        if dtype is not None:
            host = host.astype(dtype)
        sharding = single if mesh is None else leaf_sharding(leaf.path, host.shape, mesh, rules)
        # Waited for: a transfer still pending would keep its host copy alive, and host memory
        # would then grow with the whole model instead of one leaf.
        arrays[leaf.path] = jax.make_array_from_callback(
            host.shape, sharding, lambda index, host=host: np.ascontiguousarray(host[index])
        ).block_until_ready()
        del stored, host
    return model_from_arrays(config, arrays, activation_dtype=activation_dtype or jnp.float32,
                             source=str(directory), check_finite=check_finite)


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")))
