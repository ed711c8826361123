"""A dictionary evaluated on token batches, with SAELens' definitions (`sae_lens.evals`):

- L0, L1: nonzero count and sum of |activation| per token, averaged over tokens;
- MSE: ||x - x_hat||^2 summed over the width, averaged over tokens (not per element);
- explained variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) over every token;
  "legacy": 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2 per token, then averaged (it
  depends on how tokens are batched: each batch's own mean);
- cosine similarity of x and x_hat, L2 ratio ||x_hat|| / ||x|| (shrinkage; ||x|| below 1e-4
  counts as 1), relative reconstruction bias E||x_hat||^2 / E<x, x_hat> (per batch, averaged);
- CE loss with the site replaced by x_hat (`spliced`, no error term), by zeros (`ablation`) and
  clean; CE loss recovered = (CE_ablation - CE_spliced) / (CE_ablation - CE_clean); KL of the
  spliced and ablated next-token distributions from the clean one per position, and the KL
  score (KL_ablation - KL_spliced) / KL_ablation;
- density per latent: the fraction of tokens on which it is nonzero; dead: never nonzero;
  dense: nonzero on more than 10% of tokens.

`x` is what the dictionary writes over (its output site's clean activation; the input for an
SAE). Tokens equal to an id of `ignore_tokens` (BOS, padding) are left out of every mean, and
so are padded positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from gemma_eqx.model.modules import Transformer

from ..install import add_interventions
from ..interventions import Record, Replace
from .dictionary import SparseDictionary
from .splice import check_fits, splice

DENSE = 0.1  # a latent nonzero on more than this fraction of tokens is dense


@dataclasses.dataclass(frozen=True)
class DictionaryMetrics:
    """Each number as the module's docstring defines it; `density` is `[latents]`."""

    tokens: int
    l0: float
    l1: float
    mse: float
    explained_variance: float
    explained_variance_legacy: float
    cossim: float
    l2_ratio: float
    relative_reconstruction_bias: float
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_ablation: float
    ce_loss_recovered: float
    kl_spliced: float
    kl_ablation: float
    kl_score: float
    density: np.ndarray
    dead: int
    dense: int

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["density"] = [float(v) for v in self.density]
        return out


def _kl(clean: Array, other: Array) -> Array:
    """KL(clean || other) per position, over the vocabulary."""
    p_log = jax.nn.log_softmax(clean.astype(jnp.float32), axis=-1)
    q_log = jax.nn.log_softmax(other.astype(jnp.float32), axis=-1)
    return (jnp.exp(p_log) * (p_log - q_log)).sum(-1)


def _ce(logits: Array, tokens: Array) -> Array:
    """Next-token cross-entropy at positions 0..seq-2."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@eqx.filter_jit
def _batch(recorded: Transformer, spliced: Transformer, ablated: Transformer,
           dictionary: SparseDictionary, tokens: Array, padding: Array) -> dict[str, Array]:
    """Per-token numbers of one batch, and the clean activations (mean taken outside)."""
    clean = recorded.forward(tokens, padding_mask=padding, check_ids=False)
    source = clean.records[f"blocks.{dictionary.reads.layer}.{dictionary.reads.site}"]
    target = clean.records[f"blocks.{dictionary.writes.layer}.{dictionary.writes.site}"]
    features = dictionary.encode(source)
    recon = dictionary.decode(features, source).astype(jnp.float32)
    logits = clean.logits
    spliced_logits = spliced.forward(tokens, padding_mask=padding, check_ids=False).logits
    ablated_logits = ablated.forward(tokens, padding_mask=padding, check_ids=False).logits
    return dict(
        target=target.astype(jnp.float32), recon=recon, features=features,
        ce_clean=_ce(logits, tokens), ce_spliced=_ce(spliced_logits, tokens),
        ce_ablation=_ce(ablated_logits, tokens), kl_spliced=_kl(logits, spliced_logits),
        kl_ablation=_kl(logits, ablated_logits))


class ReconstructionStats:
    """Streams the reconstruction metrics over batches (`add`), on the host in float64."""

    def __init__(self, width: int):
        self.per_token: dict[str, list[np.ndarray]] = {k: [] for k in (
            "l0", "l1", "mse", "legacy", "cossim", "l2_ratio")}
        self.bias: list[float] = []
        self.sum_x: np.ndarray | None = None
        self.sum_sq = self.sum_res = 0.0
        self.count = 0
        self.fired = np.zeros(width, np.float64)

    def add(self, x: Any, x_hat: Any, features: Any, keep: Any = None) -> None:
        """One batch: `x`, `x_hat` `[..., d]`, `features` `[..., latents]`, `keep` `[...]`
        (the tokens counted; all by default)."""
        x, x_hat, features = (np.asarray(a) for a in (x, x_hat, features))
        keep = np.ones(x.shape[:-1], bool) if keep is None else np.asarray(keep, bool)
        x, x_hat = x[keep].astype(np.float64), x_hat[keep].astype(np.float64)
        features = features[keep].astype(np.float64)
        if not len(x):
            return
        residual = ((x - x_hat) ** 2).sum(-1)
        active = features != 0
        self.per_token["l0"].append(active.sum(-1).astype(np.float64))
        self.per_token["l1"].append(np.abs(features).sum(-1))
        self.per_token["mse"].append(residual)
        self.per_token["legacy"].append(1 - residual / ((x - x.mean(0)) ** 2).sum(-1))
        norm_in, norm_out = np.linalg.norm(x, axis=-1), np.linalg.norm(x_hat, axis=-1)
        self.per_token["cossim"].append((x * x_hat).sum(-1) / (norm_in * norm_out))
        self.per_token["l2_ratio"].append(
            norm_out / np.where(np.abs(norm_in) < 1e-4, 1, norm_in))
        self.bias.append(float((norm_out ** 2).mean() / (x * x_hat).sum(-1).mean()))
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq += float((x ** 2).sum())
        self.sum_res += float(residual.sum())
        self.count += len(x)
        self.fired += active.sum(0)

    def summary(self) -> dict[str, Any]:
        if self.count == 0:
            raise ValueError("no token to evaluate on: every batch was empty or ignored")
        mean = {k: float(np.concatenate(v).mean()) for k, v in self.per_token.items()}
        variance = self.sum_sq / self.count - float(((self.sum_x / self.count) ** 2).sum())
        mse = self.sum_res / self.count
        explained = (1.0 if mse < 1e-10 else 0.0) if variance < 1e-10 else 1 - mse / variance
        density = self.fired / self.count
        return dict(tokens=self.count, l0=mean["l0"], l1=mean["l1"], mse=mean["mse"],
                    explained_variance=explained, explained_variance_legacy=mean["legacy"],
                    cossim=mean["cossim"], l2_ratio=mean["l2_ratio"],
                    relative_reconstruction_bias=float(np.mean(self.bias)), density=density,
                    dead=int((self.fired == 0).sum()), dense=int((density > DENSE).sum()))


def evaluate(
    model: Transformer,
    dictionary: SparseDictionary,
    batches: Iterable[Any],
    *,
    ignore_tokens: Sequence[int] = (),
) -> DictionaryMetrics:
    """`dictionary` on `model` over `batches` of token ids `[batch, seq]` (or `(tokens,
    padding_mask)` pairs; numpy or jax): the metrics of the module docstring, with the tokens
    of `ignore_tokens` left out (pass the BOS and padding ids, as SAELens' evaluation does)."""
    check_fits(model, dictionary)
    reads, writes = dictionary.reads, dictionary.writes
    recorded = add_interventions(model, {reads.layer: Record(reads.site)})
    if writes != reads:
        recorded = add_interventions(recorded, {writes.layer: Record(writes.site)})
    spliced = splice(model, dictionary, error=False)
    ablated = add_interventions(model, {writes.layer: Replace(writes.site)})
    stats = ReconstructionStats(dictionary.width)
    losses: dict[str, list[np.ndarray]] = {k: [] for k in (
        "ce_clean", "ce_spliced", "ce_ablation", "kl_spliced", "kl_ablation")}
    for batch in batches:
        tokens, padding = batch if isinstance(batch, tuple) else (batch, None)
        tokens = jnp.asarray(tokens)
        padding = jnp.ones(tokens.shape, bool) if padding is None else jnp.asarray(padding)
        out = jax.device_get(_batch(recorded, spliced, ablated, dictionary, tokens, padding))
        host_tokens = np.asarray(tokens)
        keep = np.asarray(padding) & ~np.isin(host_tokens, np.asarray(list(ignore_tokens),
                                                                       dtype=host_tokens.dtype))
        stats.add(out["target"], out["recon"], out["features"], keep)
        for name in ("ce_clean", "ce_spliced", "ce_ablation"):
            losses[name].append(out[name][keep[:, :-1]].astype(np.float64))
        for name in ("kl_spliced", "kl_ablation"):
            losses[name].append(out[name][keep].astype(np.float64))
    summary = stats.summary()
    mean = {k: float(np.concatenate(v).mean()) for k, v in losses.items()}
    return DictionaryMetrics(
        **summary, ce_loss_clean=mean["ce_clean"], ce_loss_spliced=mean["ce_spliced"],
        ce_loss_ablation=mean["ce_ablation"],
        ce_loss_recovered=(mean["ce_ablation"] - mean["ce_spliced"])
        / (mean["ce_ablation"] - mean["ce_clean"]),
        kl_spliced=mean["kl_spliced"], kl_ablation=mean["kl_ablation"],
        kl_score=(mean["kl_ablation"] - mean["kl_spliced"]) / mean["kl_ablation"])


__all__ = ["DENSE", "DictionaryMetrics", "ReconstructionStats", "evaluate"]
