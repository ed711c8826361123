"""Gemma models from GGUF files (llama.cpp's format), dequantized to float32.

The file's header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per
vocabulary entry and takes ~10-20 s to open a Gemma file; this reader takes well under a second.
Tensor data is dequantized by `gguf.quants.dequantize`.

llama.cpp's conversion differs from the Kaggle layout in three ways undone here: norm weights are
stored as `1 + scale`, matrices are `[out, in]`, and there is no output matrix (the unembedding is
tied to `token_embd`). Q and K are not permuted for Gemma, so they are used as they are.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from gguf.quants import dequantize

from ..core.config import PRESETS, GemmaConfig, family_config, gemma2_pattern, gemma3_pattern
from ..model import params
from ..model.families import FAMILIES, family_of_gguf, unpermute_rotary
from ..model.modules import Transformer
from ..model.weights import model_from_arrays

ARCHITECTURES = ("gemma", "gemma2", "gemma3")  # Gemma's own, read below
# Every architecture a GGUF file may name: Gemma's and those of the declared families.
READABLE = ARCHITECTURES + tuple(a for f in FAMILIES.values() for a in f.gguf_architectures)

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types with a fixed width: type id -> struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_NUMPY_TYPES = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
    7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4  # arrays of arrays of ...: llama.cpp writes at most one level
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Integer storage types: llama.cpp's own tensors of indices, never weights.
_INTEGER_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                  GGMLQuantizationType.I64}
_U64 = struct.Struct("<Q")


class TensorInfo(NamedTuple):
    """One tensor's entry in the file's table: numpy-order shape, storage type, byte range."""

    name: str
    shape: tuple[int, ...]  # numpy order ([out, in] for a matrix); GGUF lists it reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int


class GGUFHeader(NamedTuple):
    """Everything in a GGUF file except the tensor data."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


class GGUFContents(NamedTuple):
    """What `read_gguf` returns: our config, `{path: float32 array}` and the file's metadata."""

    config: GemmaConfig
    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]


class _Cursor:
    """Sequential little-endian reads from a buffer; running off its end raises ValueError."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ValueError(
                f"{self.path}: truncated GGUF file (ends at byte {self.size} while reading {what}; "
                f"{self.pos + n} bytes needed)"
            )

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        self._need(n, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", what)
        self._need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def _strings(self, count: int, key: str) -> list[str]:
        # One tight loop, no calls per item: a Gemma vocabulary has 262k strings, and the
        # per-call overhead of `string` (type-checked under the tests) would dominate.
        buf, pos, size, length_at = self.buf, self.pos, self.size, _U64.unpack_from
        raw = []
        for _ in range(count):
            if pos + 8 > size:
                break
            (length,) = length_at(buf, pos)
            pos += 8 + length
            raw.append(buf[pos - length : pos])
        if len(raw) < count or pos > size:
            raise ValueError(
                f"{self.path}: truncated GGUF file (ends at byte {size} while reading "
                f"metadata {key!r})"
            )
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: metadata {key!r} is not valid UTF-8 ({e})") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            (v,) = self.unpack(_SCALAR_FORMATS[vtype], f"metadata {key!r}")
            # float32 values read back as the decimal they were written from (1e-6, not 9.99e-7).
            return float(str(np.float32(v))) if vtype == 6 else v
        if vtype == _STRING:
            return self.string(f"metadata {key!r}")
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ", f"metadata {key!r}")
            if etype in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[etype]).newbyteorder("<")
                self._need(count * dtype.itemsize, f"metadata {key!r}")
                arr = np.frombuffer(self.buf, dtype, count, self.pos)
                arr = arr.astype(dtype.newbyteorder("="))  # a copy: nothing keeps the map open
                self.pos += count * dtype.itemsize
                return arr
            if etype == _STRING:
                return self._strings(count, key)
            if etype == _ARRAY:
                if depth >= _MAX_NESTING:
                    raise ValueError(f"{self.path}: metadata {key!r} nests arrays more than "
                                     f"{_MAX_NESTING} deep; not a GGUF file this library reads")
                out = []
                for i in range(count):
                    self._need(12, f"metadata {key!r}")  # each element's type and count
                    out.append(self.value(_ARRAY, f"{key}[{i}]", depth + 1))
                return out
            raise ValueError(f"{self.path}: metadata {key!r} is an array of unknown type {etype}")
        raise ValueError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")


def _open_error(path: Path) -> ValueError | None:
    if not path.exists():
        return ValueError(f"{path}: no such GGUF file")
    if not path.is_file():
        return ValueError(f"{path}: not a regular file")
    return None


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table, without touching the tensor data.

    Metadata values come back as Python scalars and strings, numeric arrays as numpy arrays,
    string arrays as lists of `str`.
    """
    path = Path(path)
    if (err := _open_error(path)) is not None:
        raise err
    try:
        f = open(path, "rb")  # closed by the with-block below
    except OSError as e:
        raise ValueError(f"{path}: cannot open GGUF file ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 4 or f.read(4) != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            cur = _Cursor(mm, path)
            cur.pos = 4
            (version,) = cur.unpack("<I", "the version")
            if version not in _VERSIONS:
                raise ValueError(
                    f"{path}: GGUF version {version} is not supported (only {_VERSIONS})"
                )
            n_tensors, n_kv = cur.unpack("<QQ", "the header")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string("a metadata key")
                (vtype,) = cur.unpack("<I", f"metadata {key!r}")
                metadata[key] = cur.value(vtype, key)
            entries = []
            for _ in range(n_tensors):
                name = cur.string("a tensor name")
                (ndim,) = cur.unpack("<I", f"tensor {name!r}")
                if ndim > _MAX_DIMS:
                    raise ValueError(f"{path}: tensor {name!r} has {ndim} dimensions; GGUF "
                                     f"tensors have at most {_MAX_DIMS}")
                dims = cur.unpack(f"<{ndim}Q", f"tensor {name!r}")
                raw_type, offset = cur.unpack("<IQ", f"tensor {name!r}")
                entries.append((name, tuple(reversed(dims)), raw_type, offset))
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 \
                    or alignment & (alignment - 1):
                raise ValueError(f"{path}: general.alignment={alignment} is not a power of two")
            data_start = -(-cur.pos // alignment) * alignment

    tensors: dict[str, TensorInfo] = {}
    for name, shape, raw_type, offset in entries:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
        if ggml_type in _INTEGER_TYPES:
            raise ValueError(f"{path}: tensor {name!r} is stored as {ggml_type.name}; weights "
                             f"must be floating point or a quantized float format")
        n = math.prod(shape)  # a Python int: dims whose product overflows 64 bits stay exact
        if shape and shape[-1] % block:
            raise ValueError(
                f"{path}: tensor {name!r} of shape {shape} does not fill whole "
                f"{ggml_type.name} blocks of {block}"
            )
        if offset % alignment:
            raise ValueError(f"{path}: tensor {name!r} starts at offset {offset}, not a "
                             f"multiple of the file's alignment {alignment}")
        info = TensorInfo(name, shape, ggml_type, data_start + offset, n // block * type_size)
        if info.nbytes > size:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape} ({n} values), which "
                             f"cannot fit in the file's {size} bytes")
        if info.offset + info.nbytes > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name!r} needs bytes up to "
                f"{info.offset + info.nbytes} but the file has {size}"
            )
        if name in tensors:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        tensors[name] = info
    return GGUFHeader(path, metadata, tensors)


def read_tensor(header: GGUFHeader, name: str) -> np.ndarray:
    """One tensor, dequantized to a fresh float32 array of its numpy-order shape."""
    if name not in header.tensors:
        raise ValueError(f"{header.path}: GGUF file has no tensor {name!r}")
    info = header.tensors[name]
    block, type_size = GGML_QUANT_SIZES[info.ggml_type]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if info.shape else 1
    cols = info.shape[-1] if info.shape else 1
    raw = np.memmap(header.path, np.uint8, "r", info.offset, (info.nbytes,))
    raw = raw.reshape(rows, cols // block * type_size)
    out = np.empty((rows, cols), np.float32)
    try:
        rows_dequantizer = _rows_dequantizer(info.ggml_type)
        if rows_dequantizer is None:
            out[:] = dequantize(raw, info.ggml_type)
        else:
            # `gguf.quants.dequantize` works through 16 rows per numpy call, which makes a
            # 262k-row embedding take ~10 s; whole chunks of rows at a time take under 1 s.
            step = max(1, _CHUNK_BYTES // raw.shape[1])
            for start in range(0, rows, step):
                out[start : start + step] = rows_dequantizer(np.asarray(raw[start : start + step]))
    except NotImplementedError:
        raise ValueError(
            f"{header.path}: tensor {name!r} is stored as {info.ggml_type.name}, which "
            "gguf.quants cannot dequantize"
        ) from None
    return out.reshape(info.shape)


_CHUNK_BYTES = 4 << 20


def _rows_dequantizer(qtype: GGMLQuantizationType) -> Any:
    """gguf.quants' whole-rows dequantizer for a block type (the function `dequantize` applies
    16 rows at a time), or None for plain float types and anything unexpected."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return None
    cls = getattr(gguf_quants, qtype.name, None)
    if getattr(cls, "qtype", None) != qtype or not hasattr(cls, "dequantize_rows"):
        return None
    cls.init_grid()  # the i-quants' lookup tables; a no-op for the others
    return cls.dequantize_rows


# ----------------------------------------------------------------------------- config


def _architecture(header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in READABLE:
        raise ValueError(
            f"{header.path}: GGUF architecture {arch!r} is not one this library reads "
            f"({', '.join(READABLE)})"
        )
    return arch


class _MetaFields:
    """Typed reads of `{arch}.{name}` metadata (a family's `FieldReader`)."""

    def __init__(self, header: GGUFHeader, arch: str):
        self.header, self.arch, self.source = header, arch, str(header.path)

    def _key(self, name: str) -> str:
        return f"{self.arch}.{name}"

    def has(self, name: str) -> bool:
        return self._key(name) in self.header.metadata

    def count(self, name: str, default: Any = ...) -> int:
        return _meta_count(self.header, self._key(name), default)

    def number(self, name: str, default: Any = ..., *, optional: bool = False) -> Any:
        return _meta_number(self.header, self._key(name), None if optional else default)

    def flag(self, name: str, default: bool) -> bool:
        value = _meta(self.header, self._key(name), default)
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{self.source}: GGUF metadata {self._key(name)!r} must be true "
                             f"or false; got {value!r}")
        return bool(value)

    def text(self, name: str, default: Any = ...) -> Any:
        return _meta(self.header, self._key(name), default)

    def nested(self, name: str) -> None:
        return None


def _meta(header: GGUFHeader, key: str, default: Any = ...) -> Any:
    if key in header.metadata:
        return header.metadata[key]
    if default is ...:
        raise ValueError(f"{header.path}: GGUF metadata lacks {key!r}")
    return default


def _meta_count(header: GGUFHeader, key: str, default: Any = ...) -> int | None:
    """A metadata value that must be a positive integer (a size, a count); a missing key
    gives `default` as it is."""
    value = _meta(header, key, default)
    if value is default and key not in header.metadata:
        return value
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{header.path}: GGUF metadata {key!r} must be a positive integer; "
                         f"got {value!r} ({type(value).__name__})")
    return int(value)


def _meta_number(header: GGUFHeader, key: str, default: Any = ...) -> float | None:
    """A metadata value that must be a positive finite number (or the default, None)."""
    value = _meta(header, key, default)
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{header.path}: GGUF metadata {key!r} must be a positive number; "
                         f"got {value!r} ({type(value).__name__})")
    return float(value)


def _shape_fields(c: GemmaConfig) -> tuple[Any, ...]:
    return (c.num_layers, c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_dim,
            c.vocab_size)


def config_from_gguf(header: GGUFHeader) -> GemmaConfig:
    """Our config from the file's metadata plus the facts of each family that GGUF omits.

    If every field matches a named preset (Kaggle-layout details aside), that preset is
    returned, name included; otherwise the config is named after the file.
    """
    arch = _architecture(header)
    count = lambda key, default=...: _meta_count(header, f"{arch}.{key}", default)  # noqa: E731
    number = lambda key, default=...: _meta_number(header, f"{arch}.{key}", default)  # noqa: E731
    layers, width = count("block_count"), count("embedding_length")
    per_layer = [k for k in ("attention.head_count", "attention.head_count_kv")
                 if isinstance(header.metadata.get(f"{arch}.{k}"), np.ndarray)]
    if per_layer:
        raise ValueError(f"{header.path}: per-layer head counts ({arch}.{per_layer[0]}) are not "
                         f"supported")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    head_dim = count("attention.key_length", max(1, width // heads))
    if "token_embd.weight" in header.tensors:
        vocab = header.tensors["token_embd.weight"].shape[0]
    else:
        tokens = _meta(header, "tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else 0
    sizes = dict(
        name=f"gguf:{header.metadata.get('general.name', header.path.stem)}",
        num_layers=layers, embed_dim=width, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, hidden_dim=count("feed_forward_length"), vocab_size=int(vocab),
    )
    family = family_of_gguf(arch) if arch not in ARCHITECTURES else None
    if family is not None:
        return _zoo_config(header, arch, family, sizes)
    # What the file says overrides the family's defaults (config.family_config); what it
    # omits (query scale, local RoPE base of Gemma 3) keeps them. llama.cpp scales queries by
    # (embed / heads)^-1/2 for the 27B Gemma 2 and 3 (head_dim 128) and by head_dim^-1/2
    # otherwise; the 27B presets are matched below either way.
    window = count("attention.sliding_window", None)
    base = number("rope.freq_base", 10_000.0)
    read: dict[str, Any] = dict(
        norm_eps=number("attention.layer_norm_rms_epsilon", 1e-6),
        context_length=count("context_length", 8192), global_rope_base=base,
    )
    if arch != "gemma":
        read.update(attention_kinds=_pattern(header, arch, layers), sliding_window=window)
    if arch == "gemma2":
        read.update(local_rope_base=base,
                    attn_logit_softcap=number("attn_logit_softcapping", None),
                    final_logit_softcap=number("final_logit_softcapping", None))
    if arch == "gemma3":
        scale = 1.0
        if _meta(header, f"{arch}.rope.scaling.type", "none") == "linear":
            scale = number("rope.scaling.factor", 1.0)
        read.update(local_rope_base=number("rope.freq_base_swa", 10_000.0),
                    global_rope_scale=scale)
    try:
        config = family_config(arch, **sizes, **read)
    except ValueError as e:  # fields that disagree with each other (GemmaConfig's checks)
        raise ValueError(f"{header.path}: {e}") from None
    return match_preset(config)


def _zoo_config(header: GGUFHeader, arch: str, family: Any, sizes: dict) -> GemmaConfig:
    """A declared family's config: the sizes, the family's defaults and what its declaration
    reads from the metadata; tied when the file has no separate output matrix."""
    if "rope_freqs.weight" in header.tensors:
        raise ValueError(f"{header.path}: tensor 'rope_freqs.weight' (llama.cpp's rescaled "
                         f"RoPE frequencies, Llama 3.1 and later) is not supported; load the "
                         f"Hugging Face directory instead")
    try:
        read = family.from_gguf(_MetaFields(header, arch),
                                {k: v for k, v in sizes.items() if k != "name"})
        return GemmaConfig(**sizes, architecture=family.name, **{
            **family.defaults, "query_pre_attn_scalar": float(sizes["head_dim"]),
            "tie_embeddings": "output.weight" not in header.tensors, **read})
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(str(header.path))
                         else f"{header.path}: {message}") from None


def _pattern(header: GGUFHeader, arch: str, layers: int) -> tuple[str, ...]:
    """The local/global layer pattern: from the file if it says (newer llama.cpp), else the
    family's fixed pattern."""
    pattern = header.metadata.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is None:
        return gemma2_pattern(layers) if arch == "gemma2" else gemma3_pattern(layers)
    if isinstance(pattern, np.ndarray):  # one flag per layer: is it sliding-window?
        if len(pattern) != layers:
            raise ValueError(
                f"{header.path}: sliding_window_pattern has {len(pattern)} entries for "
                f"{layers} layers"
            )
        return tuple("local" if p else "global" for p in pattern)
    if isinstance(pattern, bool | np.bool_) or not isinstance(pattern, int | np.integer) \
            or pattern < 0:
        raise ValueError(f"{header.path}: GGUF metadata {arch}.attention.sliding_window_pattern "
                         f"must be a non-negative integer or one flag per layer; got "
                         f"{pattern!r}")
    period = int(pattern)  # every period-th layer is global
    return tuple("global" if period and (i + 1) % period == 0 else "local" for i in range(layers))


def match_preset(config: GemmaConfig) -> GemmaConfig:
    """The named preset equal to `config` in every field that affects the computation, or
    `config` itself.

    Ignored in the comparison: the name, the
    context length (converters sometimes rewrite it) and the query scale (GGUF has none).
    """
    for preset in PRESETS.values():
        if _shape_fields(preset) != _shape_fields(config):
            continue
        # The two Gemma 2/3 27B models scale queries by (embed / heads)^-1/2; see above.
        candidate = config.replace(
            name=preset.name, query_pre_attn_scalar=preset.query_pre_attn_scalar,
            context_length=preset.context_length,
        )
        if candidate == preset:
            return preset
    return config


# ----------------------------------------------------------------------------- tensors


def arrays_from_gguf(header: GGUFHeader, config: GemmaConfig) -> dict[str, np.ndarray]:
    """Our `{path: float32 array}` from the file's tensors, in our layouts (`params.PARAMS`
    names each tensor and its layout)."""
    # Before any tensor is dequantized: every tensor read once, each of the shape the config
    # needs (GGUF stores matrices [out, in], as Hugging Face does).
    params.match_tensors(config, header.tensors, names="gguf", source=str(header.path))
    for leaf in params.leaves(config):
        for name, want in zip(leaf.gguf, params.stored_shapes(leaf, hf=False), strict=True):
            got = header.tensors[name].shape
            if got != want:
                raise ValueError(f"{header.path}: tensor {name!r} has shape {got}; leaf "
                                 f"{leaf.path} of {config.name} needs {want}")
    family = FAMILIES.get(config.architecture)
    permuted = family is not None and family.gguf_rotary_permuted
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}

    def read(name: str) -> np.ndarray:
        w = read_tensor(header, name)
        kind = name.split(".")[-2] if name.startswith("blk.") else ""
        return unpermute_rotary(w, heads[kind]) if permuted and kind in heads else w

    # Some are transposed views; whoever converts them (jnp.asarray) copies them once anyway.
    return params.arrays_from_tensors(
        config, read, names="gguf",
        check=lambda name, w, shape: _reshaped(header, name, w, shape),
        description=f"dequantizing {Path(header.path).name}",
    )


def _reshaped(header: GGUFHeader, name: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if w.size != int(np.prod(shape)):
        raise ValueError(
            f"{header.path}: tensor {name!r} has shape {w.shape}, which does not fit {shape}"
        )
    return w.reshape(shape)


def read_gguf(path: str | os.PathLike) -> GGUFContents:
    """`(config, {path: float32 array}, metadata)` of a Gemma GGUF file.

    `metadata` is every key of the file (the tokenizer's vocabulary included), so callers can
    build the tokenizer (`Tokenizer.from_gguf_metadata`) without reading the file again.
    """
    header = read_gguf_header(path)
    config = config_from_gguf(header)
    return GGUFContents(config, arrays_from_gguf(header, config), header.metadata)


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    activation_dtype: Any = None,
    mesh: Any = None,
    rules: Any = None,
    check_finite: bool = True,
) -> Transformer:
    """A `Transformer` with the (dequantized) weights of a Gemma GGUF file.

    `dtype` is the parameter dtype (default float32); activations default to it too. With
    `mesh`, each parameter is placed by `gemma_eqx.sharding.shard_model(model, mesh, rules)`.
    A weight holding NaN or infinity is refused, by name (`check_finite=False` skips that).
    """
    config, arrays, _ = read_gguf(path)
    return model_from_contents(config, arrays, dtype=dtype, activation_dtype=activation_dtype,
                               mesh=mesh, rules=rules, source=f"GGUF file {path}",
                               check_finite=check_finite)


def model_from_contents(
    config: GemmaConfig,
    arrays: Mapping[str, np.ndarray],
    *,
    dtype: Any = None,
    activation_dtype: Any = None,
    mesh: Any = None,
    rules: Any = None,
    source: str = "GGUF weights",
    check_finite: bool = True,
) -> Transformer:
    """Build (and optionally shard) the model from `read_gguf`'s config and arrays."""
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    params = {p: jnp.asarray(a, dtype) for p, a in arrays.items()}
    model = model_from_arrays(config, params, activation_dtype=activation_dtype, source=source,
                              check_finite=check_finite)
    if mesh is not None:
        from ..parallel.sharding import shard_model  # written alongside; imported only when needed

        model = shard_model(model, mesh, rules)
    return model
