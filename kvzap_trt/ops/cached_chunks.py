"""Chunked prefill over a cache: several new tokens of a sequence that already has a cache.

Such a chunk's rows attend to the sequence's kept pages and window, and causally to each other.
The engine makes them when it prefills a prompt in chunks (`max_num_tokens`; its first chunk,
ctx = 0, takes the fused causal path of fresh_prompts.py). The row-wise decode kernel would
re-read the whole cache once per row (T times); a tiled prefill kernel over ragged per-head pages
is the real fix on a GPU (not written: no GPU has measured either). Both fast paths (CPU and CUDA)
route chunks here instead; the reference does not use it. The sequence's cached K/V are gathered
once (its kept pages, padded to the longest head, and its window), then:
  - on CUDA, one call of PyTorch's fused scaled_dot_product_attention (the memory-efficient
    kernel) with a boolean mask for the ragged heads and the causal new tokens;
  - on the CPU, whose fused kernel runs 3-5x slower per key with a mask (at a 2048-token chunk the
    masked call was two thirds of the step), two unmasked parts merged by their log-sum-exp: per
    kv head, its query group over that head's own cached keys (exact lengths: no padding, no
    mask), and all heads over the chunk's own tokens with `is_causal`. Both come from PyTorch's
    CPU flash kernel, whose private entry point returns the log-sum-exp; where it is missing, the
    masked call serves.
Computed in float32 whatever the cache's dtype, rounded once to q's dtype, as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvzap_trt.ops.paged_attention import gather_pages

# PyTorch's CPU flash attention with its log-sum-exp: (out [B, H, T, D], lse [B, H, T]).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        kept = kept_len[slot].tolist()  # a host tensor here: no device read
        cached = [(torch.cat([page_k[h, :n], ring_k[h]]), torch.cat([page_v[h, :n], ring_v[h]])) for h, n in enumerate(kept)]
        return _split_attention(q, k_new, v_new, cached, scale)
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


def _split_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     cached: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """q: [T, Hq, D]  k_new, v_new: [T, Hkv, D]  cached: per kv head (keys, values) [L_h, D]
    -> [T, Hq, D]: softmax over each head's cached keys and the causal new tokens, in fp32."""
    T, Hq, D = q.shape
    H = k_new.shape[1]
    G = Hq // H
    qf = q.float().transpose(0, 1)[None]  # [1, Hq, T, D]
    kn, vn = (t.float().transpose(0, 1).repeat_interleave(G, 0)[None] for t in (k_new, v_new))  # [1, Hq, T, D]
    out_new, lse_new = _FLASH_CPU(qf, kn, vn, 0.0, True, scale=scale)  # [1, Hq, T, D], [1, Hq, T]
    out_old = torch.zeros_like(out_new)
    lse_old = torch.full_like(lse_new, float("-inf"))  # a head with nothing cached weighs 0
    for h, (k, v) in enumerate(cached):
        # Load-bearing: the CPU flash op dies with SIGFPE on zero keys (a head that keeps nothing
        # and has no window yet); that head's part stays empty (-inf: no weight in the merge).
        if k.shape[0]:
            heads = slice(h * G, (h + 1) * G)
            # Nothing causal here: the group's G x T query rows go as one row set against the
            # head's keys (no copy of the keys per query head).
            o, lse = _FLASH_CPU(qf[:, heads].reshape(1, 1, G * T, D), k.float()[None, None], v.float()[None, None],
                                0.0, False, scale=scale)  # [1, 1, G*T, D], [1, 1, G*T]
            out_old[:, heads], lse_old[:, heads] = o.view(1, G, T, D), lse.view(1, G, T)
    lse = torch.logaddexp(lse_old, lse_new)[..., None]  # [1, Hq, T, 1]
    out = out_old * (lse_old[..., None] - lse).exp() + out_new * (lse_new[..., None] - lse).exp()
    return out[0].transpose(0, 1).to(q.dtype)
