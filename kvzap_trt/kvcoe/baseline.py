"""The baseline KV embeddings are compared with: mean-pooled final hidden states of the same model.

One dense forward of one text (no cache, no eviction: what a hidden-state method must compute or
store), the final hidden state taken after the model's last norm (what HF calls the last hidden
state), mean over tokens, L2-normalised, as the paper's hidden-state baseline does with
`pos_agg="mean"` (its MTEB script averages every layer's; we take the final one, as issue 17 asks).
"""

from __future__ import annotations

import torch

from kvzap_trt.models.transformer import Transformer
from kvzap_trt.ops.fresh_prompts import causal_self_attention


@torch.inference_mode()
def mean_final_hidden(model: Transformer, ids: list[int]) -> torch.Tensor:
    """ids: one text's tokens -> [hidden_size] float32 on the model's device, L2-normalised."""
    device = model.embed_tokens.weight.device
    scale = model.cfg.head_dim**-0.5
    captured: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
              lambda _layer, _h, q, k, v: causal_self_attention(q, k, v, scale))
    finally:
        hook.remove()
    (h,) = captured  # [T, hidden]
    return torch.nn.functional.normalize(h.float().mean(0), dim=0)
