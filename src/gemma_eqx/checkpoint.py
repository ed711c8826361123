"""The official Kaggle Flax checkpoint format: an orbax PyTree of `{module path: {leaf: array}}`.

Restores place every leaf directly in its target sharding through orbax; saves write to a
temporary directory and rename it into place when complete.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jaxtyping import DTypeLike

from .atomic import StorageError
from .config import PRESETS, GemmaConfig, get_preset
from .modules import Transformer
from .sharding import LogicalAxes, ShardingRules
from .weights import leaf_paths, model_from_arrays

# Leaves of the Gemma 3 4B+ vision tower and projection; a text-only loader never reads them.
_VISION_MARKERS = ("SigLiP", "mm_input_projection", "mm_soft_embedding_norm")

Shapes = dict[str, dict[str, tuple[int, ...]]]


class CheckpointError(StorageError):
    """A checkpoint could not be read or written; the message names the file or leaf."""


_TENSORSTORE_LEAF = re.compile(r'Error (?:reading|writing) "([^"]+)\.([^./"]+)/[^"]*"')


def _innermost(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _checkpoint_error(e: Exception, path: Path, action: str) -> CheckpointError:
    cause = _innermost(e)
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    code = getattr(cause, "errno", None)
    if code == errno.ENOSPC or "No space left on device" in text:
        return CheckpointError(errno.ENOSPC, f"cannot write the checkpoint {path}: no space "
                               f"left on the device; free some space or write it elsewhere")
    if isinstance(cause, OSError) and code is not None:
        return CheckpointError(code, f"cannot {action} the checkpoint {path}: {cause.strerror}")
    leaf = _TENSORSTORE_LEAF.search(text)
    where = f" leaf {leaf[1]}/{leaf[2]}" if leaf else ""
    if action == "read":
        return CheckpointError(
            errno.EIO, f"{path}: cannot read{where}: the checkpoint's data files are missing, "
            f"truncated or corrupted ({text}); download or save the checkpoint again"
        )
    return CheckpointError(errno.EIO, f"cannot {action} the checkpoint {path}{where}: {text}")


class _OrbaxNoise(logging.Filter):
    """Drops the log records orbax's worker threads and abandoned futures write after a
    failure that `_run_orbax` has already raised as one `CheckpointError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("_SignalingThread.run() raised an exception" in text
                    or ("exception was never retrieved" in text
                        and ("OCDBT" in text or "TensorStore" in text)))


@functools.cache
def _silence_orbax_aftermath() -> None:
    """Once per process: after a failed read or write, orbax's abandoned coroutines and
    tensorstore's late callbacks print dozens of "Event loop is closed" tracebacks, some of
    them long after the failure; drop exactly those, and pass everything else on."""
    hook = sys.unraisablehook

    def quiet(unraisable: Any) -> None:
        error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax_coroutine = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or orbax_coroutine):
            hook(unraisable)

    sys.unraisablehook = quiet
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxNoise())


def _run_orbax(operation: Callable[[], Any], path: Path, action: str) -> Any:
    """`operation()`, with any orbax/tensorstore failure turned into one `CheckpointError`."""
    _silence_orbax_aftermath()
    try:
        return operation()
    except CheckpointError:
        raise
    except Exception as e:
        failure = _checkpoint_error(e, path, action)
    # Out of the handler, the failed operation's frames are free: collect its abandoned
    # futures and coroutines now rather than at some later moment.
    gc.collect()
    raise failure


class KaggleLeaf(NamedTuple):
    key: str  # e.g. "transformer/layer_0/attn/q_einsum"
    leaf: str  # e.g. "w"
    shape: tuple[int, ...]
    axes: LogicalAxes


def kaggle_layout(config: GemmaConfig) -> list[KaggleLeaf]:
    """Every leaf a Kaggle checkpoint of `config` holds, with its shape and logical axes."""
    d, n, k, h, f = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                     config.hidden_dim)
    leaves = [
        KaggleLeaf("transformer/embedder", "input_embedding", (config.vocab_size, d),
                   ("vocab", "embed")),
        KaggleLeaf("transformer/final_norm", "scale", (d,), ("embed",)),
    ]
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_norms:
        norms += ["post_attention_norm", "post_ffw_norm"]
    for i in range(config.num_layers):
        p = f"transformer/layer_{i}"
        leaves += [KaggleLeaf(f"{p}/{norm}", "scale", (d,), ("embed",)) for norm in norms]
        if k == n:
            leaves.append(KaggleLeaf(f"{p}/attn/qkv_einsum", "w", (3, n, d, h),
                                     (None, "heads", "embed", "head_dim")))
        else:
            leaves.append(KaggleLeaf(f"{p}/attn/q_einsum", "w", (n, d, h),
                                     ("heads", "embed", "head_dim")))
            leaves.append(KaggleLeaf(f"{p}/attn/kv_einsum", "w", (2, k, d, h),
                                     (None, "kv_heads", "embed", "head_dim")))
        leaves.append(KaggleLeaf(f"{p}/attn/attn_vec_einsum", "w", (n, h, d),
                                 ("heads", "head_dim", "embed")))
        if config.use_qk_norm:
            leaves.append(KaggleLeaf(f"{p}/attn/_query_norm", "scale", (h,), ("head_dim",)))
            leaves.append(KaggleLeaf(f"{p}/attn/_key_norm", "scale", (h,), ("head_dim",)))
        if config.checkpoint_gating_transposed:
            leaves.append(KaggleLeaf(f"{p}/mlp/gating_einsum", "w", (2, f, d),
                                     (None, "mlp", "embed")))
        else:
            leaves.append(KaggleLeaf(f"{p}/mlp/gating_einsum", "w", (2, d, f),
                                     (None, "embed", "mlp")))
        leaves.append(KaggleLeaf(f"{p}/mlp/linear", "w", (f, d), ("mlp", "embed")))
    return leaves


def arrays_from_kaggle(flat: Mapping[str, Mapping[str, Any]], config: GemmaConfig) -> dict:
    """Our `{path: array}` from a Kaggle `{key: {leaf: array}}` (splits and transposes)."""
    out = {
        "embedder.embedding": flat["transformer/embedder"]["input_embedding"],
        "final_norm.scale": flat["transformer/final_norm"]["scale"],
    }
    for i in range(config.num_layers):
        src, dst = f"transformer/layer_{i}/", f"blocks.{i}."
        for norm in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm",
                     "post_ffw_norm"):
            if src + norm in flat:
                out[f"{dst}{norm}.scale"] = flat[src + norm]["scale"]
        if src + "attn/qkv_einsum" in flat:
            qkv = flat[src + "attn/qkv_einsum"]["w"]
            out[dst + "attn.w_q"], out[dst + "attn.w_k"], out[dst + "attn.w_v"] = qkv
        else:
            out[dst + "attn.w_q"] = flat[src + "attn/q_einsum"]["w"]
            out[dst + "attn.w_k"], out[dst + "attn.w_v"] = flat[src + "attn/kv_einsum"]["w"]
        out[dst + "attn.w_o"] = flat[src + "attn/attn_vec_einsum"]["w"]
        if config.use_qk_norm:
            out[dst + "attn.query_norm.scale"] = flat[src + "attn/_query_norm"]["scale"]
            out[dst + "attn.key_norm.scale"] = flat[src + "attn/_key_norm"]["scale"]
        gating = flat[src + "mlp/gating_einsum"]["w"]
        if config.checkpoint_gating_transposed:
            gating = jnp.swapaxes(gating, 1, 2)
        out[dst + "mlp.w_gating"] = gating
        out[dst + "mlp.w_linear"] = flat[src + "mlp/linear"]["w"]
    return out


def kaggle_from_arrays(arrays: Mapping[str, Any], config: GemmaConfig) -> dict:
    """The inverse of `arrays_from_kaggle`."""
    flat: dict[str, dict[str, Any]] = {
        "transformer/embedder": {"input_embedding": arrays["embedder.embedding"]},
        "transformer/final_norm": {"scale": arrays["final_norm.scale"]},
    }
    for i in range(config.num_layers):
        src, dst = f"blocks.{i}.", f"transformer/layer_{i}/"
        for norm in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm",
                     "post_ffw_norm"):
            if f"{src}{norm}.scale" in arrays:
                flat[dst + norm] = {"scale": arrays[f"{src}{norm}.scale"]}
        q, k, v = (arrays[src + f"attn.w_{x}"] for x in "qkv")
        if config.num_kv_heads == config.num_heads:
            flat[dst + "attn/qkv_einsum"] = {"w": jnp.stack([q, k, v])}
        else:
            flat[dst + "attn/q_einsum"] = {"w": q}
            flat[dst + "attn/kv_einsum"] = {"w": jnp.stack([k, v])}
        flat[dst + "attn/attn_vec_einsum"] = {"w": arrays[src + "attn.w_o"]}
        if config.use_qk_norm:
            flat[dst + "attn/_query_norm"] = {"scale": arrays[src + "attn.query_norm.scale"]}
            flat[dst + "attn/_key_norm"] = {"scale": arrays[src + "attn.key_norm.scale"]}
        gating = arrays[src + "mlp.w_gating"]
        if config.checkpoint_gating_transposed:
            gating = jnp.swapaxes(gating, 1, 2)
        flat[dst + "mlp/gating_einsum"] = {"w": gating}
        flat[dst + "mlp/linear"] = {"w": arrays[src + "mlp.w_linear"]}
    return flat


def detect_preset(shapes: Shapes) -> GemmaConfig:
    """The preset whose Kaggle layout has exactly these shapes (`{key: {leaf: shape}}`).

    Uses widths, head counts, head dim, MLP width, vocabulary, layer count and which norms
    exist, never the layer count alone (gemma-2b and gemma3-270m both have 18 layers).
    """
    found = _signature(shapes)
    for config in PRESETS.values():
        if _signature_of(config) == found:
            return config
    described = ", ".join(f"{k}={v}" for k, v in found.items())
    raise ValueError(
        f"checkpoint shapes match no Gemma preset ({described}); pass preset=GemmaConfig(...) "
        f"for a custom architecture"
    )


def _signature(shapes: Shapes) -> dict[str, Any]:
    def get(key: str, leaf: str) -> tuple[int, ...]:
        try:
            return tuple(shapes[key][leaf])
        except KeyError:
            raise ValueError(
                f"checkpoint has no leaf {key}/{leaf}; not a Gemma checkpoint"
            ) from None

    layers = sum(1 for k in shapes if k.startswith("transformer/layer_") and k.endswith("/linear"))
    n, h, d = get("transformer/layer_0/attn/attn_vec_einsum", "w")
    if "transformer/layer_0/attn/qkv_einsum" in shapes:
        kv = get("transformer/layer_0/attn/qkv_einsum", "w")[1]
    else:
        kv = get("transformer/layer_0/attn/kv_einsum", "w")[1]
    return dict(
        layers=layers, embed=get("transformer/final_norm", "scale")[0], heads=n, kv_heads=kv,
        head_dim=h, mlp=get("transformer/layer_0/mlp/linear", "w")[0],
        vocab=get("transformer/embedder", "input_embedding")[0],
        qk_norm="transformer/layer_0/attn/_query_norm" in shapes,
        post_norms="transformer/layer_0/post_attention_norm" in shapes,
    )


def _signature_of(config: GemmaConfig) -> dict[str, Any]:
    return dict(
        layers=config.num_layers, embed=config.embed_dim, heads=config.num_heads,
        kv_heads=config.num_kv_heads, head_dim=config.head_dim, mlp=config.hidden_dim,
        vocab=config.vocab_size, qk_norm=config.use_qk_norm, post_norms=config.use_post_norms,
    )


def layout_shapes(config: GemmaConfig) -> Shapes:
    """`{key: {leaf: shape}}` of a Kaggle checkpoint of `config`."""
    shapes: Shapes = {}
    for leaf in kaggle_layout(config):
        shapes.setdefault(leaf.key, {})[leaf.leaf] = leaf.shape
    return shapes


def _is_vision(key: str, leaf: str) -> bool:
    return any(m in key or m in leaf for m in _VISION_MARKERS)


def _read_shapes(path: Path) -> Shapes:
    import orbax.checkpoint as ocp

    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {path} is not a directory (an orbax checkpoint is one)")
    try:
        tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata
    except Exception as e:  # orbax raises many types for foreign directories
        raise ValueError(f"{path} is not an orbax checkpoint ({type(e).__name__}: {e})") from None
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or not tree:
        raise ValueError(f"{path} is not an orbax checkpoint (no readable PyTree metadata)")
    shapes: Shapes = {}
    for key, leaves in tree.items():
        if not isinstance(leaves, Mapping):
            raise ValueError(f"{path}: entry {key!r} is not a dictionary of leaves; "
                             "not a Kaggle Gemma checkpoint")
        for leaf, meta in leaves.items():
            if not _is_vision(key, leaf):
                shapes.setdefault(key, {})[leaf] = tuple(meta.shape)
    return shapes


def check_layout(shapes: Shapes, config: GemmaConfig, source: str) -> None:
    """Raise a ValueError naming the first missing, extra or misshaped leaf."""
    expected = layout_shapes(config)
    found = {(k, leaf): s for k, leaves in shapes.items() for leaf, s in leaves.items()}
    wanted = {(k, leaf): s for k, leaves in expected.items() for leaf, s in leaves.items()}
    for key in wanted:
        if key not in found:
            raise ValueError(f"{source}: leaf {key[0]}/{key[1]} is missing "
                             f"(expected shape {wanted[key]} for {config.name!r})")
    for key in found:
        if key not in wanted:
            raise ValueError(f"{source}: unexpected leaf {key[0]}/{key[1]} with shape "
                             f"{found[key]} for {config.name!r}")
    for key, shape in wanted.items():
        if found[key] != shape:
            raise ValueError(f"{source}: leaf {key[0]}/{key[1]} has shape {found[key]}, "
                             f"expected {shape} for {config.name!r}")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    preset: str | GemmaConfig = "auto",
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    dtype: DTypeLike | None = None,
    activation_dtype: DTypeLike | None = None,
    check_finite: bool = True,
) -> Transformer:
    """Restore a Kaggle Flax (orbax, flat) Gemma checkpoint.

    The preset is detected from leaf shapes unless given. With a `mesh`, orbax reads every leaf
    straight into the sharding that `rules` names for it; otherwise onto the default device.
    `dtype` casts parameters on restore (default: as stored); activations default to float32.
    Every leaf is checked for NaN and infinity (one pass; `check_finite=False` skips it).
    Missing or truncated data files raise one `CheckpointError` naming the leaf.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    shapes = _read_shapes(path)
    if preset == "auto":
        config = detect_preset(shapes)
    else:
        config = get_preset(preset) if isinstance(preset, str) else preset
    check_layout(shapes, config, source=str(path))

    def sharding(leaf: KaggleLeaf) -> Any:
        if mesh is None:
            return SingleDeviceSharding(jax.local_devices()[0])
        from .sharding import DEFAULT_RULES

        spec = (rules or DEFAULT_RULES).spec(leaf.axes, leaf.shape, mesh)
        return NamedSharding(mesh, spec)

    item: dict[str, dict[str, Any]] = {}
    restore_args: dict[str, dict[str, Any]] = {}
    for leaf in kaggle_layout(config):
        item.setdefault(leaf.key, {})[leaf.leaf] = 0
        restore_args.setdefault(leaf.key, {})[leaf.leaf] = ocp.ArrayRestoreArgs(
            sharding=sharding(leaf), dtype=dtype
        )
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    flat = _run_orbax(lambda: ocp.PyTreeCheckpointer().restore(path, args=args), path, "read")
    arrays = arrays_from_kaggle(flat, config)
    if mesh is not None:
        from .sharding import leaf_sharding

        # Splits and transposes can leave a leaf in another sharding than its own rule names.
        arrays = {p: jax.device_put(a, leaf_sharding(p, a.shape, mesh, rules))
                  for p, a in arrays.items()}
    return model_from_arrays(
        config, arrays, activation_dtype=activation_dtype or jnp.float32, source=str(path),
        check_finite=check_finite,
    )


def save_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype: DTypeLike | None = jnp.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write `model` in the Kaggle layout (bf16 by default; `dtype=None` keeps each leaf's).

    The checkpoint is written to a temporary sibling directory and renamed when complete, so
    `path` never holds a partial checkpoint.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    arrays = leaf_paths(model)
    if dtype is not None:
        arrays = {p: a.astype(dtype) for p, a in arrays.items()}
    flat = kaggle_from_arrays(arrays, model.config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / "checkpoint"
    except OSError as e:
        raise CheckpointError.writing(e, f"the checkpoint {path}", "write it elsewhere") \
            from None
    try:
        _run_orbax(lambda: ocp.PyTreeCheckpointer().save(tmp, args=ocp.args.PyTreeSave(flat)),
                   path, "write")
        if path.exists():
            trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
            path.rename(trash)
            tmp.rename(path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return path
