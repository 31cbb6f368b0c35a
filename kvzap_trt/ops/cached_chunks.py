"""Chunked prefill over a cache: several new tokens of a sequence that already has a cache.

Such a chunk's rows attend to the sequence's kept pages and window, and causally to each other.
The engine makes them when it prefills a prompt in chunks (`max_num_tokens`; its first chunk,
ctx = 0, takes the fused causal path of fresh_prompts.py). The row-wise decode kernel would
re-read the whole cache once per row (T times); a tiled prefill kernel over ragged per-head
pages is the real fix on a GPU (not written: no GPU has measured either). They take this path: gather the sequence's cached K/V once (its kept pages, padded to the longest head, and its
window) and run PyTorch's fused scaled_dot_product_attention with a boolean mask for the ragged
heads and the causal new tokens (the memory-efficient kernel on GPUs, the fused kernel on CPUs).
Computed in float32 whatever the cache's dtype, rounded once to q's dtype, as the reference.
Both fast paths (CPU and CUDA) route chunks here; the reference does not use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvzap_trt.ops.paged_attention import gather_pages


def cached_chunk_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slot: int, ctx: int, k_pool: torch.Tensor,
    v_pool: torch.Tensor, block_table: torch.Tensor, kept_len: torch.Tensor, ring_table: torch.Tensor, window: int,
    scale: float,
) -> torch.Tensor:
    """One sequence (cache slot `slot`, `ctx` tokens written) and its T new tokens.

    q: [T, Hq, D]  k_new, v_new: [T, Hkv, D]  cache views as paged_attention's
    (block_table [S, Hkv, M], kept_len [S, Hkv], ring_table [S, Hkv, R])  -> [T, Hq, D]
    """
    T, Hq, D = q.shape
    H = k_new.shape[1]
    G = Hq // H
    page_k, page_v, page_valid = gather_pages(k_pool, v_pool, block_table[slot], kept_len[slot])  # [H, P, D], [H, P]
    r = min(ctx, window)
    ring_k, ring_v, _ = gather_pages(k_pool, v_pool, ring_table[slot], kept_len.new_full((H,), r))  # [H, r, D]
    k = torch.cat([page_k, ring_k, k_new.transpose(0, 1)], 1).float()  # [H, K, D]
    v = torch.cat([page_v, ring_v, v_new.transpose(0, 1)], 1).float()
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [T, T]
    cached = torch.cat([page_valid, page_valid.new_ones(H, r)], 1)  # [H, P + r]
    mask = torch.cat([cached[:, None, :].expand(H, T, -1), causal.expand(H, T, T)], 2)  # [H, T, K]
    # Query head i reads kv head i // G: expand keys, values and mask over the group.
    k, v, mask = (t.repeat_interleave(G, 0) for t in (k, v, mask))  # [Hq, ...]
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float()[None], k[None], v[None], attn_mask=mask[None],
                                         scale=scale)  # [1, Hq, T, D]
    return out[0].transpose(0, 1).to(q.dtype)
