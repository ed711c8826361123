"""Interventions: small modules, each bound to one activation site of `gemma_eqx.model.sites`
(`resid_pre`, `q`, `v_per_head`, `pattern`, `head_out`, ...), that read or change the array
there. `interp.install` puts them on a model with `eqx.tree_at` (a new model: the original
is untouched, the weights shared); their arrays (a patch, per-unit weights, a scale factor, a
world table) are leaves of the model, so new values do not recompile a jitted forward and
`jax.grad` reaches them.

Which units an intervention touches: static `heads` / `positions` (index tuples; a new choice
recompiles) times an optional array `weight` of the site's units (`[batch, seq]` or
`[batch, seq, heads]`, exactly; for sweeps and gradients: new values do not recompile).
Per site and layer, interventions act in the order they were installed and a `Record` acts
last, so a record shows what the layer used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.core.checks import (
    check_indices,
    check_rows,
)
from gemma_eqx.model.base import Module
from gemma_eqx.model.sites import (
    LAYER_SITES,
    MODEL_SITES,
    SITES,
    Intervention,
    SiteContext,
    SiteSpec,
    check_site_array,
    site_spec,
    unit_weights,
)

Layers = Sequence[int] | Callable[[int, Any], bool] | None
Units = Float[Array, "batch seq"] | Float[Array, "batch seq heads"]
TokenIds = Int[Array, "batch seq"] | Int[np.ndarray, "batch seq"]


# ------------------------------------------------------------------------------ selection


def static_indices(values: Any, what: str) -> tuple[int, ...] | None:
    """Static head or position indices (None = all), by the one rule of `check_indices`; their
    range is checked where the site's size is known."""
    return None if values is None else check_indices(values, None, what)


def _check_positions(
    positions: tuple[int, ...], size: int, spec: SiteSpec, layer: int | None
) -> None:
    for p in positions:
        if not -size <= p < size:
            where = "" if layer is None else f" of layer {layer}"
            raise ValueError(f"position {p} is out of range for site {spec.name}{where} "
                             f"with {size} positions")


def _selection(
    x: Array, spec: SiteSpec, heads: tuple[int, ...] | None, positions: tuple[int, ...] | None,
    layer: int | None,
) -> Array | None:
    """A 0/1 array broadcastable to `x` selecting `heads` and `positions` (None = all)."""
    if heads is None and positions is None:
        return None
    mask = jnp.ones((1,) * x.ndim, x.dtype)
    if positions is not None:
        size = x.shape[spec.seq_axis]
        _check_positions(positions, size, spec, layer)
        shape = [1] * x.ndim
        shape[spec.seq_axis] = size
        mask = mask * jnp.zeros((size,), x.dtype).at[jnp.asarray(positions)].set(1).reshape(shape)
    if heads is not None:
        if spec.head_axis is None:
            head_sites = ", ".join(n for n, s in SITES.items() if s.head_axis is not None)
            raise ValueError(f"site {spec.name} has no heads axis; select heads on a head site "
                             f"({head_sites})")
        size = x.shape[spec.head_axis]
        for h in heads:
            if not -size <= h < size:
                raise ValueError(f"head {h} is out of range for site {spec.name} with {size} "
                                 f"{spec.axes[spec.head_axis]}")
        shape = [1] * x.ndim
        shape[spec.head_axis] = size
        mask = mask * jnp.zeros((size,), x.dtype).at[jnp.asarray(heads)].set(1).reshape(shape)
    return mask


def as_leaf(x: Any) -> Array:
    """Python numbers as float32 arrays (a leaf, not a weakly typed constant: a new value must
    not recompile, and `0.0` must trace like `jnp.zeros(())`)."""
    if isinstance(x, (int, float)):
        return jnp.asarray(x, jnp.float32)
    return jnp.asarray(x)


class _Selective(Intervention):
    """An intervention acting on the units picked by static `heads` / `positions` and the
    optional per-unit array `weight` (their product; all units when all three are None)."""

    weight: Units | None = None
    heads: tuple[int, ...] | None = eqx.field(static=True, default=None)
    positions: tuple[int, ...] | None = eqx.field(static=True, default=None)

    def amount(self, x: Array, context: SiteContext) -> Array | None:
        spec = site_spec(self.site)
        amount = _selection(x, spec, self.heads, self.positions, context.layer)
        if self.weight is not None:
            w = unit_weights(self.weight, x, spec)
            amount = w if amount is None else amount * w
        return amount


class Record(Intervention):
    """Passes the array through and records it (at least float32), restricted to static
    `heads` and `positions` (None = all).

    Memory per recorded layer: the site's size times 4 bytes, e.g. `pattern` is
    batch * heads * query * key * 4 bytes (Gemma 7B, batch 8, 2048 tokens: 2 GiB), `head_out`
    batch * seq * heads * embed * 4 bytes; record only what an analysis needs."""

    heads: tuple[int, ...] | None = eqx.field(static=True, default=None)
    positions: tuple[int, ...] | None = eqx.field(static=True, default=None)

    records = True

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, Array]:
        spec = site_spec(self.site)
        record = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.positions is not None:
            # jnp.take would fill an out-of-range position with NaN, silently.
            _check_positions(self.positions, x.shape[spec.seq_axis], spec, context.layer)
            record = jnp.take(record, jnp.asarray(self.positions), axis=spec.seq_axis)
        if self.heads is not None:
            if spec.head_axis is None:
                raise ValueError(f"site {self.site} has no heads axis to filter")
            record = jnp.take(record, jnp.asarray(self.heads), axis=spec.head_axis)
        return x, record


class Replace(_Selective):
    """`x + amount * (value - x)` on the selected units: set (amount 1), patch (a recorded
    array of another input) or interpolate (fractional weights, differentiable).

    `value` has exactly the site's shape, or batch 1 with `broadcast_batch=True` (a mean over a
    reference batch), or is None for zeros (zero-ablation)."""

    value: Array | None = None
    broadcast_batch: bool = eqx.field(static=True, default=False)

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        spec = site_spec(self.site)
        if self.value is None:
            value = jnp.zeros_like(x)
        else:
            value = self.value
            if self.broadcast_batch:
                check_site_array(value, jnp.zeros((1, *x.shape[1:])), spec, context.layer,
                                 "a batch-1 value")
                value = jnp.broadcast_to(value, x.shape)
            check_site_array(value, x, spec, context.layer, "a patch")
            value = value.astype(x.dtype)
        amount = self.amount(x, context)
        if amount is None:
            return value, None
        # (1 - a) x + a v rather than x + a (v - x): masked attention logits (-2e38) would
        # overflow in the difference.
        return (1 - amount) * x + amount * value, None


class Scale(_Selective):
    """`x * factor` on the selected units; `factor` is a scalar or per-unit array (soft and
    differentiable, like the knock-out mask; 0 zero-ablates)."""

    factor: Float[Array, ""] | Units = eqx.field(default=0.0, converter=as_leaf)

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        spec = site_spec(self.site)
        factor = jnp.asarray(self.factor, x.dtype)
        if factor.ndim:
            factor = unit_weights(factor, x, spec)
        amount = self.amount(x, context)
        if amount is None:
            return x * factor, None
        return x * (1 + amount * (factor - 1)), None


class Apply(_Selective):
    """`fn(x)` (or `fn(x, context)` when `with_context`) on the selected units."""

    fn: Callable[..., Array] = eqx.field(static=True, default=None)
    with_context: bool = eqx.field(static=True, default=False)

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        new = self.fn(x, context) if self.with_context else self.fn(x)
        where = f"the function applied at site {self.site}" + (
            "" if context.layer is None else f" of layer {context.layer}")
        if not isinstance(new, jax.Array | np.ndarray):
            raise TypeError(f"{where} returned {type(new).__name__}, not an array of the "
                            f"site's shape {tuple(x.shape)}")
        if tuple(new.shape) != tuple(x.shape):
            raise ValueError(f"{where} returned shape {tuple(new.shape)}; the site has shape "
                             f"{tuple(x.shape)}")
        if not jnp.issubdtype(new.dtype, jnp.floating):
            raise TypeError(f"{where} returned {new.dtype} values; the site holds "
                            f"{x.dtype} activations (return a floating array)")
        amount = self.amount(x, context)
        new = new.astype(x.dtype)
        return (new if amount is None else (1 - amount) * x + amount * new), None


class Add(_Selective):
    """`x + amount * value` on the selected units: steering (a direction, `[features]` or the
    site's trailing shape, broadcast over batch and positions) or a handle for gradients
    (zeros of the site's full shape: `jax.grad` with respect to `value` is the gradient with
    respect to the site)."""

    value: Array = None

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        spec = site_spec(self.site)
        value = self.value
        if value.ndim < x.ndim:
            if tuple(value.shape) != tuple(x.shape[x.ndim - value.ndim:]):
                raise ValueError(f"a value added at site {spec.name} must have the site's "
                                 f"trailing shape {tuple(x.shape[x.ndim - value.ndim:])} or "
                                 f"its whole shape {tuple(x.shape)}; got {tuple(value.shape)}")
            value = jnp.broadcast_to(value, x.shape)
        check_site_array(value, x, spec, context.layer, "a value added")
        amount = self.amount(x, context)
        value = value.astype(x.dtype)
        return x + (value if amount is None else amount * value), None


class Rewire(_Selective):
    """Worlds: row `i` of the batch reads the site from row `source[i]` on the selected units
    (`source[i] = i` leaves a row alone)."""

    source: Int[Array, " batch"] = None

    def __check_init__(self):
        check_rows(self.source, f"rewiring source at site {self.site}")

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        if tuple(self.source.shape) != (x.shape[0],):
            raise ValueError(f"rewiring at site {self.site}: source must have shape [batch] = "
                             f"({x.shape[0]},); got {tuple(self.source.shape)}")
        value = jnp.take(x, self.source, axis=0)
        amount = self.amount(x, context)
        return (value if amount is None else (1 - amount) * x + amount * value), None


class KnockOut(Intervention):
    """Soft knock-out on the pattern: `bos + m * (weights - bos)` per head, with `bos` the
    one-hot pattern on BOS. m = 1 keeps the head, m = 0 sends all its attention to BOS;
    differentiable in m. `mask` is `[heads]` (every row) or `[batch, heads]` (one per world)."""

    mask: Float[Array, "*batch heads"] = None

    def __init__(self, mask: Float[Array, "*batch heads"], site: str = "pattern"):
        if site != "pattern":
            raise ValueError("KnockOut acts on the pattern site only")
        self.site = site
        self.mask = mask

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        bos = bos_onehot(context.key_positions, context.key_valid)[:, None, None, :]
        bos = bos.astype(x.dtype)
        if self.mask.ndim == 2 and self.mask.shape[0] != x.shape[0]:
            raise ValueError(f"per-world knock-out mask of layer {context.layer} has "
                             f"{self.mask.shape[0]} rows; the batch has {x.shape[0]}")
        m = self.mask.astype(x.dtype)
        m = m[None, :, None, None] if m.ndim == 1 else m[:, :, None, None]
        return bos + m * (x - bos), None


class OverridePattern(Intervention):
    """Replaces the weights of the heads selected by `heads` (a bool `[heads]` array; all if
    None) with `pattern` (`[query, key]`, `[heads, query, key]` or the full shape, placed
    explicitly) or with `fn(weights)`. Used as given: keep it causal and normalised."""

    pattern: Float[Array, "*lead query key"] | None = None
    heads: Bool[Array, " heads"] | None = None
    fn: Callable[[Array], Array] | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if (self.pattern is None) == (self.fn is None):
            raise ValueError("OverridePattern needs exactly one of `pattern` and `fn`")

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        if self.fn is not None:
            new = self.fn(x)
        else:
            new = jnp.asarray(self.pattern, x.dtype)
            if new.shape != x.shape[-new.ndim:] or new.ndim < 2:
                raise ValueError(f"override pattern of layer {context.layer} must have shape "
                                 f"[query, key] = {x.shape[2:]}, [heads, query, key] or "
                                 f"{tuple(x.shape)}; got {tuple(new.shape)}")
            new = jnp.broadcast_to(new, x.shape)
        if self.heads is None:
            return new, None
        return jnp.where(self.heads[None, :, None, None], new, x), None


def bos_onehot(
    key_positions: Int[Array, "batch key"], key_valid: Bool[Array, "batch key"]
) -> Bool[Array, "batch key"]:
    """Where BOS is among the keys: the valid key at position 0 (padding shifts indices, not
    positions, so this finds BOS in left-padded rows and in a generation cache)."""
    return (key_positions == 0) & key_valid


class Linearized(Module):
    """A sublayer (an `MLP`, an `RMSNorm`: anything mapping `[batch, seq, embed]` to the same)
    replaced by its first-order response: row `i` gets
    `f(x[around[i]]) + J_f(x[around[i]]) (x[at[i]] - x[around[i]])` (a JVP), so a world sees
    only the linear part of the sublayer's response around another world's input. With
    `around[i] = at[i]` row `i` gets `f` exactly."""

    target: Any
    around: Int[Array, " batch"]
    at: Int[Array, " batch"]

    def __check_init__(self):
        check_rows(self.around, "Linearized.around")
        check_rows(self.at, "Linearized.at")
        if self.around.shape != self.at.shape:
            raise ValueError(f"Linearized.around and .at must have one shape [batch]; got "
                             f"{tuple(self.around.shape)} and {tuple(self.at.shape)}")

    def __call__(self, x: Float[Array, "batch seq embed"]) -> Float[Array, "batch seq embed"]:
        for name, index in (("around", self.around), ("at", self.at)):
            if tuple(index.shape) != (x.shape[0],):
                raise ValueError(f"Linearized.{name} must have shape [batch] = ({x.shape[0]},);"
                                 f" got {tuple(index.shape)}")
        a, b = jnp.take(x, self.around, axis=0), jnp.take(x, self.at, axis=0)
        primal, tangent = jax.jvp(self.target, (a,), (b - a,))
        return primal + tangent


__all__ = [
    "LAYER_SITES", "MODEL_SITES", "SITES", "Add", "Apply", "KnockOut", "Layers", "Linearized",
    "OverridePattern", "Record", "Replace", "Rewire", "Scale", "TokenIds", "Units",
    "bos_onehot",
]
