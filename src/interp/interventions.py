"""Interventions on any activation site, installed with `eqx.tree_at`, and capturing activations.

An intervention is a small module bound to one site of `gemma_eqx.sites` (`resid_pre`, `q`,
`v_per_head`, `pattern`, `head_out`, ...). `intervene` returns a *new* model with it installed
on the chosen layers; the original model is untouched and the weights are shared, not copied.
Arrays of an intervention (a patch, per-unit weights, a scale factor, a world index) are leaves
of the model: new values do not recompile a jitted forward, and `jax.grad` reaches them.

    logits, cache = capture(model, clean)                            # every site, every layer
    patched = patch(model, cache, "head_out", layers=[5], heads=[2])  # clean head 5.2 ...
    logits = run(patched, corrupted)                                  # ... into the corrupted run

Which units an intervention touches: static `heads` / `positions` (index tuples; a new choice
recompiles) times an optional array `weight` of the site's units (`[batch, seq]` or
`[batch, seq, heads]`, exactly; for sweeps and gradients: new values do not recompile).
Per site and layer, interventions act in the order they were installed and a `Record` acts
last, so a record shows what the layer used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from gemma_eqx.checks import (
    check_finite,
    check_index,
    check_indices,
    check_padding_mask,
    check_rows,
    check_tokens,
)
from gemma_eqx.config import GemmaConfig
from gemma_eqx.display import Module, render_records
from gemma_eqx.modules import Transformer
from gemma_eqx.sites import (
    LAYER_SITES,
    MODEL_SITES,
    SITES,
    Intervention,
    SiteContext,
    SiteHooks,
    SiteSpec,
    check_site_array,
    site_key,
    site_spec,
    unit_weights,
)

Layers = Sequence[int] | Callable[[int, Any], bool] | None
Units = Float[Array, "batch seq"] | Float[Array, "batch seq heads"]
TokenIds = Int[Array, "batch seq"] | Int[np.ndarray, "batch seq"]


# ------------------------------------------------------------------------------ selection


def _index_tuple(values: Any, what: str) -> tuple[int, ...] | None:
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


def _as_array(x: Any) -> Array:
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
        spec = SITES[self.site]
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
        spec = SITES[self.site]
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
        spec = SITES[self.site]
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

    factor: Float[Array, ""] | Units = eqx.field(default=0.0, converter=_as_array)

    def __call__(self, x: Array, context: SiteContext) -> tuple[Array, None]:
        spec = SITES[self.site]
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


# ----------------------------------------------------------------------------- installing


def select_layers(model: Transformer, layers: Layers) -> list[int]:
    """Layer indices from None (all), a sequence of indices (negative ones count from the
    end) or a predicate `(layer_index, attention) -> bool`."""
    n = len(model.blocks)
    if layers is None:
        return list(range(n))
    if callable(layers):
        return [i for i, block in enumerate(model.blocks) if layers(i, block.attn)]
    if isinstance(layers, (int, str)) or not isinstance(layers, Sequence | jax.Array | np.ndarray):
        raise TypeError(
            f"layers must be a sequence of layer indices or a predicate (layer, attn) -> bool; "
            f"got {type(layers).__name__}"
        )
    return list(check_indices(layers, n, "layer"))


def _check_intervention(model: Transformer, intervention: Intervention) -> SiteSpec:
    if not isinstance(intervention, Intervention):
        raise TypeError(f"expected an Intervention; got {type(intervention).__name__}")
    spec = site_spec(intervention.site)
    heads = getattr(intervention, "heads", None)
    if isinstance(heads, tuple) and spec.head_axis is not None:
        size = (model.config.num_kv_heads if spec.axes[spec.head_axis] == "kv_heads"
                else model.config.num_heads)
        for h in heads:
            check_index(h, size, "head")
    for name in ("value", "weight", "factor", "mask", "pattern"):
        leaf = getattr(intervention, name, None)
        if leaf is not None and hasattr(leaf, "dtype") or isinstance(leaf, float):
            check_finite(leaf, f"{intervention.describe()}: {name}")
    return spec


def _ordered(existing: tuple[Intervention, ...], new: Intervention) -> tuple[Intervention, ...]:
    """`existing` with `new` added: a `Record` or `KnockOut` replaces one of its kind at the
    same site; records stay last."""
    replaces = isinstance(new, (Record, KnockOut))
    kept = [i for i in existing
            if not (replaces and type(i) is type(new) and i.site == new.site)]
    if isinstance(new, Record):
        return (*kept, new)
    first_record = next((k for k, i in enumerate(kept) if i.records and i.site == new.site),
                        len(kept))
    return (*kept[:first_record], new, *kept[first_record:])


def _hooks_at(model: Transformer, layer: int | None) -> SiteHooks:
    return model.hooks if layer is None else model.blocks[layer].hooks


def set_interventions(
    model: Transformer, hooks: Mapping[int | None, tuple[Intervention, ...]]
) -> Transformer:
    """A model whose layer `i` (None: the model's own sites) holds exactly `hooks[i]`."""
    keys = list(hooks)
    for k in keys:
        if k is not None:
            check_index(k, len(model.blocks), "layer")
    if not keys:
        return model
    return eqx.tree_at(
        lambda m: [_hooks_at(m, k) for k in keys], model,
        [SiteHooks(tuple(hooks[k])) for k in keys],
    )


def add_interventions(
    model: Transformer, interventions: Mapping[int | None, Intervention | Iterable[Intervention]]
) -> Transformer:
    """A model with `interventions[i]` added on layer `i` (None: the model's own sites)."""
    new = {}
    for layer, items in interventions.items():
        items = [items] if isinstance(items, Intervention) else list(items)
        current = _hooks_at(model, layer).interventions
        for item in items:
            spec = _check_intervention(model, item)
            if spec.per_layer != (layer is not None):
                raise ValueError(
                    f"site {spec.name} is "
                    + ("on every layer: give a layer" if spec.per_layer
                       else "a site of the whole model: install it with layer None")
                )
            current = _ordered(current, item)
        new[layer] = current
    return set_interventions(model, new)


def intervene(
    model: Transformer, intervention: Intervention, *, layers: Layers = None
) -> Transformer:
    """A model with `intervention` installed on each of `layers` (all by default; ignored for
    the model's own sites `embed`, `final_norm_in`, `final_norm_out`, `logits`)."""
    spec = _check_intervention(model, intervention)
    if not spec.per_layer:
        return add_interventions(model, {None: intervention})
    return add_interventions(model, {i: intervention for i in select_layers(model, layers)})


def clear_interventions(model: Transformer, sites: Sequence[str] | None = None) -> Transformer:
    """The model without interventions (only those at `sites`, when given)."""
    names = None if sites is None else {site_spec(s).name for s in sites}
    keep = lambda hooks: tuple(  # noqa: E731
        i for i in hooks.interventions if names is not None and i.site not in names
    )
    return set_interventions(
        model, {None: keep(model.hooks), **{i: keep(b.hooks) for i, b in enumerate(model.blocks)}}
    )


def installed(model: Transformer) -> list[tuple[int | None, Intervention]]:
    """Every installed intervention with its layer (None for the model's own sites)."""
    out = [(None, i) for i in model.hooks.interventions]
    for layer, block in enumerate(model.blocks):
        out.extend((layer, i) for i in block.hooks.interventions)
    return out


# ------------------------------------------------------------------------------- running


def as_inputs(
    model: Transformer, tokens: Any, padding_mask: Any
) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
    """Tokens and a padding mask checked eagerly (ids, shapes), ready for a jitted forward."""
    check_tokens(tokens, model.config.vocab_size)
    tokens = jnp.asarray(tokens)
    if padding_mask is None:
        return tokens, jnp.ones(tokens.shape, bool)
    return tokens, check_padding_mask(padding_mask, tokens.shape)


@eqx.filter_jit
def _run(model, tokens, padding_mask, logits_at):
    out = model.forward(tokens, padding_mask=padding_mask, logits_at=logits_at, check_ids=False)
    records, logits = dict(out.records), out.logits
    recorded = records.get("logits")
    if recorded is not None and recorded.shape == logits.shape and recorded.dtype == logits.dtype:
        # One buffer for both (the logits are often half of a capture's memory).
        del records["logits"]
        return recorded, records, True
    return logits, records, False


def run_with_records(
    model: Transformer,
    tokens: TokenIds,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    logits_at: Int[Array, "batch k"] | None = None,
) -> tuple[Float[Array, "batch _positions vocab"], ActivationCache]:
    """Logits and what the installed `Record`s recorded (jitted: compiles once per model
    structure and input shape; new intervention values do not recompile)."""
    tokens, padding_mask = as_inputs(model, tokens, padding_mask)
    logits, records, shared = _run(model, tokens, padding_mask, logits_at)
    if shared:
        records["logits"] = logits
    return logits, ActivationCache(records, model.config, tuple(tokens.shape))


def run(
    model: Transformer,
    tokens: TokenIds,
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    logits_at: Int[Array, "batch k"] | None = None,
) -> Float[Array, "batch _positions vocab"]:
    """Logits of the model with its interventions (jitted, like `run_with_records`)."""
    return run_with_records(model, tokens, padding_mask=padding_mask, logits_at=logits_at)[0]


class ActivationCache(Module):
    """Recorded activations keyed by site and layer: `cache["v", 3]`, `cache["logits"]`,
    `cache.stack("pattern")` (`[layers, ...]`). Remembers the model config and input shape it
    came from, so a patch from another model is refused."""

    arrays: dict[str, Array]
    config: GemmaConfig = eqx.field(static=True)
    input_shape: tuple[int, ...] = eqx.field(static=True)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        return render_records(self, self.arrays, path, subtree_renderer,
                              config=self.config, input_shape=self.input_shape)

    def _key(self, key: Any) -> str:
        if isinstance(key, tuple):
            site, layer = key
            site_spec(site)
            return site_key(site, None if layer is None else check_index(
                layer, self.config.num_layers, "layer"))
        site_spec(key)
        return key

    def __getitem__(self, key: str | tuple[str, int]) -> Array:
        name = self._key(key)
        if name not in self.arrays:
            site = key[0] if isinstance(key, tuple) else key
            if SITES[site].per_layer and not isinstance(key, tuple):
                raise KeyError(f"site {site} is recorded per layer: use cache[{site!r}, layer]")
            raise KeyError(f"{name} was not recorded; recorded: {', '.join(sorted(self.arrays))}")
        return self.arrays[name]

    def __contains__(self, key: Any) -> bool:
        try:
            return self._key(key) in self.arrays
        except (ValueError, TypeError):
            return False

    def keys(self) -> list[str]:
        return sorted(self.arrays)

    def layers(self, site: str) -> list[int]:
        """The layers at which `site` was recorded."""
        site_spec(site)
        return [i for i in range(self.config.num_layers) if site_key(site, i) in self.arrays]

    def stack(self, site: str, layers: Layers = None) -> Array:
        """`site` of the chosen (default: all recorded) layers stacked: `[layers, ...]`."""
        idx = self.layers(site) if layers is None else [
            check_index(i, self.config.num_layers, "layer") for i in layers]
        if not idx:
            raise KeyError(f"site {site} was not recorded at any layer")
        return jnp.stack([self[site, i] for i in idx])

    def filter(self, sites: Sequence[str] | None = None, layers: Layers = None) -> ActivationCache:
        """A cache with only the given sites and layers."""
        names = None if sites is None else {site_spec(s).name for s in sites}
        keep_layers = None if layers is None else {
            check_index(i, self.config.num_layers, "layer") for i in layers}
        out = {}
        for key, value in self.arrays.items():
            parts = key.split(".")
            site, layer = (parts[2], int(parts[1])) if len(parts) == 3 else (key, None)
            if names is not None and site not in names:
                continue
            if keep_layers is not None and layer is not None and layer not in keep_layers:
                continue
            out[key] = value
        return ActivationCache(out, self.config, self.input_shape)

    def check_model(self, model: Transformer) -> None:
        """A clear error when this cache was recorded from a model of another config."""
        if model.config != self.config:
            diff = [f"{f}: {getattr(self.config, f)!r} vs {getattr(model.config, f)!r}"
                    for f in model.config.__dataclass_fields__
                    if getattr(self.config, f) != getattr(model.config, f)]
            raise ValueError("the activation cache was recorded from a different model ("
                             + "; ".join(diff[:4]) + ")")


def capture(
    model: Transformer,
    tokens: TokenIds,
    *,
    sites: Sequence[str] | None = None,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    logits_at: Int[Array, "batch k"] | None = None,
) -> tuple[Float[Array, "batch _positions vocab"], ActivationCache]:
    """Logits and an `ActivationCache` of `sites` (default: every site) on `layers` (default:
    all), like TransformerLens' `run_with_cache`. `heads` (query heads) and `positions` filter
    what is kept (heads only on query-head sites: `k` and `v` are kept whole); a filtered cache
    cannot be a patch source."""
    names = list(SITES) if sites is None else [site_spec(s).name for s in sites]
    head_idx = _index_tuple(heads, "head")
    pos_idx = _index_tuple(positions, "position")
    per_layer = {}
    layer_idx = select_layers(model, layers)
    for name in names:
        spec = SITES[name]
        # `heads` are query heads: the key/value-head sites `k` and `v` are kept whole.
        h = head_idx if spec.head_axis is not None and spec.axes[spec.head_axis] == "heads" \
            else None
        rec = Record(name, heads=h, positions=pos_idx)
        if spec.per_layer:
            for i in layer_idx:
                per_layer.setdefault(i, []).append(rec)
        else:
            per_layer.setdefault(None, []).append(rec)
    if head_idx is not None:
        for h in head_idx:
            check_index(h, model.config.num_heads, "head")
    recorded = add_interventions(model, per_layer)
    return run_with_records(recorded, tokens, padding_mask=padding_mask, logits_at=logits_at)


# ------------------------------------------------------------------------------- patching


def _source_array(cache: ActivationCache, model: Transformer, site: str, layer: int | None):
    cache.check_model(model)
    key = site_key(site, layer)
    if key not in cache.arrays:
        raise KeyError(f"{key} is not in the activation cache; capture it first")
    return cache.arrays[key]


def patch(
    model: Transformer,
    source: ActivationCache,
    site: str,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    weight: Units | None = None,
) -> Transformer:
    """A model that, at `site` of `layers`, takes the recorded values of `source` (another
    input's `capture`) on the selected heads / positions / per-unit `weight`. The input the
    patched model then runs must have the shape the source was recorded with.

    `heads` and `positions` are static (a new choice compiles a new program); to loop over
    heads or positions, vary the per-unit `weight` array instead, or use
    `patching.activation_patching`, which does so in batches."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    items = {}
    for layer in idx:
        value = _source_array(source, model, spec.name, layer)
        items[layer] = Replace(spec.name, value=value, weight=weight,
                               heads=_index_tuple(heads, "head"),
                               positions=_index_tuple(positions, "position"))
    return add_interventions(model, items)


def ablate(
    model: Transformer,
    site: str,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    how: str = "zero",
    reference: ActivationCache | None = None,
    key: PRNGKeyArray | None = None,
) -> Transformer:
    """A model with `site` ablated on the selected units: `how="zero"`, `"mean"` (the mean of
    `reference` over its batch, per position) or `"resample"` (row `i` takes row `perm[i]` of
    `reference`, a random permutation from `key`; the reference batch must equal the batch the
    model will run)."""
    spec = site_spec(site)
    h, p = _index_tuple(heads, "head"), _index_tuple(positions, "position")
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    if how == "zero":
        return add_interventions(model, {i: Scale(spec.name, factor=jnp.zeros(()), heads=h,
                                                  positions=p) for i in idx})
    if how not in ("mean", "resample"):
        raise ValueError(f"how must be 'zero', 'mean' or 'resample'; got {how!r}")
    if reference is None:
        raise ValueError(f"{how}-ablation needs a reference ActivationCache (from capture)")
    items = {}
    if how == "resample":
        if key is None:
            raise ValueError("resample-ablation needs a PRNG key")
        perm = jax.random.permutation(key, reference.input_shape[0])
    for i in idx:
        value = _source_array(reference, model, spec.name, i)
        if how == "mean":
            items[i] = Replace(spec.name, value=value.mean(axis=0, keepdims=True),
                               broadcast_batch=True, heads=h, positions=p)
        else:
            items[i] = Replace(spec.name, value=value[perm], heads=h, positions=p)
    return add_interventions(model, items)


def scale(
    model: Transformer,
    site: str,
    factor: float | Float[Array, ""] | Units,
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> Transformer:
    """A model with `site` multiplied by `factor` on the selected units (differentiable)."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    item = Scale(spec.name, factor=_as_array(factor), heads=_index_tuple(heads, "head"),
                 positions=_index_tuple(positions, "position"))
    return add_interventions(model, {i: item for i in idx})


def apply_fn(
    model: Transformer,
    site: str,
    fn: Callable[..., Array],
    *,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    with_context: bool = False,
) -> Transformer:
    """A model with `fn(x)` (or `fn(x, context)`) applied at `site` on the selected units."""
    spec = site_spec(site)
    idx = [None] if not spec.per_layer else select_layers(model, layers)
    item = Apply(spec.name, fn=fn, with_context=with_context,
                 heads=_index_tuple(heads, "head"),
                 positions=_index_tuple(positions, "position"))
    return add_interventions(model, {i: item for i in idx})


__all__ = [
    "LAYER_SITES", "MODEL_SITES", "SITES", "ActivationCache", "Apply", "KnockOut", "Linearized",
    "OverridePattern", "Record", "Replace", "Rewire", "Scale", "ablate", "add_interventions",
    "apply_fn", "as_inputs", "bos_onehot", "capture", "clear_interventions", "installed",
    "intervene", "patch", "run", "run_with_records", "scale", "select_layers",
    "set_interventions",
]
