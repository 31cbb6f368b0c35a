"""Score-threshold eviction into the per-head paged cache, PyTorch reference.

One call writes a chunk of T_b new tokens per sequence (prefill: the prompt; decode: 1) of one
layer. For sequence b with c_b tokens already written, the stream is the window (positions
[max(0, c-W), c)) followed by the new tokens [c, c+T). Afterwards the window holds the last W
positions [max(0, c+T-W), c+T); every position that leaves it is appended to its head's kept
pages if its score >= threshold, and forgotten otherwise. Kept pages are append-only; new blocks
are popped from the free stack. Called after the layer's attention, as kvpress evicts after it.

The window lives in pool blocks too (its K, V, position and score, like every stored token):
window slot p % W is column (p % W) // bs of the head's ring_table row, offset (p % W) % bs. A
head with c tokens written holds ceil(min(c, W) / bs) window pages; the call pops the ones the
window newly reaches, in the same pop as the kept pages' (kept pages' ids first).
"""

from __future__ import annotations

import torch

from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.cache.paged_cache import window_pages
from kvzap_trt.errors import CacheFullError


def window_rows(ring_table: torch.Tensor, positions: torch.Tensor, window: int, block_size: int):
    """Pool rows of window positions of one sequence: ring_table [Hkv, R], positions [n]
    -> (block ids [Hkv, n] long, offsets [n] long)."""
    slot = positions % max(window, 1)
    return ring_table[:, slot // block_size].long(), slot % block_size


def evict_append(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seq_slots: torch.Tensor,
    ctx_lens: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    pos_pool: torch.Tensor,
    score_pool: torch.Tensor,
    block_table: torch.Tensor,
    kept_len: torch.Tensor,
    ring_table: torch.Tensor,
    free_stack: torch.Tensor,
    num_free: torch.Tensor,
    window: int,
    threshold: float,
    *,
    plan: object = None,
) -> None:
    """In place. plan: ignored (ops/interface.py: the oracle derives everything per call).

    k_new, v_new: [N, Hkv, D]   scores: [N, Hkv] float32   (N = sum of T_b, packed)
    cu_seqlens: [B+1]  seq_slots: [B]  ctx_lens: [B]  (host-readable ints)
    k_pool, v_pool: [num_blocks, bs, D]  pos_pool: [num_blocks, bs] int32  score_pool: [num_blocks, bs] float32
    block_table: [S, Hkv, M] int32  kept_len: [S, Hkv] int32  ring_table: [S, Hkv, R] int32 (R = ceil(W / bs))
    free_stack: [num_blocks] int32  num_free: [1] int32
    """
    W, bs, M = window, k_pool.shape[1], block_table.shape[2]
    H = k_new.shape[1]
    dev = k_new.device
    heads = torch.arange(H, device=dev)
    for b, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        s, c, T = int(seq_slots[b]), int(ctx_lens[b]), end - start
        if T == 0:
            continue
        # Positions leaving the window: [lo, hi); the first come from the window, the rest are new.
        lo, hi = max(0, c - W), max(0, c + T - W)
        from_ring = torch.arange(lo, min(c, hi), device=dev)
        from_new = torch.arange(c, max(c, hi), device=dev)
        leave_pos = torch.cat([from_ring, from_new])  # [n]
        new_rows = start + from_new - c
        rblk, roff = window_rows(ring_table[s], from_ring, W, bs)  # [H, r], [r]
        leave_k = torch.cat([k_pool[rblk, roff].transpose(0, 1), k_new[new_rows]])  # [n, H, D]
        leave_v = torch.cat([v_pool[rblk, roff].transpose(0, 1), v_new[new_rows]])
        leave_score = torch.cat([score_pool[rblk, roff].T, scores[new_rows].to(score_pool.dtype)])  # [n, H]

        keep = leave_score >= threshold  # [n, H]
        old_len = kept_len[s].long()  # [H]
        new_len = old_len + keep.sum(0)
        old_blocks, new_blocks = -(-old_len // bs), -(-new_len // bs)
        if leave_pos.numel() and int(new_blocks.max()) > M:
            raise CacheFullError(f"a head needs {int(new_blocks.max())} blocks, block table holds {M}")
        need = new_blocks - old_blocks  # [H]
        ring_lo, ring_hi = window_pages(c, W, bs), window_pages(c + T, W, bs)  # window pages [ring_lo, ring_hi) are new
        total = int(need.sum()) + H * (ring_hi - ring_lo)
        if total:
            ids = pop_blocks(free_stack, num_free, total)
            n_kept = int(need.sum())
            head_of = torch.repeat_interleave(heads, need)
            first = torch.cumsum(need, 0) - need  # [H] offset of each head's ids
            col = old_blocks[head_of] + torch.arange(n_kept, device=dev) - first[head_of]
            block_table[s, head_of, col] = ids[:n_kept]
            ring_table[s, :, ring_lo:ring_hi] = ids[n_kept:].view(H, ring_hi - ring_lo)
        if leave_pos.numel():
            # Destination slot of each kept (token, head): old_len + rank among the head's kept.
            tok, head = keep.nonzero(as_tuple=True)
            dst = old_len[head] + (torch.cumsum(keep.long(), 0) - 1)[tok, head]
            blk = block_table[s, head, dst // bs].long()
            k_pool[blk, dst % bs] = leave_k[tok, head]
            v_pool[blk, dst % bs] = leave_v[tok, head]
            pos_pool[blk, dst % bs] = leave_pos[tok].to(pos_pool.dtype)
            score_pool[blk, dst % bs] = leave_score[tok, head]
            kept_len[s] = new_len.to(kept_len.dtype)

        # The new tokens that stay in the window take the slots of those that left.
        stay = torch.arange(max(c, c + T - W), c + T, device=dev)
        if stay.numel():
            blk, off = window_rows(ring_table[s], stay, W, bs)  # [H, n], [n]
            rows = start + stay - c
            k_pool[blk, off] = k_new[rows].transpose(0, 1)
            v_pool[blk, off] = v_new[rows].transpose(0, 1)
            pos_pool[blk, off] = stay.to(pos_pool.dtype)
            score_pool[blk, off] = scores[rows].T.to(score_pool.dtype)
