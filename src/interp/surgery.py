"""Attention surgery: record, override and knock out attention patterns of a `Transformer`.

The attention pattern is the site `pattern` of `gemma_eqx.model.sites`; these are the study's
shortcuts over `interp.interventions`, which reaches every other site the same way. Each
function returns a *new* model (installed through `eqx.tree_at`); the original model is
untouched and the weight arrays are shared, not copied. A record on a layer shows the pattern
the layer used, after any override or knock-out.

    model = knock_out(model, mask)                   # mask [layers, heads], 1 = keep, 0 = to BOS
    model = record_attention(model, layers=[3])      # records the knocked-out pattern
    logits, records = forward_with_records(model, tokens)
    grads = jax.grad(lambda m: loss(set_knockout_mask(model, m)))(mask)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from gemma_eqx.core.checks import check_finite, check_head_pairs, check_indices
from gemma_eqx.model.modules import Transformer

from .capture import as_inputs, run_with_records
from .install import add_interventions, select_layers
from .interventions import KnockOut, Layers, OverridePattern, Record, TokenIds

LayerSelector = Layers
HeadSelector = Sequence[int] | None


def _num_layers(model: Transformer) -> int:
    return len(model.blocks)


def _num_heads(model: Transformer) -> int:
    return model.config.num_heads


def _select_heads(model: Transformer, heads: HeadSelector) -> tuple[int, ...] | None:
    if heads is None:
        return None
    return check_indices(heads, _num_heads(model), "head")


def record_attention(
    model: Transformer,
    *,
    layers: LayerSelector = None,
    heads: HeadSelector = None,
    queries: Sequence[int] | None = None,
) -> Transformer:
    """A model whose chosen layers record their (final) attention pattern, restricted to
    `heads` and `queries` (query indices; see `Record` for the memory it takes)."""
    head_idx = _select_heads(model, heads)
    query_idx = None if queries is None else check_indices(queries, None, "query")
    hook = Record("pattern", heads=head_idx, positions=query_idx)
    return add_interventions(model, {i: hook for i in select_layers(model, layers)})


def override_attention(
    model: Transformer,
    layers: LayerSelector,
    *,
    pattern: Float[Array, "*lead query key"] | None = None,
    fn: Callable[[Array], Array] | None = None,
    heads: HeadSelector = None,
) -> Transformer:
    """A model whose chosen layers and heads use `pattern` (or `fn(weights)`) as attention."""
    head_idx = _select_heads(model, heads)
    head_mask = None
    if head_idx is not None:
        head_mask = jnp.zeros((_num_heads(model),), bool).at[jnp.asarray(head_idx)].set(True)
    if pattern is not None:
        check_finite(pattern, "override pattern")
        pattern = jnp.asarray(pattern)
    hook = OverridePattern("pattern", pattern=pattern, heads=head_mask, fn=fn)
    return add_interventions(model, {i: hook for i in select_layers(model, layers)})


def _check_mask(model: Transformer, mask: Any, name: str = "knock-out mask") -> None:
    """Shape exactly `[layers, heads]` (never broadcast), a real dtype, finite values."""
    expected = (_num_layers(model), _num_heads(model))
    if not hasattr(mask, "shape") or tuple(mask.shape) != expected:
        got = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(f"{name} must have shape [layers, heads] = {expected}; got {got}")
    if not (jnp.issubdtype(mask.dtype, jnp.floating) or jnp.issubdtype(mask.dtype, jnp.integer)
            or mask.dtype == jnp.bool_):
        raise TypeError(f"{name} must hold real numbers (1 keeps a head, 0 knocks it out); "
                        f"got {mask.dtype}")
    check_finite(mask, name, axes=("layer", "head"))


def knock_out(model: Transformer, mask: Float[Array, "layers heads"]) -> Transformer:
    """A model with a `KnockOut` on every layer, layer `i` using `mask[i]` (1 keeps a head,
    0 sends its attention to BOS). Other hooks stay; a record sees the knocked-out pattern."""
    _check_mask(model, mask)
    mask = jnp.asarray(mask)
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        mask = mask.astype(jnp.float32)
    return add_interventions(model, {i: KnockOut(mask[i]) for i in range(_num_layers(model))})


def _find_knockout(block: Any, layer: int) -> KnockOut:
    found = [h for h in block.hooks.interventions if isinstance(h, KnockOut)]
    if not found:
        raise ValueError(f"layer {layer} has no KnockOut hook; call knock_out(model, mask) first")
    return found[0]


def set_knockout_mask(model: Transformer, mask: Float[Array, "layers heads"]) -> Transformer:
    """The model (already through `knock_out`) with only its mask leaves replaced by `mask`.

    The tree structure is unchanged, so a jitted forward does not recompile for a new mask,
    and `jax.grad(lambda m: f(set_knockout_mask(model, m)))(mask)` differentiates in the mask.
    """
    _check_mask(model, mask)
    n = _num_layers(model)
    for i in range(n):
        _find_knockout(model.blocks[i], i)
    dtype = _find_knockout(model.blocks[0], 0).mask.dtype
    mask = jnp.asarray(mask).astype(dtype)
    return eqx.tree_at(
        lambda m: [_find_knockout(m.blocks[i], i).mask for i in range(n)],
        model,
        [mask[i] for i in range(n)],
    )


def knockout_mask(
    model: Transformer, heads: Sequence[tuple[int, int]] = ()
) -> Float[Array, "layers heads"]:
    """All-ones `[layers, heads]` mask with zeros at the `(layer, head)` pairs in `heads`."""
    mask = np.ones((_num_layers(model), _num_heads(model)), np.float32)
    for layer, head in check_head_pairs(heads, *mask.shape):
        mask[layer, head] = 0.0
    return jnp.asarray(mask)


# ------------------------------------------------------------------------------------ forwards


def forward_with_records(
    model: Transformer,
    tokens: TokenIds,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, "batch seq vocab"], dict[int, Any]]:
    """Logits and `{layer: recorded pattern}` for every layer that records its pattern
    (jitted; compiles once per model structure and input shape). Other sites' records:
    `interventions.run_with_records`."""
    logits, cache = run_with_records(model, tokens, padding_mask=padding_mask)
    return logits, {i: cache["pattern", i] for i in cache.layers("pattern")}


def attention_patterns(
    model: Transformer,
    tokens: TokenIds,
    *,
    layers: LayerSelector = None,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, "layers batch heads query key"]:
    """Attention weights after the softmax (and after any installed override or knock-out)
    of the chosen layers, stacked in float32. Rows of pad queries are meaningless."""
    idx = select_layers(model, layers)
    if not idx:
        raise ValueError("attention_patterns: no layer selected")
    tokens, padding_mask = as_inputs(model, tokens, padding_mask)
    # Logits of the last position only: the vocabulary projection is most of a small model.
    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1)
    _, cache = run_with_records(record_attention(model, layers=idx), tokens,
                                padding_mask=padding_mask, logits_at=last)
    return jnp.stack([cache["pattern", i] for i in idx]).astype(jnp.float32)
