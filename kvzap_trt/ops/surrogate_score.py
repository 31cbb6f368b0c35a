"""KVzap surrogate scoring, PyTorch reference.

The surrogate of one layer is a Linear (w1: [Hkv, d]) or Linear -> GELU(erf) -> Linear
(w1: [hidden, d], w2: [Hkv, hidden]). It reads the hidden state entering self_attn (after
input_layernorm) and returns one log-importance score per (token, kv head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def surrogate_score(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """hidden: [N, d]  w1: [H1, d]  b1: [H1]  w2: [Hkv, H1] | None  b2: [Hkv] | None  -> [N, Hkv] float32

    Computed in the hidden state's dtype, as kvpress casts the surrogate to it.
    """
    x = F.linear(hidden, w1.to(hidden.dtype), b1.to(hidden.dtype))
    if w2 is not None:
        x = F.linear(F.gelu(x), w2.to(hidden.dtype), b2.to(hidden.dtype))
    return x.float()
