"""The base of every module here: an `eqx.Module` that renders in treescope (the `treescope`
extra) with each field's shape and dtype, and each array spread over several devices says how
(`# P(None, 'model') over model=8`). `display` builds the site-aware renderings on it."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
from jax.sharding import NamedSharding


def sharding_note(array: Any) -> str | None:
    """How `array` is laid out over devices, or None when it lives on one device.

    `"P(None, 'model') over data=2 x model=4"` for a named sharding, `"replicated over 8
    devices"` when every device holds all of it."""
    sharding = getattr(array, "sharding", None)
    if not isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer) or sharding is None:
        return None
    if len(sharding.device_set) <= 1:
        return None
    if sharding.is_fully_replicated:
        return f"replicated over {len(sharding.device_set)} devices"
    if isinstance(sharding, NamedSharding):
        mesh = " x ".join(f"{name}={size}" for name, size in sharding.mesh.shape.items())
        spec = ", ".join(repr(axis) for axis in sharding.spec)
        return f"P({spec}) over {mesh}"
    return f"split over {len(sharding.device_set)} devices as {sharding.shard_shape(array.shape)}"


def annotate(rendering: Any, note: str | None) -> Any:
    """`rendering` with `note` as a line comment (shown when its parent is expanded)."""
    if not note:
        return rendering
    from treescope import rendering_parts as parts

    comment = parts.comment_color(parts.text(f"  # {note}"))
    return parts.RenderableAndLineAnnotations(
        renderable=rendering.renderable,
        annotations=parts.siblings(rendering.annotations or parts.empty_part(), comment),
    )


def with_sharding_notes(subtree_renderer: Any) -> Any:
    """`subtree_renderer` that annotates arrays with their sharding and folds the config (the
    same on every module; one click opens it)."""
    from treescope import layout_algorithms

    from ..core.config import GemmaConfig

    def render(node: Any, path: str | None = None) -> Any:
        rendering = subtree_renderer(node, path=path)
        if isinstance(node, GemmaConfig):
            layout_algorithms.expand_to_depth(rendering.renderable, 0)
        return annotate(rendering, sharding_note(node))

    return render


def render_module(module: eqx.Module, path: str | None, subtree_renderer: Any) -> Any:
    """A treescope rendering of `module`: its fields (static ones too) as constructor
    arguments, each directly held array annotated with its sharding."""
    from treescope import repr_lib

    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)}
    return repr_lib.render_object_constructor(
        type(module), fields, path, with_sharding_notes(subtree_renderer), roundtrippable=True
    )


class Module(eqx.Module):
    """An `eqx.Module` that renders in treescope with each array's sharding; the base of
    every module here."""

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return render_module(self, path, subtree_renderer)
