"""Question answering over a long document: short biographies of fictional people (one asked
about, the others distractors with the same template) spread through real text; the question asks
for a fact of one person. A local stand-in for RULER's SQuAD-based QA (nothing is downloaded):
the answer is a single word stated once, among distractor facts of the same form."""

from __future__ import annotations

import random
from typing import Callable

from kvzap_trt.eval.haystack import fit_context, haystack_units, insert_at_depths, text_lines
from kvzap_trt.eval.words import FIRST_NAMES, LAST_NAMES, OCCUPATIONS, TOWNS


def generate(rng: random.Random, length: int, count: Callable[[str], int], people: int = 4,
             depth: float | None = None) -> tuple[str, str, str, list[str], dict]:
    """The asked person's biography at `depth` (random if None), the distractors' at random depths."""
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], people)
    towns = rng.sample(TOWNS, people)
    bios = [f"{n} was born in {rng.randrange(1890, 1990)} in the town of {t}, and worked for many years "
            f"as a {rng.choice(OCCUPATIONS)}." for n, t in zip(names, towns)]
    depths = [rng.random() for _ in bios]
    if depth is not None:
        depths[0] = depth
    start = rng.randrange(len(text_lines()))
    intro = "Answer the question based on the given document. Only give me the answer and do not output any other words."
    question = f"Question: In which town was {names[0]} born?"

    def build(n: int) -> str:
        doc = "\n".join(insert_at_depths(haystack_units("text", start, n), bios, depths))
        return f"{intro}\n\nThe following is the document.\n\n{doc}\n\n{intro}\n"

    return fit_context(build, question, count, length), question, "Answer:", [towns[0]], {"needles": bios, "depths": depths}
