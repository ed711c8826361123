"""Models as flat `{path: array}` dictionaries: the common ground of every checkpoint format.

Paths name leaves of a `Transformer` the way Python reaches them, e.g. `blocks.3.attn.w_q`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import DTypeLike

from ..core.checks import check_finite_leaves
from ..core.config import GemmaConfig
from .modules import Transformer


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return ".".join(parts)


def leaf_paths(model: Any) -> dict[str, Any]:
    """`{path: leaf}` for every array leaf (concrete or abstract) of a model."""
    flat, _ = jax.tree_util.tree_flatten_with_path(model)
    return {_path_str(p): leaf for p, leaf in flat if hasattr(leaf, "shape")}


def abstract_model(
    config: GemmaConfig, dtype: DTypeLike = jnp.float32, activation_dtype: DTypeLike | None = None
) -> Transformer:
    """The model's structure with `jax.ShapeDtypeStruct` leaves; allocates nothing."""
    return eqx.filter_eval_shape(
        Transformer, config, key=jax.random.key(0), dtype=dtype, activation_dtype=activation_dtype
    )


def map_leaves_with_path(fn: Callable[[str, Any], Any], model: Any) -> Any:
    """Replace every array leaf by `fn(path, leaf)`."""
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fn(_path_str(p), leaf) if hasattr(leaf, "shape") else leaf, model
    )


def model_from_arrays(
    config: GemmaConfig,
    arrays: Mapping[str, Any],
    *,
    activation_dtype: DTypeLike | None = None,
    source: str = "weights",
    check_finite: bool = True,
) -> Transformer:
    """Build a model whose leaves are exactly `arrays` (checked: no leaf missing, extra or
    misshaped, and with `check_finite` no NaN or infinity). Arrays are used as given, so their
    dtype and sharding are kept."""
    for path, array in arrays.items():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"{source}: weight {path} has dtype {array.dtype}; weights must be "
                             f"floating point")
    dtypes = {jnp.dtype(a.dtype) for a in arrays.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else jnp.float32
    skeleton = abstract_model(config, dtype, activation_dtype)
    expected = leaf_paths(skeleton)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{source}: does not match the {config.name!r} architecture"
            + (f"; missing leaves: {', '.join(missing[:8])}" if missing else "")
            + (f"; unexpected leaves: {', '.join(extra[:8])}" if extra else "")
        )
    for path, leaf in expected.items():
        if tuple(arrays[path].shape) != tuple(leaf.shape):
            raise ValueError(
                f"{source}: leaf {path} has shape {tuple(arrays[path].shape)}, "
                f"expected {tuple(leaf.shape)} for {config.name!r}"
            )
    if check_finite:
        check_finite_leaves(arrays, source)
    return map_leaves_with_path(lambda path, _: arrays[path], skeleton)
