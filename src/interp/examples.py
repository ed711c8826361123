"""The study's knock-out examples as text, with the tokens to score, tokenized into one batch.

An `Example` is a list of text segments, each flagged for evaluation: every token of a flagged
segment is scored (its prediction from the position before it). Builders flag the second
occurrence of the repeated text except its first token, which copying cannot predict (and,
for the word list, except its commas). Segments
are encoded separately and concatenated after BOS, so the two occurrences get the same token
ids (SentencePiece does not merge across the spaces that start segments here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from gemma_eqx.formats.tokenizer import TokenizerLike


@dataclasses.dataclass(frozen=True)
class Example:
    name: str
    segments: tuple[tuple[str, bool], ...]  # (text, evaluate its tokens?)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _repeat(name: str, first: str, second_head: str, second_rest: str) -> Example:
    """First occurrence, then the second split into its unpredictable head and scored rest."""
    return Example(name, ((first, False), (second_head, False), (second_rest, True)))


def random_digits(seed: int | np.random.Generator = 0, length: int = 20) -> Example:
    """A random digit string repeated twice (Gemma writes each digit as one token)."""
    s = "".join(map(str, _rng(seed).integers(0, 10, length)))
    return _repeat("random digits", s, s[0], s[1:])


WORDS = (
    "apple river candle mirror garden pencil window forest bottle ladder engine jacket "
    "violin pepper rocket blanket castle button desert helmet island kettle lemon magnet "
    "needle orange pillow rabbit saddle tunnel umbrella wallet anchor barrel carpet dragon "
    "feather guitar hammer insect jungle kitten lantern meadow noodle oyster puzzle quartz "
    "ribbon spider turtle valley whistle yogurt zipper cactus dolphin falcon"
).split()


def repeated_words(seed: int | np.random.Generator = 0, count: int = 12) -> Example:
    """A comma-separated list of `count` distinct random common words, repeated; the words of
    the second list are scored, not its commas. (Gemma 3 270M copies a comma list perfectly,
    a bare space-separated one far less: it keeps predicting an image token there.)"""
    words = list(_rng(seed).choice(WORDS, size=count, replace=False))
    segments = [(", ".join(words), False), (",", False), (" " + words[0], False)]
    for word in words[1:]:
        segments += [(",", False), (" " + word, True)]
    return Example("repeated words", tuple(segments))


CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Spain", "Madrid"),
    ("Norway", "Oslo"), ("Chile", "Santiago"), ("Greece", "Athens"), ("India", "New Delhi"),
    ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Thailand", "Bangkok"),
    ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Argentina", "Buenos Aires"),
    ("Germany", "Berlin"),
)


def country_capitals(seed: int | np.random.Generator = 0, count: int = 8) -> Example:
    """A "country: capital" list, one per line, repeated after a blank line."""
    pairs = [CAPITALS[i] for i in _rng(seed).choice(len(CAPITALS), size=count, replace=False)]
    lines = [f"{c}: {cap}" for c, cap in pairs]
    text = "\n".join(lines)
    return _repeat("country capitals", text, "\n\n" + pairs[0][0],
                   lines[0][len(pairs[0][0]):] + "\n" + "\n".join(lines[1:]))


SENTENCE = ("The old lighthouse keeper walked along the rocky shore every morning, counting the "
            "fishing boats that had come back safely during the night.")


def repeated_sentence(sentence: str = SENTENCE) -> Example:
    """A natural sentence that repeats itself, scored from its third word: the second
    occurrence starts with a space the first lacks, so its first word is another token, and
    the word after it does not follow a token seen before."""
    first, second, rest = sentence.split(" ", 2)
    return _repeat("repeated sentence", sentence, f" {first} {second}", " " + rest)


PI = ("3.14159265358979323846264338327950288419716939937510"
      "58209749445923078164062862089986280348253421170679")


def pi_digits(count: int = 60, repeat: bool = True) -> Example:
    """The first `count` decimals of pi after "3.". Repeated (scoring the second occurrence)
    by default; with `repeat=False` the decimals themselves are scored: a memorisation control
    that copying cannot help."""
    if not 1 <= count <= len(PI) - 2:
        raise ValueError(f"count must be in [1, {len(PI) - 2}]; got {count}")
    digits = PI[2:2 + count]
    if not repeat:
        return Example("pi digits (not repeated)", (("3.", False), (digits, True)))
    return _repeat("pi digits", "3." + digits, " 3.", digits)


def study_examples(seed: int = 0) -> list[Example]:
    """The study's knock-out examples: other random digits, words, capitals, a sentence, pi."""
    rng = np.random.default_rng(seed)
    return [random_digits(rng), repeated_words(rng), country_capitals(rng),
            repeated_sentence(), pi_digits()]


class ExampleBatch(NamedTuple):
    tokens: Int[Array, "batch seq"]
    padding_mask: Bool[Array, "batch seq"]  # True on real tokens (BOS included)
    eval_mask: Bool[Array, "batch seq"]  # True on the tokens whose prediction is scored
    names: list[str]


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: TokenizerLike,
    *,
    pad_side: Literal["left", "right"] = "left",
) -> ExampleBatch:
    """BOS + the examples' tokens as one padded batch, with padding and eval masks.

    `tokenizer` needs `encode(text) -> list[int]` (no BOS), `bos_id` and `pad_id` (padding
    uses 0 if `pad_id` is negative, i.e. undefined).
    """
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right'; got {pad_side!r}")
    if not examples:
        raise ValueError("tokenize_examples needs at least one example")
    rows, scored = [], []
    for ex in examples:
        ids, flags = [int(tokenizer.bos_id)], [False]
        for text, evaluate in ex.segments:
            enc = [int(t) for t in tokenizer.encode(text)]
            ids += enc
            flags += [evaluate] * len(enc)
        if not any(flags):
            raise ValueError(f"example {ex.name!r} has no token to evaluate")
        rows.append(ids)
        scored.append(flags)
    length = max(len(r) for r in rows)
    tokens = np.full((len(rows), length), max(int(tokenizer.pad_id), 0), np.int32)
    padding = np.zeros((len(rows), length), bool)
    evaluate = np.zeros((len(rows), length), bool)
    for i, (row, flags) in enumerate(zip(rows, scored, strict=True)):
        span = slice(length - len(row), length) if pad_side == "left" else slice(0, len(row))
        tokens[i, span], padding[i, span], evaluate[i, span] = row, True, flags
    return ExampleBatch(jnp.asarray(tokens), jnp.asarray(padding), jnp.asarray(evaluate),
                        [ex.name for ex in examples])
