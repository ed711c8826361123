"""Attention surgery: record, override and knock out attention patterns of a `Transformer`.

Every `Attention` calls its `hook` (a `gemma_eqx.modules.PatternHook`) on the weights right
after the softmax. The functions here return a *new* model with other hooks installed through
`eqx.tree_at`; the original model is untouched and the weight arrays are shared, not copied.

Hooks on one layer form a chain (`Compose`): overrides and knock-outs first, in the order they
were installed, and a `RecordPattern` always last, so a record shows the pattern the layer
actually used. Installing a second `RecordPattern` or `KnockOut` on a layer replaces the first.

    model = knock_out(model, mask)                   # mask [layers, heads], 1 = keep, 0 = to BOS
    model = record_attention(model, layers=[3])      # records the knocked-out pattern
    logits, records = forward_with_records(model, tokens)
    grads = jax.grad(lambda m: loss(set_knockout_mask(model, m)))(mask)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.checks import check_finite, check_index, check_padding_mask, check_tokens
from gemma_eqx.modules import Attention, PatternHook, Transformer

LayerSelector = Sequence[int] | Callable[[int, Attention], bool] | None
HeadSelector = Sequence[int] | None


# ---------------------------------------------------------------------------------------- hooks


def bos_onehot(
    key_positions: Int[Array, "batch key"], key_valid: Bool[Array, "batch key"]
) -> Bool[Array, "batch key"]:
    """Where BOS is among the keys: the valid key at position 0 (padding shifts indices, not
    positions, so this finds BOS in left-padded rows and in a generation cache)."""
    return (key_positions == 0) & key_valid


class RecordPattern(PatternHook):
    """Passes the weights through and records them (float32), restricted to `heads` and
    `queries` (query indices into the current call; None = all).

    Memory: batch * heads * queries * keys * 4 bytes per recorded layer. For Gemma 7B (16 heads)
    on a batch of 8 sequences of 2048 tokens that is 2 GiB per layer, so record only the layers,
    heads and queries an analysis needs.
    """

    heads: tuple[int, ...] | None = eqx.field(static=True, default=None)
    queries: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def __call__(
        self,
        weights: Float[Array, "batch heads query key"],
        query_positions: Int[Array, "batch query"],
        key_positions: Int[Array, "batch key"],
        key_valid: Bool[Array, "batch key"],
    ) -> tuple[Float[Array, "batch heads query key"], Float[Array, "batch _h _q key"]]:
        record = weights.astype(jnp.promote_types(weights.dtype, jnp.float32))
        if self.heads is not None:
            record = record[:, jnp.asarray(self.heads)]
        if self.queries is not None:
            record = record[:, :, jnp.asarray(self.queries)]
        return weights, record


class OverridePattern(PatternHook):
    """Replaces the weights of the heads selected by `heads` (all if None) with `pattern`
    (broadcastable to `[batch, heads, query, key]`) or with `fn(weights)`.

    The replacement is used as given: it is up to the caller to keep it causal and normalised.
    On masked keys the incoming weights are exactly zero, so `fn` can use that to stay causal.
    """

    pattern: Float[Array, "*#lead #query #key"] | None
    heads: Bool[Array, " heads"] | None
    fn: Callable[[Array], Array] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if (self.pattern is None) == (self.fn is None):
            raise ValueError("OverridePattern needs exactly one of `pattern` and `fn`")

    def __call__(
        self,
        weights: Float[Array, "batch heads query key"],
        query_positions: Int[Array, "batch query"],
        key_positions: Int[Array, "batch key"],
        key_valid: Bool[Array, "batch key"],
    ) -> tuple[Float[Array, "batch heads query key"], None]:
        new = self.fn(weights) if self.fn is not None else self.pattern
        new = jnp.broadcast_to(jnp.asarray(new, weights.dtype), weights.shape)
        if self.heads is None:
            return new, None
        return jnp.where(self.heads[None, :, None, None], new, weights), None


class KnockOut(PatternHook):
    """Soft knock-out: `bos + m * (weights - bos)` per head, with `bos` the one-hot pattern on
    BOS. m = 1 keeps the head, m = 0 sends all its attention to BOS; differentiable in m."""

    mask: Float[Array, " heads"]

    def __call__(
        self,
        weights: Float[Array, "batch heads query key"],
        query_positions: Int[Array, "batch query"],
        key_positions: Int[Array, "batch key"],
        key_valid: Bool[Array, "batch key"],
    ) -> tuple[Float[Array, "batch heads query key"], None]:
        bos = bos_onehot(key_positions, key_valid)[:, None, None, :].astype(weights.dtype)
        m = self.mask.astype(weights.dtype)[None, :, None, None]
        return bos + m * (weights - bos), None


class Compose(PatternHook):
    """Applies `hooks` in order; the record is the single non-None record, a tuple of them
    when there are several, or None."""

    hooks: tuple[PatternHook, ...]

    def __call__(
        self,
        weights: Float[Array, "batch heads query key"],
        query_positions: Int[Array, "batch query"],
        key_positions: Int[Array, "batch key"],
        key_valid: Bool[Array, "batch key"],
    ) -> tuple[Float[Array, "batch heads query key"], Any]:
        records = []
        for hook in self.hooks:
            weights, record = hook(weights, query_positions, key_positions, key_valid)
            if record is not None:
                records.append(record)
        if not records:
            return weights, None
        return weights, records[0] if len(records) == 1 else tuple(records)


# ----------------------------------------------------------------------------- installing hooks


def _num_layers(model: Transformer) -> int:
    return len(model.blocks)


def _num_heads(model: Transformer) -> int:
    return model.config.num_heads


def select_layers(model: Transformer, layers: LayerSelector) -> list[int]:
    """Layer indices from None (all), a sequence of indices (negative ones count from the
    end) or a predicate `(layer_index, attention) -> bool`."""
    n = _num_layers(model)
    if layers is None:
        return list(range(n))
    if callable(layers):
        return [i for i, block in enumerate(model.blocks) if layers(i, block.attn)]
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence | jax.Array | np.ndarray):
        raise TypeError(
            f"layers must be a sequence of layer indices or a predicate (layer, attn) -> bool; "
            f"got {type(layers).__name__}"
        )
    out = [check_index(i, n, "layer") for i in layers]
    if len(set(out)) != len(out):
        raise ValueError(f"layer indices {list(layers)} contain duplicates")
    return out


def _select_heads(model: Transformer, heads: HeadSelector) -> tuple[int, ...] | None:
    if heads is None:
        return None
    n = _num_heads(model)
    if isinstance(heads, (int, str)):
        raise TypeError(f"heads must be a sequence of head indices; got {heads!r}")
    return tuple(check_index(h, n, "head") for h in heads)


def _chain(hook: PatternHook) -> list[PatternHook]:
    if isinstance(hook, Compose):
        return list(hook.hooks)
    if type(hook) is PatternHook:  # the default pass-through hook
        return []
    return [hook]


def _from_chain(chain: list[PatternHook]) -> PatternHook:
    if not chain:
        return PatternHook()
    return chain[0] if len(chain) == 1 else Compose(tuple(chain))


def _add_hook(existing: PatternHook, new: PatternHook) -> PatternHook:
    """`existing` with `new` added: a record goes last, anything else before the records; a
    `RecordPattern` or `KnockOut` replaces one already there."""
    chain = [h for h in _chain(existing) if not isinstance(new, (RecordPattern, KnockOut))
             or type(h) is not type(new)]
    if isinstance(new, RecordPattern):
        chain.append(new)
    else:
        records = [i for i, h in enumerate(chain) if isinstance(h, RecordPattern)]
        chain.insert(records[0] if records else len(chain), new)
    return _from_chain(chain)


def set_hooks(model: Transformer, hooks: Mapping[int, PatternHook]) -> Transformer:
    """A model whose layer `i` uses `hooks[i]` (replacing whatever was there)."""
    idx = select_layers(model, list(hooks))
    if not idx:
        return model
    return eqx.tree_at(
        lambda m: [m.blocks[i].attn.hook for i in idx], model, [hooks[i] for i in hooks]
    )


def add_hooks(model: Transformer, hooks: Mapping[int, PatternHook]) -> Transformer:
    """A model with `hooks[i]` added to layer `i`'s chain (see the module docstring)."""
    return set_hooks(
        model, {i: _add_hook(model.blocks[i].attn.hook, h) for i, h in hooks.items()}
    )


def clear_hooks(model: Transformer) -> Transformer:
    """The model with the default pass-through hook on every layer."""
    return set_hooks(model, {i: PatternHook() for i in range(_num_layers(model))})


def record_attention(
    model: Transformer,
    *,
    layers: LayerSelector = None,
    heads: HeadSelector = None,
    queries: Sequence[int] | None = None,
) -> Transformer:
    """A model whose chosen layers record their (final) attention pattern, restricted to
    `heads` and `queries` (query indices; see `RecordPattern` for the memory it takes)."""
    head_idx = _select_heads(model, heads)
    query_idx = None if queries is None else tuple(int(q) for q in queries)
    hook = RecordPattern(heads=head_idx, queries=query_idx)
    return add_hooks(model, {i: hook for i in select_layers(model, layers)})


def override_attention(
    model: Transformer,
    layers: LayerSelector,
    *,
    pattern: Float[Array, "*#lead #query #key"] | None = None,
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
    hook = OverridePattern(pattern=pattern, heads=head_mask, fn=fn)
    return add_hooks(model, {i: hook for i in select_layers(model, layers)})


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
    return add_hooks(model, {i: KnockOut(mask[i]) for i in range(_num_layers(model))})


def _find_knockout(hook: PatternHook, layer: int) -> KnockOut:
    found = [h for h in _chain(hook) if isinstance(h, KnockOut)]
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
        _find_knockout(model.blocks[i].attn.hook, i)
    old = model.blocks[0].attn.hook
    dtype = _find_knockout(old, 0).mask.dtype
    mask = jnp.asarray(mask).astype(dtype)
    return eqx.tree_at(
        lambda m: [_find_knockout(m.blocks[i].attn.hook, i).mask for i in range(n)],
        model,
        [mask[i] for i in range(n)],
    )


def knockout_mask(
    model: Transformer, heads: Sequence[tuple[int, int]] = ()
) -> Float[Array, "layers heads"]:
    """All-ones `[layers, heads]` mask with zeros at the `(layer, head)` pairs in `heads`."""
    mask = np.ones((_num_layers(model), _num_heads(model)), np.float32)
    for layer, head in heads:
        layer, head = check_index(layer, mask.shape[0], "layer"), check_index(head, mask.shape[1],
                                                                             "head")
        mask[layer, head] = 0.0
    return jnp.asarray(mask)


# ------------------------------------------------------------------------------------ forwards


@eqx.filter_jit
def _forward(
    model: Transformer, tokens: Int[Array, "batch seq"], padding_mask: Bool[Array, "batch seq"]
) -> tuple[Float[Array, "batch seq vocab"], tuple[Any, ...]]:
    out = model.forward(tokens, padding_mask=padding_mask, check_ids=False)  # checked before
    return out.logits, out.records


def _as_inputs(
    model: Transformer, tokens: Any, padding_mask: Any
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    check_tokens(tokens, model.config.vocab_size)  # eagerly, with the position of a bad id
    tokens = jnp.asarray(tokens)
    if padding_mask is None:
        return tokens, jnp.ones(tokens.shape, bool)
    return tokens, check_padding_mask(padding_mask, tokens.shape)


def forward_with_records(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> tuple[Float[Array, "batch seq vocab"], dict[int, Any]]:
    """Logits and `{layer: record}` for every layer whose hooks recorded something (jitted;
    compiles once per model structure and input shape)."""
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    logits, records = _forward(model, tokens, padding_mask)
    return logits, {i: r for i, r in enumerate(records) if r is not None}


def attention_patterns(
    model: Transformer,
    tokens: Int[Array, "batch seq"],
    *,
    layers: LayerSelector = None,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, "layers batch heads query key"]:
    """Attention weights after the softmax (and after any installed override or knock-out)
    of the chosen layers, stacked in float32. Rows of pad queries are meaningless."""
    idx = select_layers(model, layers)
    if not idx:
        raise ValueError("attention_patterns: no layer selected")
    _, records = forward_with_records(record_attention(model, layers=idx), tokens,
                                      padding_mask=padding_mask)
    return jnp.stack([records[i] for i in idx]).astype(jnp.float32)
