"""Variable tracking (RULER): a chain `VAR A = 12345`, `VAR B = VAR A`, ... hidden in the noise
haystack; the answer is every variable that holds the value."""

from __future__ import annotations

import random
import string
from typing import Callable

from kvzap_trt.eval.haystack import fit_context, haystack_units, insert_at_depths


def generate(rng: random.Random, length: int, count: Callable[[str], int], hops: int = 4
             ) -> tuple[str, str, str, list[str], dict]:
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(rng.random() for _ in chain)  # assignments appear in order
    question = (f"Question: Find all variables that are assigned the value {value} in the text above.")
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."

    def build(n: int) -> str:
        return f"{intro}\n\n{' '.join(insert_at_depths(haystack_units('noise', 0, n), chain, depths))}"

    prefix = f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are assigned the value {value}, they are:"
    return fit_context(build, question, count, length), question, prefix, names, {"chain": chain, "depths": depths}
