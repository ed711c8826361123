"""Experiment 8, with a sparse dictionary: which latents of an SAE (an attention-output one
at the induction heads' layer, typically) fire on the second occurrence of a repeated digit,
and what ablating them costs the induction metric."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemma_eqx.core.multihost import to_host
from gemma_eqx.model.modules import Transformer
from gemma_eqx.model.sites import feature_site

from ..capture import capture
from ..features import SparseDictionary, check_fits, splice
from ..features.effects import latent_ablation_sweep
from .results import DigitTask, FeatureExperiment, Head, InductionLatent


def feature_experiment(
    model: Transformer,
    task: DigitTask,
    dictionary: SparseDictionary,
    heads: Sequence[Head],
    *,
    count: int = 10,
) -> FeatureExperiment:
    """Splice `dictionary` (an SAE) with its error term, rank its latents by mean activation
    on the second occurrence of the digits minus that on the first, and zero-ablate each of
    the top `count`, then all of them together, scoring the second repetition as the
    knock-outs do (one staged sweep). `heads` (the critical heads) are reported beside the
    dictionary's layer."""
    check_fits(model, dictionary)
    if dictionary.reads != dictionary.writes:
        raise ValueError(f"the features experiment takes an SAE (it reads and writes one site); "
                         f"{dictionary.name} is a {dictionary.kind} from {dictionary.reads} to "
                         f"{dictionary.writes}")
    if count < 1:
        raise ValueError(f"count must be >= 1; got {count}")
    layer, site = dictionary.reads.layer, feature_site(dictionary.reads.site)
    spliced = splice(model, dictionary)
    _, cache = capture(spliced, task.tokens, sites=[site], layers=[layer])
    acts = to_host(cache[site, layer], np.float64)  # [strings, seq, latents]
    period = task.period
    first, second = acts[:, 1:period + 1], acts[:, period + 1:2 * period + 1]
    mean_first, mean_second = first.mean(axis=(0, 1)), second.mean(axis=(0, 1))
    fires_first, fires_second = (first > 0).mean(axis=(0, 1)), (second > 0).mean(axis=(0, 1))
    chosen = [int(i) for i in np.argsort(-(mean_second - mean_first), kind="stable")[:count]]
    sets = [[], *([i] for i in chosen), chosen]
    swept = latent_ablation_sweep(spliced, task.tokens, task.eval_mask, site, layer, sets)
    logprob = to_host(swept.logprob, np.float64).mean(axis=1)
    accuracy = to_host(swept.accuracy, np.float64).mean(axis=1)
    latents = tuple(
        InductionLatent(i, float(mean_first[i]), float(mean_second[i]), float(fires_first[i]),
                        float(fires_second[i]), float(logprob[j]), float(accuracy[j]))
        for j, i in enumerate(chosen, 1))
    return FeatureExperiment(
        dictionary=dictionary.name, site=site, layer=layer, width=dictionary.width,
        head_layers=tuple(sorted({int(h[0]) for h in heads})),
        baseline_logprob=float(logprob[0]), baseline_accuracy=float(accuracy[0]),
        all_ablated_logprob=float(logprob[-1]), all_ablated_accuracy=float(accuracy[-1]),
        latents=latents)
