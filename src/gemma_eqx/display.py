"""How models and activations look in treescope (the `treescope` extra): every module lists
its fields with shapes and dtypes, each array spread over several devices says how
(`# P(None, 'model') over model=8`), installed interventions show as fields of the hooks, and
`render_site` draws a recorded activation with its site's named axes and token labels."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
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


def _annotate(rendering: Any, note: str | None) -> Any:
    """`rendering` with `note` as a line comment (shown when its parent is expanded)."""
    if not note:
        return rendering
    from treescope import rendering_parts as parts

    comment = parts.comment_color(parts.text(f"  # {note}"))
    return parts.RenderableAndLineAnnotations(
        renderable=rendering.renderable,
        annotations=parts.siblings(rendering.annotations or parts.empty_part(), comment),
    )


def _with_sharding(subtree_renderer: Any) -> Any:
    """`subtree_renderer` that annotates arrays with their sharding and folds the config (the
    same on every module; one click opens it)."""
    from treescope import layout_algorithms

    from .config import GemmaConfig

    def render(node: Any, path: str | None = None) -> Any:
        rendering = subtree_renderer(node, path=path)
        if isinstance(node, GemmaConfig):
            layout_algorithms.expand_to_depth(rendering.renderable, 0)
        return _annotate(rendering, sharding_note(node))

    return render


def render_module(module: eqx.Module, path: str | None, subtree_renderer: Any) -> Any:
    """A treescope rendering of `module`: its fields (static ones too) as constructor
    arguments, each directly held array annotated with its sharding."""
    from treescope import repr_lib

    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)}
    return repr_lib.render_object_constructor(
        type(module), fields, path, _with_sharding(subtree_renderer), roundtrippable=True
    )


def render_records(
    owner: Any, arrays: Mapping[str, Any], path: str | None, subtree_renderer: Any,
    **fields: Any,
) -> Any:
    """`Owner(arrays={key: array  # axes, ...}, **fields)`: recorded activations keyed
    `'blocks.3.pattern'` or `'logits'`, each annotated with its site's axis names."""
    from treescope import rendering_parts as parts
    from treescope import repr_lib

    from .sites import site_spec

    inner = path and f"{path}.arrays"
    lines = []
    for i, (key, array) in enumerate(arrays.items()):
        axes = site_spec(key.rsplit(".", 1)[-1]).shape
        note = "; ".join(n for n in (axes, sharding_note(array)) if n)
        item_path = inner and f"{inner}[{key!r}]"
        comma = (parts.siblings(",", parts.fold_condition(collapsed=parts.text(" ")))
                 if i < len(arrays) - 1 else parts.fold_condition(expanded=parts.text(",")))
        lines.append(parts.build_full_line_with_annotations(
            parts.siblings_with_annotations(
                f"{key!r}: ", _annotate(subtree_renderer(array, path=item_path), note)),
            comma,
        ))
    records = parts.build_foldable_tree_node_from_children(
        prefix=parts.text("{"), children=lines, suffix=parts.text("}"), path=inner)
    return repr_lib.render_object_constructor(
        type(owner), {"arrays": _Prerendered(records), **fields}, path,
        _with_sharding(subtree_renderer),
    )


@dataclasses.dataclass(frozen=True)
class _Prerendered:
    """Stands in for a field whose treescope rendering is already built."""

    rendering: Any

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return self.rendering


class Module(eqx.Module):
    """An `eqx.Module` that renders in treescope with each array's sharding; the base of
    every module here."""

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return render_module(self, path, subtree_renderer)


def _labels(values: Sequence[Any] | None, size: int, axis: str) -> list[str] | None:
    if values is None:
        return None
    labels = [str(v) for v in values]
    if len(labels) != size:
        raise ValueError(f"{len(labels)} labels for axis {axis!r} of size {size}")
    return labels


def render_site(
    array: Any,
    site: str,
    *,
    tokens: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    **render_kwargs: Any,
) -> Any:
    """A treescope figure of a recorded activation with its site's named axes.

    `array` is one site's record (`[batch heads query key]` for `"pattern"`) or a stack of
    them (`[layers, ...]`, as `ActivationCache.stack` and `attention_patterns` return;
    `layers` names them). `tokens` labels the sequence axes (query and key too). Patterns
    draw query rows against key columns, one panel per head; other sites draw sequence rows
    against their last axis. `render_kwargs` go to `treescope.render_array`."""
    import treescope

    from .sites import site_spec

    spec = site_spec(site)
    array = np.asarray(array)
    axes = list(spec.axes)
    if array.ndim == len(axes) + 1:
        axes = ["layer", *axes]
    if array.ndim != len(axes):
        raise ValueError(
            f"site {site} records arrays [{spec.shape}] (or a [layer ...] stack of them); "
            f"got shape {array.shape}"
        )
    index = {name: i for i, name in enumerate(axes)}
    item_labels: dict[int, list[str]] = {}
    for name in ("seq", "query", "key"):
        if name in index and (labels := _labels(tokens, array.shape[index[name]], name)):
            item_labels[index[name]] = labels
    if "layer" in index and (labels := _labels(layers, array.shape[0], "layer")):
        item_labels[0] = labels
    if "query" in index:
        rows, columns = ["query"], ["key", "heads"]  # innermost first
        render_kwargs = {"vmin": 0.0, "vmax": 1.0, **render_kwargs} if site == "pattern" else (
            render_kwargs)
    else:
        rows, columns = [spec.axes[spec.seq_axis]], [axes[-1]]
    sliders = [a for a in axes if a not in rows and a not in columns]
    return treescope.render_array(
        array,
        rows=[index[a] for a in rows], columns=[index[a] for a in columns],
        sliders=[index[a] for a in sliders],
        axis_labels=dict(enumerate(axes)), axis_item_labels=item_labels or None,
        **render_kwargs,
    )
