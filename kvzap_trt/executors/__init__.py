"""Executors: one packed forward pass of the model over the KVzap cache, behind one interface.

The engine (`runtime/engine.py`; its scheduler, `runtime/scheduler.py`, picks the work) builds a
`StepInputs`, calls `forward`, samples and keeps the host-side bookkeeping (context lengths,
kvpress decoding=False). An executor runs the
model's layers with their attention and eviction and leaves the cache tensors updated:
  - `TorchExecutor`: our PyTorch forward, ops from `ops.dispatch` (kernels, CPU fast path or the
    references);
  - `OnnxExecutor`: the graph of `kvzap-trt export` on ONNX Runtime (CPU), its plugin nodes bound
    to the PyTorch references: the CPU proof of what the TensorRT engine computes.
  - `TrtExecutor`: the TensorRT engine built from that graph (`kvzap-trt build --engine tensorrt`),
    the cache bound by address (`trt_executor.py`).
An executor knows nothing of requests or scheduling; the engine knows nothing of how the layers run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from kvzap_trt.cache.paged_cache import PagedKVCache

EXECUTORS = ("torch", "onnx", "tensorrt")


@dataclass
class StepInputs:
    """One packed forward pass: B sequences, N = the sum of their new tokens.

    tokens, positions: [N] long (cache device)   never_evict: [N] bool (cache device): rows whose
    scores are +inf   never_all: every row is never evicted (known on the host)
    cu_seqlens: [B+1]  seq_slots: [B]  ctx_lens: [B]  int32, host
    logits_at: [B] int (cache device): each sequence's last row
    max_kept: no head of these sequences holds more kept tokens when the step starts (None:
    unknown); the attention kernel sizes its splits from it (kept + window + new tokens), not from
    the uncompressed context
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    never_evict: torch.Tensor
    never_all: bool
    cu_seqlens: torch.Tensor
    seq_slots: torch.Tensor
    ctx_lens: torch.Tensor
    logits_at: torch.Tensor
    max_kept: int | None = None


class Executor(Protocol):
    name: str

    def forward(self, step: StepInputs, cache: "PagedKVCache") -> torch.Tensor:
        """Attend and evict every layer for `step`, updating `cache`'s tensors (not its host-side
        ctx_len) -> logits [B, vocab] float32 on the cache's device."""
