"""Running a model with its interventions, and capturing activations: `run` and
`run_with_records` (jitted; new intervention values do not recompile), the `ActivationCache`
of recorded arrays keyed by site and layer, and `capture` (TransformerLens' `run_with_cache`).

    logits, cache = capture(model, clean)                            # every site, every layer
    patched = patch(model, cache, "head_out", layers=[5], heads=[2])  # clean head 5.2 ...
    logits = run(patched, corrupted)                                  # ... into the corrupted run
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.core.checks import (
    check_index,
    check_padding_mask,
    check_tokens,
)
from gemma_eqx.core.config import GemmaConfig
from gemma_eqx.model.base import Module
from gemma_eqx.model.display import render_records
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import (
    SITES,
    site_key,
    site_spec,
)

from .install import add_interventions, select_layers
from .interventions import Layers, Record, TokenIds, static_indices


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
            if site_spec(site).per_layer and not isinstance(key, tuple):
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
    head_idx = static_indices(heads, "head")
    pos_idx = static_indices(positions, "position")
    per_layer = {}
    layer_idx = select_layers(model, layers)
    for name in names:
        spec = site_spec(name)
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



__all__ = ["ActivationCache", "as_inputs", "capture", "run", "run_with_records"]
