"""Needle in a haystack, RULER's templates: `needles` key/value sentences hidden at random depths;
the question asks for the value(s) of one key. Kinds: single (one needle), multikey (distractor
needles with other keys), multivalue (several values of the one key, all asked for)."""

from __future__ import annotations

import random
from typing import Callable

from kvzap_trt.eval.haystack import fit_context, haystack_units, insert_at_depths, text_lines
from kvzap_trt.eval.words import ADJECTIVES, NOUNS

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.")


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def generate(rng: random.Random, length: int, count: Callable[[str], int], haystack: str,
             keys: int = 1, values: int = 1, depth: float | None = None) -> tuple[str, str, str, list[str], dict]:
    """-> (context, question, answer prefix, answers, meta); `keys` needle keys (the first is asked for),
    `values` values for the asked key; the first needle at `depth` (random if None), the others random."""
    names = rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], keys)
    numbers = [str(x) for x in rng.sample(range(1_000_000, 10_000_000), keys - 1 + values)]
    pairs = [(names[0], v) for v in numbers[:values]] + list(zip(names[1:], numbers[values:]))
    needles = [needle(k, v) for k, v in pairs]
    depths = [rng.random() for _ in needles]
    if depth is not None:
        depths[0] = depth
    start = rng.randrange(len(text_lines()))
    query = names[0]
    if values == 1:
        question = f"What is the special magic number for {query} mentioned in the provided text?"
        prefix = f"The special magic number for {query} mentioned in the provided text is"
    else:
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"

    def build(n: int) -> str:
        units = insert_at_depths(haystack_units(haystack, start, n), needles, depths)
        return f"{INTRO}\n{' '.join(units) if haystack == 'noise' else chr(10).join(units)}"

    return fit_context(build, question, count, length), question, prefix, numbers[:values], {"needles": needles, "depths": depths}
