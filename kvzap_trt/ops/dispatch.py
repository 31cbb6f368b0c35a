"""The one place that chooses an implementation of the cache ops for a device.

Every op exists as a PyTorch reference (this package) with the signature and layout of its CUDA
kernel. The references run on any device, CPU included, and are the test oracle. On CUDA
tensors the kernels of plugins/ (`cuda_kernels`, torch.ops.kvzap_trt.*) are chosen; on CPU
tensors the CPU fast path (`cpu_fast`: batched over sequences, PyTorch's fused attention);
surrogate scoring is a GEMM and stays on PyTorch everywhere. Callers never import an
implementation directly. The contract all three keep (`CacheOps`) and the per-step plan the
executor hands them (`StepPlan`) are in interface.py.

$KVZAP_TRT_OPS: `auto` (default: kernels on CUDA, falling back to the reference with a warning
when they cannot be built; the fast path on CPU), `cuda` (kernels or an error on CUDA; the fast
path on CPU), `reference` (always the reference).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from types import SimpleNamespace

import torch

from kvzap_trt.errors import KvzapError
from kvzap_trt.ops import cpu_fast, cuda_kernels
from kvzap_trt.ops.evict_append import evict_append
from kvzap_trt.ops.interface import CacheOps
from kvzap_trt.ops.paged_attention import paged_attention
from kvzap_trt.ops.surrogate_score import surrogate_score

# deferred_errors(device): a context around a forward step; the reference raises at once, the
# kernels' error flag is checked once when it closes.
REFERENCE = SimpleNamespace(
    name="reference", surrogate_score=surrogate_score, evict_append=evict_append, paged_attention=paged_attention,
    deferred_errors=lambda device: contextlib.nullcontext(),
)
CPU = SimpleNamespace(
    name="cpu", surrogate_score=surrogate_score, evict_append=cpu_fast.evict_append,
    paged_attention=cpu_fast.paged_attention,
    deferred_errors=lambda device: contextlib.nullcontext(),
)
CUDA = SimpleNamespace(
    name="cuda", surrogate_score=surrogate_score, evict_append=cuda_kernels.evict_append,
    paged_attention=cuda_kernels.paged_attention, deferred_errors=cuda_kernels.deferred_errors,
)
CHOICES = ("auto", "cuda", "reference")


def ops(device: torch.device | str) -> CacheOps:
    """Implementation for tensors on `device`."""
    choice = os.environ.get("KVZAP_TRT_OPS", "auto")
    if choice not in CHOICES:
        raise KvzapError(f"KVZAP_TRT_OPS={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "reference":
        return REFERENCE
    if torch.device(device).type != "cuda":
        return CPU
    return _cuda_ops(choice)


@functools.cache  # one build attempt, one warning per process
def _cuda_ops(choice: str) -> CacheOps:
    try:
        cuda_kernels.load()
    except Exception as e:  # a compiler or CUDA error is as fatal to `cuda` as a KvzapError
        if choice == "cuda":
            raise KvzapError(f"KVZAP_TRT_OPS=cuda but the kernels cannot be loaded: {e}") from e
        warnings.warn(f"kvzap-trt CUDA kernels unavailable, using the PyTorch reference: {e}", stacklevel=3)
        return REFERENCE
    return CUDA
