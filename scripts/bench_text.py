"""Long real English text for benchmarks, offline: the standard library's own documentation."""

from __future__ import annotations

from kvzap_trt.eval.haystack import stdlib_docs


def long_text() -> str:
    """Module and public-object docstrings of the standard library: real prose and code, offline."""
    return "\n\n".join(stdlib_docs())
