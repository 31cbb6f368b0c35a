"""Score-threshold eviction into the per-head paged cache, PyTorch reference.

One call writes a chunk of T_b new tokens per sequence (prefill: the prompt; decode: 1) of one
layer. For sequence b with c_b tokens already written, the stream is the window ring (positions
[max(0, c-W), c)) followed by the new tokens [c, c+T). Afterwards the ring holds the last W
positions [max(0, c+T-W), c+T); every position that leaves it is appended to its head's kept
pages if its score >= threshold, and forgotten otherwise. Kept pages are append-only; new blocks
are popped from the free stack. Called after the layer's attention, as kvpress evicts after it.
"""

from __future__ import annotations

import torch

from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.errors import CacheFullError


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
    block_table: torch.Tensor,
    kept_len: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_score: torch.Tensor,
    free_stack: torch.Tensor,
    num_free: torch.Tensor,
    threshold: float,
) -> None:
    """In place.

    k_new, v_new: [N, Hkv, D]   scores: [N, Hkv] float32   (N = sum of T_b, packed)
    cu_seqlens: [B+1]  seq_slots: [B]  ctx_lens: [B]  (host-readable ints)
    k_pool, v_pool: [num_blocks, bs, D]  pos_pool: [num_blocks, bs] int32
    block_table: [S, Hkv, M] int32  kept_len: [S, Hkv] int32
    ring_k, ring_v: [S, Hkv, W, D]  ring_score: [S, Hkv, W] float32
    free_stack: [num_blocks] int32  num_free: [1] int32
    """
    W, bs, M = ring_k.shape[2], k_pool.shape[1], block_table.shape[2]
    H = k_new.shape[1]
    dev = k_new.device
    heads = torch.arange(H, device=dev)
    for b, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        s, c, T = int(seq_slots[b]), int(ctx_lens[b]), end - start
        if T == 0:
            continue
        # Positions leaving the window: [lo, hi); the first come from the ring, the rest are new.
        lo, hi = max(0, c - W), max(0, c + T - W)
        from_ring = torch.arange(lo, min(c, hi), device=dev)
        from_new = torch.arange(c, max(c, hi), device=dev)
        leave_pos = torch.cat([from_ring, from_new])  # [n]
        ring_slots, new_rows = from_ring % max(W, 1), start + from_new - c  # from_ring is empty when W == 0
        leave_k = torch.cat([ring_k[s][:, ring_slots].transpose(0, 1), k_new[new_rows]])  # [n, H, D]
        leave_v = torch.cat([ring_v[s][:, ring_slots].transpose(0, 1), v_new[new_rows]])
        leave_score = torch.cat([ring_score[s][:, ring_slots].T, scores[new_rows]])  # [n, H]

        if leave_pos.numel():
            keep = leave_score >= threshold  # [n, H]
            old_len = kept_len[s].long()  # [H]
            new_len = old_len + keep.sum(0)
            old_blocks, new_blocks = -(-old_len // bs), -(-new_len // bs)
            if int(new_blocks.max()) > M:
                raise CacheFullError(f"a head needs {int(new_blocks.max())} blocks, block table holds {M}")
            need = new_blocks - old_blocks  # [H]
            total = int(need.sum())
            if total:
                ids = pop_blocks(free_stack, num_free, total)
                head_of = torch.repeat_interleave(heads, need)
                first = torch.cumsum(need, 0) - need  # [H] offset of each head's ids
                col = old_blocks[head_of] + torch.arange(total, device=dev) - first[head_of]
                block_table[s, head_of, col] = ids
            # Destination slot of each kept (token, head): old_len + rank among the head's kept.
            tok, head = keep.nonzero(as_tuple=True)
            dst = old_len[head] + (torch.cumsum(keep.long(), 0) - 1)[tok, head]
            blk = block_table[s, head, dst // bs].long()
            k_pool[blk, dst % bs] = leave_k[tok, head]
            v_pool[blk, dst % bs] = leave_v[tok, head]
            pos_pool[blk, dst % bs] = leave_pos[tok].to(pos_pool.dtype)
            kept_len[s] = new_len.to(kept_len.dtype)

        # The new tokens that stay in the window take the slots of those that left.
        stay = torch.arange(max(c, c + T - W), c + T, device=dev)
        if stay.numel():
            slots, rows = stay % W, start + stay - c
            ring_k[s][:, slots] = k_new[rows].transpose(0, 1)
            ring_v[s][:, slots] = v_new[rows].transpose(0, 1)
            ring_score[s][:, slots] = scores[rows].T.to(ring_score.dtype)
