"""Long real English text for benchmarks, offline: the standard library's own documentation."""

from __future__ import annotations

import importlib
import inspect

DOC_MODULES = ["argparse", "collections", "json", "logging", "re", "textwrap", "unittest", "typing", "asyncio",
               "dataclasses", "functools", "itertools", "pathlib", "subprocess", "threading", "email", "http",
               "sqlite3", "decimal", "fractions", "statistics", "random", "datetime", "calendar", "csv", "zipfile"]


def long_text() -> str:
    """Module and public-object docstrings of the standard library: real prose and code, offline."""
    parts = []
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)
