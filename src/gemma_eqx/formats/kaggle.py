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
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jaxtyping import DTypeLike

from ..core.atomic import StorageError, remove_partials, replace_directory
from ..core.config import PRESETS, GemmaConfig, get_preset
from ..model import params
from ..model.modules import Transformer
from ..model.params import LogicalAxes
from ..model.weights import leaf_paths, model_from_arrays
from ..parallel.sharding import ShardingRules

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


# The official checkpoints store the gating weight as [2, mlp, embed] for Gemma 3 and for
# Gemma 2 9B and 27B, as [2, embed, mlp] otherwise. Loading reads it from the stored shape.
_GATING_TRANSPOSED_PRESETS = ("gemma2-9b", "gemma2-27b")


def gating_transposed(config: GemmaConfig) -> bool:
    """Whether a Kaggle checkpoint of `config` stores the gating weight as [2, mlp, embed]:
    as the official checkpoints of its family do (custom configs follow Gemma 2 2B's layout
    for Gemma 1 and 2)."""
    return config.use_qk_norm or config.name in _GATING_TRANSPOSED_PRESETS


def _is_gating(leaf: params.Leaf) -> bool:
    return leaf.param.storage is params.Storage.GATE_UP


def kaggle_layout(config: GemmaConfig, *, transposed: bool | None = None) -> list[KaggleLeaf]:
    """Every leaf a Kaggle checkpoint of `config` holds, with its shape and logical axes
    (derived from `params.PARAMS`); `transposed` is the gating layout (default: official)."""
    transposed = gating_transposed(config) if transposed is None else transposed
    out = []
    for leaf in params.leaves(config):
        slot, shape, axes = leaf.kaggle, leaf.shape, leaf.param.axes
        if _is_gating(leaf) and transposed:
            shape, axes = (shape[0], shape[2], shape[1]), (axes[0], axes[2], axes[1])
        if slot.part is not None:
            if slot.part:
                continue  # the stack is listed once, at its first part
            shape, axes = (slot.parts, *shape), (None, *axes)
        out.append(KaggleLeaf(slot.key, slot.leaf, shape, axes))
    return out


_GATING = ("transformer/layer_0/mlp/gating_einsum", "w")


def _stored_transposed(shapes: Mapping[str, Mapping[str, Any]], config: GemmaConfig) -> bool:
    """Which gating layout a checkpoint uses, read from its stored shape."""
    stored = shapes.get(_GATING[0], {}).get(_GATING[1], ())
    shape = tuple(getattr(stored, "shape", stored))
    d, f = config.embed_dim, config.hidden_dim
    return shape[1:] == (f, d) and (d != f or gating_transposed(config))


def arrays_from_kaggle(flat: Mapping[str, Mapping[str, Any]], config: GemmaConfig) -> dict:
    """Our `{path: array}` from a Kaggle `{key: {leaf: array}}` (unstacks and transposes)."""
    transposed = _stored_transposed(flat, config)
    out = {}
    for leaf in params.leaves(config):
        slot = leaf.kaggle
        array = flat[slot.key][slot.leaf]
        if slot.part is not None:
            array = array[slot.part]
        if _is_gating(leaf) and transposed:
            array = jnp.swapaxes(array, 1, 2)
        out[leaf.path] = array
    return out


def kaggle_from_arrays(
    arrays: Mapping[str, Any], config: GemmaConfig, *, transposed: bool | None = None
) -> dict:
    """The inverse of `arrays_from_kaggle`, in the order of the official checkpoints."""
    transposed = gating_transposed(config) if transposed is None else transposed
    parts: dict[tuple[str, str], list[Any]] = {}
    for leaf in params.leaves(config):
        slot, array = leaf.kaggle, arrays[leaf.path]
        if _is_gating(leaf) and transposed:
            array = jnp.swapaxes(array, 1, 2)
        parts.setdefault((slot.key, slot.leaf), []).append(array)
    flat: dict[str, dict[str, Any]] = {}
    for key, leaf_name in sorted(parts, key=_official_order):
        stack = parts[key, leaf_name]
        flat.setdefault(key, {})[leaf_name] = stack[0] if len(stack) == 1 else jnp.stack(stack)
    return flat


_KEY_ORDER = ("embedder", "final_norm", "pre_attention_norm", "pre_ffw_norm",
              "post_attention_norm", "post_ffw_norm", "attn/qkv_einsum", "attn/q_einsum",
              "attn/kv_einsum", "attn/attn_vec_einsum", "attn/_query_norm", "attn/_key_norm",
              "mlp/gating_einsum", "mlp/linear",
              # Not in Gemma's checkpoints: other families' leaves, in our own saves.
              "unembedder", "attn/q_bias", "attn/k_bias", "attn/v_bias", "attn/o_bias",
              "mlp/in_bias", "mlp/out_bias")


def _official_order(slot: tuple[str, str]) -> tuple[int, int]:
    """Layer by layer, leaves in the order the official checkpoints (and orbax's metadata of
    every checkpoint this library wrote before) list them."""
    key = slot[0]
    layer = re.match(r"transformer/layer_(\d+)/", key)
    rest = key[len(layer[0]):] if layer else key.removeprefix("transformer/")
    return (int(layer[1]) + 1 if layer else 0), _KEY_ORDER.index(rest)


def detect_preset(shapes: Shapes) -> GemmaConfig:
    """The preset whose Kaggle layout has exactly these shapes (`{key: {leaf: shape}}`, the
    gating weight in either layout): every leaf's shape, not the layer count alone (gemma-2b
    and gemma3-270m both have 18 layers)."""
    for config in PRESETS.values():
        if any(_same_shapes(shapes, layout_shapes(config, transposed=t)) for t in (False, True)):
            return config
    raise ValueError(
        f"checkpoint shapes match no Gemma preset ({_describe(shapes)}); pass "
        f"preset=GemmaConfig(...) for a custom architecture"
    )


def _same_shapes(found: Shapes, expected: Shapes) -> bool:
    return {k: dict(v) for k, v in found.items()} == expected


def _describe(shapes: Shapes) -> str:
    layers = sum(1 for k in shapes if k.startswith("transformer/layer_") and k.endswith("/linear"))
    found = [f"layers={layers}"]
    for key, leaf, name in (("transformer/final_norm", "scale", "embed"),
                            ("transformer/embedder", "input_embedding", "embedding"),
                            ("transformer/layer_0/attn/attn_vec_einsum", "w", "attn_vec_einsum"),
                            ("transformer/layer_0/mlp/linear", "w", "mlp/linear")):
        if leaf in shapes.get(key, {}):
            value = shapes[key][leaf]
            found.append(f"{name}={value[0] if len(value) == 1 else tuple(value)}")
    return ", ".join(found)


def layout_shapes(config: GemmaConfig, *, transposed: bool | None = None) -> Shapes:
    """`{key: {leaf: shape}}` of a Kaggle checkpoint of `config`."""
    shapes: Shapes = {}
    for leaf in kaggle_layout(config, transposed=transposed):
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
            if _is_vision(key, leaf):
                continue
            dtype = getattr(meta, "dtype", None)
            if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{path}: leaf {key}/{leaf} is stored as {jnp.dtype(dtype)}; "
                                 f"weights must be floating point")
            shapes.setdefault(key, {})[leaf] = tuple(meta.shape)
    return shapes


def check_layout(shapes: Shapes, config: GemmaConfig, source: str) -> None:
    """Raise a ValueError naming the first missing, extra or misshaped leaf."""
    expected = layout_shapes(config, transposed=_stored_transposed(shapes, config))
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
        from ..parallel.sharding import DEFAULT_RULES, auto_axes

        spec = (rules or DEFAULT_RULES).spec(leaf.axes, leaf.shape, mesh)
        return NamedSharding(auto_axes(mesh), spec)

    item: dict[str, dict[str, Any]] = {}
    restore_args: dict[str, dict[str, Any]] = {}
    for leaf in kaggle_layout(config, transposed=_stored_transposed(shapes, config)):
        item.setdefault(leaf.key, {})[leaf.leaf] = 0
        restore_args.setdefault(leaf.key, {})[leaf.leaf] = ocp.ArrayRestoreArgs(
            sharding=sharding(leaf), dtype=dtype
        )
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    flat = _run_orbax(lambda: ocp.PyTreeCheckpointer().restore(path, args=args), path, "read")
    arrays = arrays_from_kaggle(flat, config)
    if mesh is not None:
        from ..parallel.sharding import leaf_sharding

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
    transposed_gating: bool | None = None,
) -> Path:
    """Write `model` in the Kaggle layout (bf16 by default; `dtype=None` keeps each leaf's;
    the gating weight as the official checkpoints of its family store it unless
    `transposed_gating` says).

    The checkpoint is written under a temporary sibling name and renamed when complete
    (`atomic.replace_directory`), so `path` never holds a partial checkpoint.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    arrays = leaf_paths(model)
    if dtype is not None:
        arrays = {p: a.astype(dtype) for p, a in arrays.items()}
    flat = kaggle_from_arrays(arrays, model.config, transposed=transposed_gating)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_partials(path)  # what interrupted saves left
        with replace_directory(path) as new:
            _run_orbax(lambda: ocp.PyTreeCheckpointer().save(new, args=ocp.args.PyTreeSave(flat)),
                       path, "write")
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError.writing(e, f"the checkpoint {path}", "write it elsewhere") \
            from None
    return path
