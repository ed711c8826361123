"""The layer stack as a `lax.scan`: blocks grouped by the period of the attention pattern
(Gemma 1: 1 layer, Gemma 2: 2, Gemma 3: 6), each group's leaves stacked on a leading axis, so
XLA compiles one period instead of every layer. For training and throughput on large presets;
its numbers equal the unrolled model's (tested). Interventions need the unrolled model.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ..core.checks import check_length, check_padding_mask, check_tokens
from ..core.config import GemmaConfig
from .base import Module
from .modules import Block, ForwardOutput, Transformer


def pattern_period(config: GemmaConfig) -> int:
    """The shortest period of the attention kinds (the last period may be cut short)."""
    kinds = config.attention_kinds
    return next(p for p in range(1, len(kinds) + 1)
                if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))


class ScannedTransformer(Module):
    """`shell` is the model without its blocks (embedding, final norm, read-out); `groups[j]`
    is block `j` of every full period, stacked (`[periods, ...]` leaves); `rest` the blocks
    after the last full period."""

    shell: Transformer
    groups: tuple[Block, ...]
    rest: tuple[Block, ...]
    # Recompute each period in the backward pass instead of keeping its activations.
    remat: bool = eqx.field(static=True, default=False)

    @property
    def config(self) -> GemmaConfig:
        return self.shell.config

    def forward(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        logits_at: Int[Array, "batch k"] | None = None,
        check_ids: bool = True,
    ) -> ForwardOutput:
        """As `Transformer.forward` without cache or records."""
        if check_ids:
            check_tokens(tokens, self.config.vocab_size)
        check_length(tokens.shape[1], self.config.context_length, "a sequence of tokens")
        if padding_mask is None:
            padding_mask = jnp.ones(tokens.shape, bool)
        else:
            padding_mask = check_padding_mask(padding_mask, tokens.shape)
        positions = jnp.maximum(jnp.cumsum(padding_mask, axis=1) - 1, 0)
        x = self.shell.embed(tokens, positions, padding_mask, {})

        def period(x, blocks):
            for block in blocks:
                x, _ = block(x, positions, padding_mask)
            return x, None

        if self.groups:
            x, _ = jax.lax.scan(jax.checkpoint(period) if self.remat else period, x,
                                self.groups)
        x, _ = period(x, self.rest)
        logits = self.shell.readout(x, positions, padding_mask, logits_at, {})
        return ForwardOutput(logits, {}, None)

    def __call__(
        self,
        tokens: Int[Array, "batch seq"],
        *,
        padding_mask: Bool[Array, "batch seq"] | None = None,
        check_ids: bool = True,
    ) -> Float[Array, "batch seq vocab"]:
        return self.forward(tokens, padding_mask=padding_mask, check_ids=check_ids).logits


def _stack(blocks: list[Block]) -> Block:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)


def scan_layers(model: Transformer, *, remat: bool = False) -> ScannedTransformer:
    """The model with its blocks stacked per period (a copy of the block weights); with
    `remat`, gradients recompute each period's activations (memory for one period)."""
    hooked = [i for i, b in enumerate(model.blocks) if b.hooks.interventions]
    if hooked or model.hooks.interventions:
        raise ValueError(f"scan_layers: the model has interventions (layers {hooked or 'model'}); "
                         f"a scanned stack runs without them, use the unrolled model")
    period = pattern_period(model.config)
    n = len(model.blocks)
    full = n - n % period
    groups = tuple(_stack([model.blocks[i] for i in range(j, full, period)])
                   for j in range(period)) if full else ()
    shell = eqx.tree_at(lambda m: m.blocks, model, ())
    return ScannedTransformer(shell, groups, tuple(model.blocks[full:]), remat)


def unscan_layers(scanned: ScannedTransformer) -> Transformer:
    """The unrolled model back (a copy of the block weights)."""
    blocks: list[Any] = []
    if scanned.groups:
        periods = jax.tree_util.tree_leaves(scanned.groups[0])[0].shape[0]
        for p in range(periods):
            blocks += [jax.tree_util.tree_map(lambda x, p=p: x[p], g) for g in scanned.groups]
    blocks += list(scanned.rest)
    return eqx.tree_at(lambda m: m.blocks, scanned.shell, tuple(blocks))


def scanned_paths(scanned: ScannedTransformer) -> dict[str, tuple[str, bool]]:
    """For each leaf path of the scanned model, the unrolled path it stands for (its first
    layer) and whether it is stacked: how shardings carry over."""
    config = scanned.config
    period = pattern_period(config)
    full = config.num_layers - config.num_layers % period
    out = {}
    from .weights import leaf_paths

    for path in leaf_paths(scanned):
        head, _, tail = path.partition(".")
        if head == "shell":
            out[path] = (tail, False)
        else:
            index, _, leaf = tail.partition(".")
            layer = int(index) if head == "groups" else full + int(index)
            out[path] = (f"blocks.{layer}.{leaf}", head == "groups")
    return out


__all__ = ["ScannedTransformer", "pattern_period", "scan_layers", "scanned_paths",
           "unscan_layers"]
