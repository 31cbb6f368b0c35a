"""Haystacks (the text a needle hides in) and fitting a prompt to a token length.

noise: RULER's repeated filler ("The grass is green. ..."). text: lines of real English prose and
code, the docstrings of Python's standard library (offline; the same source as
scripts/bench_text.py and scripts/make_corpus.py, which the surrogates were trained on).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Callable

from kvzap_trt.errors import KvzapError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

DOC_MODULES = ("argparse", "collections", "json", "logging", "re", "textwrap", "unittest", "typing", "asyncio",
               "dataclasses", "functools", "itertools", "pathlib", "subprocess", "threading", "email", "http",
               "sqlite3", "decimal", "fractions", "statistics", "random", "datetime", "calendar", "csv", "zipfile")


@functools.lru_cache(maxsize=1)
def stdlib_docs() -> tuple[str, ...]:
    """The docstrings of DOC_MODULES, each module's then its public classes' and functions' in
    name order: real prose and code, offline (scripts/bench_text.py joins them too)."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            mod = importlib.import_module(name)
            docs += [inspect.getdoc(mod)] + [inspect.getdoc(getattr(mod, a)) for a in sorted(vars(mod))
                                             if not a.startswith("_") and (inspect.isclass(getattr(mod, a))
                                                                           or inspect.isfunction(getattr(mod, a)))]
    return tuple(d for d in docs if d)


@functools.lru_cache(maxsize=1)
def text_lines() -> tuple[str, ...]:
    """Non-empty lines of the standard library's module and public-object docstrings, in a fixed order."""
    return tuple(ln.strip() for d in stdlib_docs() for ln in d.splitlines() if len(ln.strip()) > 20)


def haystack_units(kind: str, start: int, n: int) -> list[str]:
    """n filler units: noise sentences, or consecutive docstring lines from `start` (cyclic)."""
    if kind == "noise":
        return [NOISE] * n
    if kind == "text":
        lines = text_lines()
        return [lines[(start + i) % len(lines)] for i in range(n)]
    raise KvzapError(f"haystack must be noise or text, got {kind!r}")


def insert_at_depths(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """units with needles[i] inserted before unit round(depths[i] * len(units)) (depth 0: first)."""
    out = list(units)
    for needle, d in sorted(zip(needles, depths), key=lambda nd: -nd[1]):  # deepest first: indices stay valid
        out.insert(round(d * len(units)), needle)
    return out


def fit_context(build: Callable[[int], str], question: str, count: Callable[[str], int], length: int,
                max_units: int = 1 << 16) -> str:
    """build(n), fitted so that build(n) + "\\n" + question has at most `length` tokens (see fit)."""
    return fit(lambda n: f"{build(n)}\n{question}", count, length, max_units)[: -len(question) - 1]


def fit(build: Callable[[int], str], count: Callable[[str], int], length: int, max_units: int = 1 << 16) -> str:
    """build(n) for the largest n <= max_units whose text has at most `length` tokens by `count`
    (texts grow with n)."""
    if count(build(0)) > length:
        raise KvzapError(f"a {length}-token prompt cannot hold even the task's question and needles "
                         f"({count(build(0))} tokens)")
    lo, hi = 0, 1
    while hi <= max_units and count(build(hi)) <= length:
        lo, hi = hi, hi * 2
    hi = min(hi, max_units + 1)
    while hi - lo > 1:  # count(build(lo)) <= length, and hi is too long or past max_units
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid)
    return build(lo)
