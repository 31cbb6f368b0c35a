"""The one place that chooses an implementation of the cache ops for a device.

Every op exists as a PyTorch reference (this package) with the signature and layout of its CUDA
kernel. The references run on any device, CPU included, and are the test oracle; CUDA kernels
(`torch.ops.kvzap_trt.*`, built from plugins/) will be chosen here for CUDA tensors once they
exist. Callers never import an implementation directly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvzap_trt.ops.evict_append import evict_append
from kvzap_trt.ops.paged_attention import paged_attention
from kvzap_trt.ops.surrogate_score import surrogate_score

REFERENCE = SimpleNamespace(
    name="reference", surrogate_score=surrogate_score, evict_append=evict_append, paged_attention=paged_attention
)


def ops(device: torch.device | str) -> SimpleNamespace:
    """Implementation for tensors on `device`. Today: the reference everywhere."""
    return REFERENCE
