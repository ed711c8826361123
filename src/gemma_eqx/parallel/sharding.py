"""Rule tables that map the logical axes of every parameter (from `params.PARAMS`) onto a
device mesh."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ..model.params import LogicalAxes, logical_axes
from ..model.weights import map_leaves_with_path


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Which mesh axis each logical axis is split over.

    `axes` maps logical axis names to mesh axis names. `last_axis`, if set, instead splits
    every leaf over its last axis on that mesh axis (Penzai's Gemma tutorial does this).
    An axis whose size the mesh axis does not divide stays whole (replicated).
    """

    axes: tuple[tuple[str, str | None], ...] = ()
    last_axis: str | None = None

    def spec(self, axes: LogicalAxes, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
        if self.last_axis is not None:
            names: list[str | None] = [None] * len(shape)
            if shape and shape[-1] % mesh.shape[self.last_axis] == 0:
                names[-1] = self.last_axis
            return PartitionSpec(*names)
        table, used, names = dict(self.axes), set(), []
        for axis, size in zip(axes, shape, strict=True):
            mesh_axis = table.get(axis) if axis is not None else None
            if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
                names.append(None)
            else:
                names.append(mesh_axis)
                used.add(mesh_axis)
        return PartitionSpec(*names)


DEFAULT_RULES = ShardingRules(
    axes=(("vocab", "model"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
          ("latents", "model"))  # a sparse dictionary's width (interp.features)
)
LAST_AXIS_RULES = ShardingRules(last_axis="model")


def default_mesh(devices: Any = None) -> Mesh:
    """A one-axis `("model",)` mesh over all devices (or the given ones): every process's,
    in a multi-process cluster."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("model",))


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis in Auto mode. `jax.make_mesh` makes Explicit axes by default,
    under which the embedding gather of a vocabulary-split table has no single out-sharding;
    the model leaves placement of its intermediates to XLA instead."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def leaf_sharding(
    path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules | None = None
) -> NamedSharding:
    """The sharding of the leaf at `path` under `rules` (default: `DEFAULT_RULES`)."""
    rules = DEFAULT_RULES if rules is None else rules
    mesh = auto_axes(mesh)
    return NamedSharding(mesh, rules.spec(logical_axes(path, len(shape)), tuple(shape), mesh))


def shard_model(model: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Place every array leaf of an in-memory model in the sharding its rule names."""
    return map_leaves_with_path(
        lambda p, x: jax.device_put(x, leaf_sharding(p, x.shape, mesh, rules)), model
    )
