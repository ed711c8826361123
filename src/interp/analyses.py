"""The induction-head study's analyses: copying behaviour, head scores, knock-out, attribution.

Sequence layout for the repeated-sequence analyses: token 0 is BOS, then `repeats` copies of a
random string of `period` tokens, so repetition r (0-based) holds tokens 1 + r*P .. (r+1)*P.
Log-prob index t scores the prediction of token t + 1 made at position t.

Masks over "eval positions" are shaped like the tokens, `[batch, seq]`, and mark the tokens
whose prediction (made at the position before) is scored; this keeps them valid for padded
batches of different examples. Every function works on a batch and on any preset; the heavy
ones are jitted and compile once per model structure and input shape (a new knock-out mask
value does not recompile).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gemma_eqx.core.checks import check_finite, check_head_pairs
from gemma_eqx.core.multihost import to_host
from gemma_eqx.formats.tokenizer import TokenizerLike
from gemma_eqx.model.modules import Transformer

from .capture import as_inputs as _as_inputs
from .interventions import KnockOut, TokenIds
from .staged import scored_forward, staged_scores
from .surgery import _check_mask, knock_out, knockout_mask, set_knockout_mask

Head = tuple[int, int]

# ------------------------------------------------------------------------------------- inputs


def repeated_random_tokens(
    key: Any,
    *,
    batch: int,
    period: int,
    repeats: int,
    vocab_low: int,
    vocab_high: int,
    bos_id: int,
) -> Int[Array, "batch seq"]:
    """BOS + a uniform random string of `period` ids in [vocab_low, vocab_high), repeated
    `repeats` times: `[batch, 1 + period * repeats]`."""
    if period < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"batch, period and repeats must be >= 1; got {batch}, {period}, "
                         f"{repeats}")
    if not 0 <= vocab_low < vocab_high:
        raise ValueError(f"need 0 <= vocab_low < vocab_high; got [{vocab_low}, {vocab_high})")
    string = jax.random.randint(key, (batch, period), vocab_low, vocab_high, jnp.int32)
    bos = jnp.full((batch, 1), bos_id, jnp.int32)
    return jnp.concatenate([bos] + [string] * repeats, axis=1)


def digit_ids(tokenizer: TokenizerLike) -> list[int]:
    """The token id of each digit 0-9; an error if a digit is not exactly one token."""
    ids = []
    for d in "0123456789":
        enc = list(tokenizer.encode(d))
        if len(enc) != 1:
            raise ValueError(f"the tokenizer encodes digit {d!r} as {enc}, not as one token; "
                             "repeated-digit inputs need one token per digit")
        ids.append(int(enc[0]))
    return ids


def _digits(key: Any, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(key, np.random.Generator):
        return key.integers(0, 10, shape)
    if isinstance(key, int):
        return np.random.default_rng(key).integers(0, 10, shape)
    return to_host(jax.random.randint(key, shape, 0, 10))


def repeated_digits(
    tokenizer: TokenizerLike, key: Any, *, batch: int, period: int = 20, repeats: int = 2
) -> Int[Array, "batch seq"]:
    """BOS + a random digit string of length `period`, repeated `repeats` times, through the
    tokenizer (`encode(text)` without BOS, `bos_id`), as in the study: `[batch, 1 + P * R]`.

    `key` is a JAX PRNG key, a numpy Generator or an int seed. Checks that each digit is one
    token and that the tokenizer splits a whole digit string the same way.
    """
    ids = to_host(digit_ids(tokenizer))
    digits = _digits(key, (batch, period))
    text = "".join(map(str, digits[0])) * repeats
    whole = list(tokenizer.encode(text))
    split = ids[np.tile(digits[0], repeats)].tolist()
    if whole != split:
        raise ValueError(f"the tokenizer does not split the digit string {text!r} into one "
                         f"token per digit: {whole}")
    body = np.tile(ids[digits], (1, repeats))
    bos = np.full((batch, 1), tokenizer.bos_id)
    return jnp.asarray(np.concatenate([bos, body], axis=1), jnp.int32)


# ---------------------------------------------------------------------------------- behaviour


def correct_token_logprobs(
    logits: Float[Array, "batch seq vocab"], tokens: Int[Array, "batch seq"]
) -> Float[Array, "batch seq-1"]:
    """Log-probability (float32) of `tokens[:, t + 1]` under the prediction at position t."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def correct_token_hits(
    logits: Float[Array, "batch seq vocab"], tokens: Int[Array, "batch seq"]
) -> Bool[Array, "batch seq-1"]:
    """Whether the argmax prediction at position t is `tokens[:, t + 1]`."""
    return jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]


class RepetitionStats(NamedTuple):
    logprob: Float[Array, " repeats"]  # mean correct-token log-prob per repetition
    accuracy: Float[Array, " repeats"]  # fraction of argmax hits per repetition
    later_logprob: Float[Array, ""]  # the same over repetitions 2.. together
    later_accuracy: Float[Array, ""]


def repetition_stats(
    logprobs: Float[Array, "batch predictions"],
    logits: Float[Array, "batch seq vocab"],
    tokens: Int[Array, "batch seq"],
    period: int,
    repeats: int,
) -> RepetitionStats:
    """Per-repetition mean log-prob and accuracy over the batch, for `tokens` = BOS and
    `repeats` copies of a `period`-token string. A repetition's scores count the predictions
    of its tokens after the first: nothing before a repetition predicts its first token (for
    repetitions 2.. these are the positions the study's `eval_mask` scores). The `later_*`
    fields pool repetitions 2.. (NaN when repeats = 1)."""
    seq = tokens.shape[1]
    if seq != 1 + period * repeats:
        raise ValueError(f"tokens have {seq} positions; BOS + {repeats} x {period} needs "
                         f"{1 + period * repeats}")
    if period < 2:
        raise ValueError(f"period {period}: a repetition needs a token after its first")
    hits = correct_token_hits(logits, tokens).astype(jnp.float32)
    lp = logprobs.reshape(-1, repeats, period)[:, :, 1:]
    acc = hits.reshape(-1, repeats, period)[:, :, 1:]
    return RepetitionStats(lp.mean(axis=(0, 2)), acc.mean(axis=(0, 2)), lp[:, 1:].mean(),
                           acc[:, 1:].mean())


# -------------------------------------------------------------------------------- head scores


def induction_pattern(seq: int, period: int) -> Bool[np.ndarray, "seq seq"]:
    """[query, key] True at key q - P + 1 for queries q in repetitions 2.. (q >= 1 + P)."""
    out = np.zeros((seq, seq), bool)
    q = np.arange(1 + period, seq)
    out[q, q - period + 1] = True
    return out


def duplicate_token_pattern(seq: int, period: int) -> Bool[np.ndarray, "seq seq"]:
    """[query, key] True at key q - P (the earlier occurrence of the same token), q >= 1 + P."""
    out = np.zeros((seq, seq), bool)
    q = np.arange(1 + period, seq)
    out[q, q - period] = True
    return out


def previous_token_pattern(seq: int) -> Bool[np.ndarray, "seq seq"]:
    """[query, key] True at key q - 1 for q >= 2 (at q = 1 the previous token is BOS, where
    idle heads park their attention anyway)."""
    out = np.zeros((seq, seq), bool)
    q = np.arange(2, seq)
    out[q, q - 1] = True
    return out


def expected_pattern_mass(
    patterns: Float[Array, "layers batch heads query key"],
    expected_mask: Bool[Array, "*mask_batch query key"] | Bool[np.ndarray, "*mask_batch query key"],
) -> Float[Array, "layers heads"]:
    """Attention mass each head puts on the keys `expected_mask` marks, averaged over the
    queries that have at least one marked key (per example if the mask has a batch axis, e.g.
    for a padded batch), then over the batch."""
    mask = jnp.asarray(expected_mask)
    if mask.shape[-2:] != patterns.shape[-2:]:
        raise ValueError(f"expected_mask [query, key] = {tuple(mask.shape[-2:])} does not match "
                         f"the patterns' {tuple(patterns.shape[-2:])} (record every query)")
    if mask.ndim == 2:
        mask = jnp.broadcast_to(mask, (patterns.shape[1], *mask.shape))
    if mask.shape[0] != patterns.shape[1]:
        raise ValueError(f"expected_mask batch {mask.shape[0]} != patterns batch "
                         f"{patterns.shape[1]}")
    mass = jnp.einsum("lbhqk,bqk->lhbq", patterns.astype(jnp.float32), mask.astype(jnp.float32))
    used = mask.any(-1).astype(jnp.float32)  # [batch, query]
    counts = used.sum(-1)  # [batch]
    if not isinstance(counts, jax.core.Tracer) and bool((counts == 0).any()):
        raise ValueError("expected_mask marks no key for some example")
    per_example = (mass * used).sum(-1) / counts  # [layers, heads, batch]
    return per_example.mean(-1)


def induction_scores(
    patterns: Float[Array, "layers batch heads query key"], period: int
) -> Float[Array, "layers heads"]:
    """Mean attention of queries in repetitions 2.. to the token after the earlier occurrence
    (key q - P + 1); BOS at 0 and period P as in `repeated_random_tokens`."""
    return expected_pattern_mass(patterns, induction_pattern(_seq(patterns, period), period))


def duplicate_token_scores(
    patterns: Float[Array, "layers batch heads query key"], period: int
) -> Float[Array, "layers heads"]:
    """Mean attention of queries in repetitions 2.. to the earlier occurrence (key q - P)."""
    return expected_pattern_mass(patterns, duplicate_token_pattern(_seq(patterns, period), period))


def previous_token_scores(
    patterns: Float[Array, "layers batch heads query key"],
) -> Float[Array, "layers heads"]:
    """Mean attention of queries q >= 2 to key q - 1."""
    return expected_pattern_mass(patterns, previous_token_pattern(_seq(patterns, 1)))


def _seq(patterns: Any, period: int) -> int:
    q, k = patterns.shape[-2:]
    if q != k:
        raise ValueError(f"head scores need every query recorded; patterns are [{q} queries, "
                         f"{k} keys]")
    if k < 2 + period:
        raise ValueError(f"{k} positions hold no query after the first period of {period}")
    return k


def rank_heads(
    scores: Float[Array, "layers heads"], top: int | None = None
) -> list[tuple[int, int, float]]:
    """`(layer, head, score)` sorted by score, highest first (the first `top` of them)."""
    host = to_host(scores, np.float64)
    order = np.argsort(-host, axis=None, kind="stable")
    ranked = [(int(i // host.shape[1]), int(i % host.shape[1]), float(host.flat[i]))
              for i in order]
    return ranked if top is None else ranked[:top]


# ---------------------------------------------------------------------------------- knock-out


class KnockoutResult(NamedTuple):
    logprob: Float[Array, " batch"]  # mean correct-token log-prob over its eval positions
    accuracy: Float[Array, " batch"]  # fraction of argmax hits over them
    count: Int[Array, " batch"]  # how many eval positions each example has


def _check_eval_mask(eval_mask: Any, tokens: Any, padding_mask: Any) -> Bool[Array, "batch seq"]:
    eval_mask = jnp.asarray(eval_mask)
    if eval_mask.shape != tokens.shape or eval_mask.dtype != jnp.bool_:
        raise ValueError(f"eval_mask must be a bool array shaped like tokens "
                         f"{tuple(tokens.shape)}; got {eval_mask.dtype} {tuple(eval_mask.shape)}")
    if isinstance(eval_mask, jax.core.Tracer):
        return eval_mask
    host = to_host(eval_mask)
    if host[:, 0].any():
        raise ValueError("eval_mask marks token 0, which no position predicts")
    bad = np.argwhere(host & ~to_host(padding_mask))
    if bad.size:
        raise ValueError(f"eval_mask marks padding at [batch {bad[0][0]}, position {bad[0][1]}]")
    # A target's prediction comes from the previous position, which must be a real token too.
    bad = np.argwhere(host[:, 1:] & ~to_host(padding_mask)[:, :-1])
    if bad.size:
        raise ValueError(f"eval_mask marks [batch {bad[0][0]}, position {bad[0][1] + 1}], the "
                         "first real token of its row, which no real position predicts")
    empty = np.flatnonzero(~host.any(1))
    if empty.size:
        raise ValueError(f"eval_mask marks no position in example {int(empty[0])}")
    return eval_mask


class _EvalScore(eqx.Module):
    """Summed correct-token log-prob and argmax hits over each row's eval positions, from the
    logits at the scored positions only (`[batch, k, vocab]`)."""

    targets: Int[Array, "batch k"]
    weights: Bool[Array, "batch k"]
    # Streaming the vocabulary saves memory traffic forward, but its backward pass recomputes
    # every chunk: gradients take the logits.
    can_stream: bool = eqx.field(static=True, default=True)

    def __call__(self, logits: Float[Array, "batch k vocab"]) -> tuple[Array, Array]:
        logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        lp = jnp.take_along_axis(logp, self.targets[..., None], axis=-1)[..., 0]
        return self._sums(lp, jnp.argmax(logits, axis=-1))

    def stream_score(self, model: Transformer, normed: Float[Array, "batch k embed"]):
        return self._sums(*model.target_logprobs(normed, self.targets))

    def _sums(self, lp: Array, argmax: Array) -> tuple[Array, Array]:
        hits = argmax == self.targets
        return (jnp.where(self.weights, lp, 0.0).sum(-1),
                (hits & self.weights).sum(-1).astype(jnp.float32))


def _scored(
    tokens: Int[Array, "batch seq"], eval_mask: Bool[Array, "batch seq"]
) -> tuple[Int[Array, " k"], _EvalScore]:
    """The positions whose predictions some row scores, and the score over them. The
    vocabulary projection then runs at those positions only (most of a small model's cost)."""
    if isinstance(eval_mask, jax.core.Tracer):
        cols = np.arange(tokens.shape[1] - 1)
    else:
        cols = np.flatnonzero(to_host(eval_mask)[:, 1:].any(0))
    targets = jnp.take(tokens, cols + 1, axis=1)
    weights = jnp.take(eval_mask, cols + 1, axis=1)
    return jnp.asarray(cols, jnp.int32), _EvalScore(targets, weights)


def _eval_sums(model, tokens, padding_mask, cols, score):
    return scored_forward(model, tokens, padding_mask, cols, score)[0]


@eqx.filter_jit
def _knockout_eval(model, tokens, padding_mask, cols, score):
    lp, hits = _eval_sums(model, tokens, padding_mask, cols, score)
    count = score.weights.sum(-1)
    return KnockoutResult(lp / count, hits / count, count)


def knockout_eval(
    model: Transformer,
    tokens: TokenIds,
    mask: Float[Array, "layers heads"],
    eval_mask: Bool[Array | np.ndarray, "batch seq"],
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> KnockoutResult:
    """Per example: mean correct-token log-prob and accuracy over its `eval_mask` positions,
    with heads knocked out per `mask` (1 keeps, 0 sends attention to BOS). Jitted; a new mask
    value reuses the compilation."""
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    eval_mask = _check_eval_mask(eval_mask, tokens, padding_mask)
    return _knockout_eval(knock_out(model, mask), tokens, padding_mask,
                          *_scored(tokens, eval_mask))


def knockout_sweep(
    model: Transformer,
    tokens: TokenIds,
    masks: Float[Array, "n layers heads"],
    eval_mask: Bool[Array | np.ndarray, "batch seq"],
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    chunk: int = 128,
) -> KnockoutResult:
    """`knockout_eval` for each of `masks`: fields are `[n, batch]`. `single_head_masks(model)`
    gives the sweep over every head.

    One program runs up to `chunk` masks together (`interp.staged`): a mask whose first
    knocked-out head sits in layer `l` shares the unchanged layers below `l` with the others,
    and logits are computed at the eval positions only. Results equal one `knockout_eval` per
    mask (to float rounding); a new set of masks with the same first layers reuses the
    compilation."""
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    eval_mask = _check_eval_mask(eval_mask, tokens, padding_mask)
    expected = (len(model.blocks), model.config.num_heads)
    if not hasattr(masks, "shape") or masks.ndim != 3 or masks.shape[0] < 1 \
            or tuple(masks.shape[1:]) != expected:
        raise ValueError(f"masks must be [n, layers, heads] = [n >= 1, {expected[0]}, "
                         f"{expected[1]}]; got {getattr(masks, 'shape', type(masks).__name__)}")
    check_finite(masks, "masks", axes=("mask", "layer", "head"))
    host = to_host(masks, np.float32)
    changed = (host != 1).any(axis=2)  # [n, layers]
    starts = np.where(changed.any(1), changed.argmax(1), len(model.blocks))
    batch = tokens.shape[0]

    def knock(layer: int, groups: np.ndarray) -> tuple[KnockOut, ...]:
        rows = np.where((groups >= 0)[:, None], host[groups, layer], 1.0)
        return (KnockOut(jnp.asarray(np.repeat(rows, batch, axis=0))),)

    cols, score = _scored(tokens, eval_mask)
    _, (lp, hits) = staged_scores(model, tokens, padding_mask, starts, knock, cols, score,
                                  chunk=chunk)
    count = to_host(score.weights.sum(-1))
    return KnockoutResult(jnp.asarray((lp / count).astype(np.float32)),
                          jnp.asarray((hits / count).astype(np.float32)),
                          jnp.asarray(np.broadcast_to(count, lp.shape)))


def single_head_masks(model: Transformer) -> Float[Array, "n layers heads"]:
    """One mask per head, knocking out only that head; mask i is head (i // H, i % H)."""
    n_layers, n_heads = len(model.blocks), model.config.num_heads
    return 1.0 - jnp.eye(n_layers * n_heads, dtype=jnp.float32).reshape(-1, n_layers, n_heads)


@eqx.filter_jit
def _attribution(model, tokens, padding_mask, cols, score, mask):
    def objective(m):
        lp, _ = _eval_sums(set_knockout_mask(model, m), tokens, padding_mask, cols, score)
        return lp.sum() / score.weights.sum()

    return jax.value_and_grad(objective)(mask)


def attribution_gradient(
    model: Transformer,
    tokens: TokenIds,
    eval_mask: Bool[Array | np.ndarray, "batch seq"],
    mask: Float[Array, "layers heads"],
    *,
    padding_mask: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, "layers heads"]:
    """Gradient, with respect to the knock-out mask at `mask`, of the mean correct-token
    log-prob over all eval positions of the batch (attribution patching)."""
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    eval_mask = _check_eval_mask(eval_mask, tokens, padding_mask)
    _check_mask(model, mask)
    mask = jnp.asarray(mask, jnp.float32)
    cols, score = _scored(tokens, eval_mask)
    score = _EvalScore(score.targets, score.weights, can_stream=False)
    _, grad = _attribution(knock_out(model, mask), tokens, padding_mask, cols, score, mask)
    return grad


class BreakingSet(NamedTuple):
    heads: list[Head]  # the minimal set found, in the order the heads were knocked out
    broken: bool  # whether knocking out `heads` brings accuracy to chance + threshold
    accuracy: float  # pooled eval accuracy with `heads` knocked out (re-run at the end)
    baseline: float  # pooled eval accuracy with nothing knocked out
    trail: list[tuple[str, Head, float]]  # ("add" | "keep" | "drop", head, accuracy) per step


def minimal_breaking_set(
    model: Transformer,
    tokens: TokenIds,
    eval_mask: Bool[Array | np.ndarray, "batch seq"],
    candidates: Sequence[tuple[int, int] | tuple[int, int, float]],
    *,
    chance_accuracy: float,
    threshold: float,
    padding_mask: Bool[Array, "batch seq"] | None = None,
    baseline: float | None = None,
) -> BreakingSet:
    """A small set of heads whose knock-out breaks copying.

    "Broken" means pooled accuracy over the eval positions <= `chance_accuracy + threshold`.
    Greedy: knock out `candidates` in the given (ranked) order until broken ("add" steps); then
    restore each chosen head in turn, in the order added, and drop it if the rest stay broken
    ("drop"), else keep it ("keep"); finally re-run the remaining set. Candidates come from a
    ranking (e.g. `rank_heads(induction_scores(...))` or of attribution gradients at the
    top-k-knocked point); ranking, not gradients, picks the next head, so every step is one
    forward pass with a compiled-once mask. If every candidate together does not break
    copying, returns them all with `broken=False`.
    """
    tokens, padding_mask = _as_inputs(model, tokens, padding_mask)
    eval_mask = _check_eval_mask(eval_mask, tokens, padding_mask)
    heads = check_head_pairs(candidates, len(model.blocks), model.config.num_heads,
                             "candidate")
    if len(set(heads)) != len(heads):
        raise ValueError(f"candidates contain a head twice: {heads}")

    def accuracy(knocked: list[Head]) -> float:
        r = knockout_eval(model, tokens, knockout_mask(model, knocked), eval_mask,
                          padding_mask=padding_mask)
        return float((r.accuracy * r.count).sum() / r.count.sum())

    def is_broken(acc: float) -> bool:
        return acc <= chance_accuracy + threshold

    if baseline is None:  # the caller may know it already (the study's behaviour does)
        baseline = accuracy([])
    chosen: list[Head] = []
    trail: list[tuple[str, Head, float]] = []
    for head in heads:
        chosen.append(head)
        acc = accuracy(chosen)
        trail.append(("add", head, acc))
        if is_broken(acc):
            break
    else:
        return BreakingSet(chosen, False, accuracy(chosen), baseline, trail)
    for head in list(chosen):
        rest = [h for h in chosen if h != head]
        acc = accuracy(rest) if rest else baseline
        if rest and is_broken(acc):
            chosen = rest
            trail.append(("drop", head, acc))
        else:
            trail.append(("keep", head, acc))
    final = accuracy(chosen)
    return BreakingSet(chosen, is_broken(final), final, baseline, trail)
