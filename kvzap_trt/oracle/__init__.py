"""Oracles for what a model needs of its KV cache (KVzip+), the targets KVzap's surrogates learn.

Two definitions of the same idea, chosen by name (`train --oracle`, `score --oracle-variant`):
- "press": kvpress's KVzipPress (kvzip.py), the project's default and what its tests pin to
  kvpress to 1e-4;
- "kvzap-data": NVIDIA's training collector, kvpress `kvzap/data.py` (repeat_once.py), the
  targets the released nvidia/KVzap-* surrogates were fit to.
Each is `scorer(model, tokenizer, context_ids, hidden=None) -> [L, Hkv, T]` in linear space.
"""

from __future__ import annotations

from typing import Callable

from kvzap_trt.errors import KvzapError

ORACLES = ("press", "kvzap-data")


def oracle_scorer(name: str) -> Callable:
    """The scoring function of oracle `name` (one of ORACLES)."""
    if name == "press":
        from kvzap_trt.oracle.kvzip import kvzip_plus_scores

        return kvzip_plus_scores
    if name == "kvzap-data":
        from kvzap_trt.oracle.repeat_once import repeat_once_scores

        return repeat_once_scores
    raise KvzapError(f"unknown oracle {name!r}; choose one of {', '.join(ORACLES)}")
