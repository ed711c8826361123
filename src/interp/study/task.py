"""The study's input: BOS plus random digit strings repeated twice (`DigitTask`), the checks
of its options, and the digits of another, non-repeating input."""

from __future__ import annotations

import numpy as np

from gemma_eqx.core.checks import check_length
from gemma_eqx.core.text import TokenizerLike
from gemma_eqx.model.modules import Transformer

from .. import analyses
from .results import DigitTask

CHANCE = 0.1  # ten digits


def check_top(top: int, model: Transformer, *, name: str = "top") -> None:
    """`top` heads are knocked out and as many other heads are the control: together they
    must be distinct heads of the model, or the control would repeat the top set."""
    heads = len(model.blocks) * model.config.num_heads
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {top!r}")
    if 2 * top > heads:
        raise ValueError(f"{name} {top} needs {2 * top} distinct heads (the top set and a "
                         f"control set as large); {model.config.name} has {heads}: use "
                         f"{name} {heads // 2} or fewer")


def check_digits(digits: str, max_len: int, *, name: str = "digits") -> None:
    """A clear ValueError unless `digits` is a non-empty digit string that fits twice after
    BOS in `max_len` positions (`name` is what the message calls it)."""
    if not digits:
        raise ValueError(f"{name} is empty; give a string of digits such as "
                         f"01976954310149754605")
    if not digits.isdigit() or not digits.isascii():
        bad = next(c for c in digits if not (c.isascii() and c.isdigit()))
        raise ValueError(f"{name} must contain only the digits 0-9; found {bad!r}")
    if 1 + 2 * len(digits) > max_len:
        raise ValueError(
            f"{name} has {len(digits)} digits; repeated twice after BOS that is "
            f"{1 + 2 * len(digits)} tokens, more than the model's context of {max_len}"
        )
    if len(digits) < 2:
        raise ValueError(f"{name} needs at least 2 digits for the second repetition to be "
                         f"scored")


def digit_task(
    model: Transformer,
    tokenizer: TokenizerLike,
    *,
    digits: str | None = None,
    period: int = 20,
    strings: int = 8,
    seed: int = 0,
) -> DigitTask:
    """`strings` random digit strings (the first is `digits` if given, whose length then sets
    the period), each after BOS and repeated twice, checked against the model's context."""
    context = model.config.context_length
    if digits is not None:
        check_digits(digits, context)
        period = len(digits)
    if period < 2 or strings < 1:
        raise ValueError(f"period must be >= 2 and strings >= 1; got {period}, {strings}")
    check_length(1 + 2 * period, context, f"period={period} (BOS and two repetitions)")
    ids = np.asarray(analyses.digit_ids(tokenizer))
    rows = np.random.default_rng(seed).integers(0, 10, (strings, period))
    if digits is not None:
        rows[0] = [int(c) for c in digits]
    bos = np.full((strings, 1), tokenizer.bos_id)
    tokens = np.concatenate([bos, ids[rows], ids[rows]], axis=1).astype(np.int32)
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, period + 2:] = True  # the second repetition, but its unpredictable first token
    return DigitTask(tokens, eval_mask, period,
                     tuple(tokenizer.id_to_piece(int(t)) for t in tokens[0]))


def scored_positions(task: DigitTask) -> np.ndarray:
    """Prediction positions whose target is scored (`task.eval_mask` shifted by one)."""
    return np.flatnonzero(task.eval_mask[0, 1:])


def nonrepeating_digits(tokenizer: TokenizerLike, task: DigitTask, *, seed: int) -> np.ndarray:
    """BOS + 2P random digits per string, drawn independently of the task (the counterfactual
    input of experiment 7 and the corrupted input of the patching maps)."""
    ids = np.asarray(analyses.digit_ids(tokenizer))
    strings, seq = task.tokens.shape
    rows = np.random.default_rng([seed, 7]).integers(0, 10, (strings, seq - 1))
    return np.concatenate([task.tokens[:, :1], ids[rows]], axis=1).astype(np.int32)
