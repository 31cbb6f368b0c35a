"""The task table: name -> generator and its parameters, and the samples of a task at a length.

Every sample draws from its own `random.Random` seeded by (task, length, seed, index), so a
sample does not depend on which other tasks, lengths or sample counts run beside it.
"""

from __future__ import annotations

import random
from typing import Callable

from kvzap_trt.errors import KvzapError
from kvzap_trt.eval import cwe, niah, qa, vt
from kvzap_trt.eval.sample import Sample

# name: (generator, keyword arguments, max new tokens); generators taking `depth` get depth(index)
TASKS: dict[str, tuple[Callable, dict, int]] = {
    "niah_single_noise": (niah.generate, dict(haystack="noise"), 16),
    "niah_single_text": (niah.generate, dict(haystack="text"), 16),
    "niah_multikey_text": (niah.generate, dict(haystack="text", keys=4), 16),
    "niah_multivalue_noise": (niah.generate, dict(haystack="noise", values=4), 48),
    "vt": (vt.generate, dict(hops=4), 32),
    "cwe": (cwe.generate, dict(top=5), 40),
    "qa": (qa.generate, dict(people=4), 24),
}


def task_names(spec: list[str] | None) -> list[str]:
    """The tasks named (all when None), checked against the table."""
    names = list(TASKS) if not spec else spec
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise KvzapError(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    return names


def depth(index: int) -> float:
    """Where sample `index` hides what it asks for: a golden-ratio sequence in (0, 1), so that any
    first n samples spread evenly over the context (6 random depths fell all past 0.55 once)."""
    return (0.5 + index * 0.6180339887498949) % 1.0


def make_samples(task: str, length: int, n: int, seed: int, count: Callable[[str], int]) -> list[Sample]:
    """n samples of `task` whose context and question have at most `length` tokens by `count`."""
    (gen, kwargs, max_new), = [TASKS[t] for t in task_names([task])]
    if length < 1 or n < 1:
        raise KvzapError(f"length and sample count must be >= 1, got {length} and {n}")
    out = []
    for i in range(n):
        rng = random.Random(f"{task}:{length}:{seed}:{i}")
        if gen in (niah.generate, qa.generate):
            kwargs = {**kwargs, "depth": depth(i)}
        context, question, prefix, answers, meta = gen(rng, length, count, **kwargs)
        out.append(Sample(task, length, i, context, question, prefix, answers, max_new, meta))
    return out

