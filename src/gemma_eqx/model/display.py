"""How recorded activations look in treescope (the `treescope` extra): each record with its
site's axis names, and `render_site`, a recorded activation drawn with its site's named axes
and token labels. Modules themselves render through `base.Module`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .base import annotate, sharding_note, with_sharding_notes


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
                f"{key!r}: ", annotate(subtree_renderer(array, path=item_path), note)),
            comma,
        ))
    records = parts.build_foldable_tree_node_from_children(
        prefix=parts.text("{"), children=lines, suffix=parts.text("}"), path=inner)
    return repr_lib.render_object_constructor(
        type(owner), {"arrays": _Prerendered(records), **fields}, path,
        with_sharding_notes(subtree_renderer),
    )


@dataclasses.dataclass(frozen=True)
class _Prerendered:
    """Stands in for a field whose treescope rendering is already built."""

    rendering: Any

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return self.rendering


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
