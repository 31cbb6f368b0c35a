"""Attention over per-head variable-length pages + the window's pages + new tokens, PyTorch reference.

For sequence b (slot s, c_b tokens already written, T_b new tokens) and kv head h, the keys are
  - the head's kept pages: kept_len[s, h] tokens at block_table[s, h, :],
  - the window: slots [0, min(c_b, W)) of its pages ring_table[s, h, :] (position p lives in
    window slot p % W: column (p % W) // bs, offset (p % W) % bs),
  - the new tokens, causally among themselves.
All cached tokens are older than every new token, and keys carry RoPE already, so their order
does not matter. Query head i belongs to kv head i // (Hq / Hkv) (GQA). Prefill is T_b > 1 and
decode T_b = 1; one function serves both (chunked prefill too: c_b > 0 and T_b > 1).
Computed in float32, returned in q's dtype.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 1024  # query rows per softmax in the reference, to bound memory on long prompts


def gather_pages(
    k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor, kept_len: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense padded view of one sequence's kept pages.

    block_table: [Hkv, M]  kept_len: [Hkv]  -> k, v: [Hkv, Lmax, D], valid: [Hkv, Lmax] bool
    """
    bs = k_pool.shape[1]
    Lmax = int(kept_len.max()) if kept_len.numel() else 0
    j = torch.arange(Lmax, device=k_pool.device)
    valid = j[None, :] < kept_len[:, None].long()  # [H, Lmax]
    blk = block_table[:, j // bs].long().clamp(min=0)  # [H, Lmax]
    return k_pool[blk, j % bs], v_pool[blk, j % bs], valid


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_slots: torch.Tensor,
    ctx_lens: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    kept_len: torch.Tensor,
    ring_table: torch.Tensor,
    window: int,
    scale: float,
    max_kept: int | None = None,
    *,
    plan: object = None,
) -> torch.Tensor:
    """q: [N, Hq, D]  k_new, v_new: [N, Hkv, D]  (N = sum of T_b, packed)
    cu_seqlens: [B+1]  seq_slots: [B]  ctx_lens: [B]  (host-readable ints)
    k_pool, v_pool: [num_blocks, bs, D]  block_table: [S, Hkv, M]  kept_len: [S, Hkv]
    ring_table: [S, Hkv, R] (R = ceil(window / bs))
    max_kept: a bound on kept_len over the batch's sequences, if the caller knows one: the kernel
    sizes its work from it; the reference reads kept_len itself and does not need it
    plan: the step's plan (ops/interface.py), ignored: the oracle derives everything per call
    -> [N, Hq, D]
    """
    N, Hq, D = q.shape
    H = k_new.shape[1]
    G = Hq // H
    out = torch.empty_like(q)
    for b, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        s, c, T = int(seq_slots[b]), int(ctx_lens[b]), end - start
        if T == 0:
            continue
        pk, pv, pvalid = gather_pages(k_pool, v_pool, block_table[s], kept_len[s])
        r = min(c, window)
        rk, rv, _ = gather_pages(k_pool, v_pool, ring_table[s], kept_len.new_full((H,), r))  # window slots [0, r)
        k = torch.cat([pk, rk, k_new[start:end].transpose(0, 1)], 1).float()  # [H, K, D]
        v = torch.cat([pv, rv, v_new[start:end].transpose(0, 1)], 1).float()
        n_cached = pk.shape[1] + r
        cached_valid = torch.cat([pvalid, pvalid.new_ones(H, r)], 1)  # [H, n_cached]
        qs = q[start:end].view(T, H, G, D).permute(1, 2, 0, 3).float()  # [H, G, T, D]
        for t0 in range(0, T, QUERY_CHUNK):
            t1 = min(T, t0 + QUERY_CHUNK)
            logits = torch.einsum("hgtd,hkd->hgtk", qs[:, :, t0:t1], k) * scale  # [H, G, t, K]
            rows = torch.arange(t0, t1, device=q.device)
            causal = torch.arange(T, device=q.device)[None, :] <= rows[:, None]  # [t, T]
            mask = torch.cat([cached_valid[:, None, :].expand(H, t1 - t0, n_cached), causal.expand(H, -1, -1)], 2)
            logits = logits.masked_fill(~mask[:, None], float("-inf"))
            o = torch.einsum("hgtk,hkd->hgtd", logits.softmax(-1), v)  # [H, G, t, D]
            out[start + t0 : start + t1] = o.permute(2, 0, 1, 3).reshape(t1 - t0, Hq, D).to(q.dtype)
    return out
