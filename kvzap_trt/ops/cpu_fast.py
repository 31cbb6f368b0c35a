"""The CPU fast path of the cache ops: the references' signatures, batched over sequences.

The reference (paged_attention.py) is the oracle: per sequence, token-level gathers, keys
concatenated, an explicit fp32 softmax over query chunks. Here:
  - fresh prompts: PyTorch's fused causal attention (fresh_prompts.py);
  - every sequence with one new token (decode) in one batched call: whole kept pages gathered
    block by block (`index_select` of [bs, D] rows, not token by token), logits against the
    pages, the window ring and the new token computed apart and softmaxed together (only logits
    are concatenated), a per-(sequence, kv head) mask for the ragged kept lengths;
  - chunked prefill over a cache (several new tokens, ctx > 0): the same, one sequence at a time,
    causal among its new tokens.
Decisions do not depend on it (eviction reads scores, not attention), but the hidden states it
feeds forward differ from the reference's by rounding only; tests compare it with the reference.

Eviction: sequences with one new token (decode) are evicted in one batched call (at most one
leaver per head: the ring slot the new token takes); longer chunks go to the reference, which is
vectorised over the chunk's tokens and heads already. Decisions, order and pool usage equal the
reference's; block ids may differ (blocks are popped for all sequences at once).
"""

from __future__ import annotations

import torch

from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.errors import CacheFullError
from kvzap_trt.ops import evict_append as reference
from kvzap_trt.ops.fresh_prompts import attend_routing_fresh_prompts


def paged_attention(
    q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, block_table, kept_len, ring_k, ring_v,
    scale: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """-> [N, Hq, D]; arguments and shapes as kvzap_trt.ops.paged_attention.paged_attention."""
    out = torch.empty_like(q) if out is None else out
    cache = (k_pool, v_pool, block_table, kept_len, ring_k, ring_v)

    def attend_cached(q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, out):
        out = torch.empty_like(q) if out is None else out
        cu, ctx = cu_seqlens.tolist(), ctx_lens.tolist()
        lens = [b - a for a, b in zip(cu, cu[1:])]
        decode = [b for b, n in enumerate(lens) if n == 1]
        if decode:
            rows = torch.tensor([cu[b] for b in decode])
            out[rows] = attend_group(q[rows], k_new[rows], v_new[rows], seq_slots[decode], [ctx[b] for b in decode],
                                     1, cache, scale)
        for b, n in enumerate(lens):
            if n > 1:
                rows = slice(cu[b], cu[b + 1])
                out[rows] = attend_group(q[rows], k_new[rows], v_new[rows], seq_slots[b : b + 1], [ctx[b]], n, cache,
                                         scale)
        return out

    return attend_routing_fresh_prompts(q, k_new, v_new, cu_seqlens.tolist(), ctx_lens.tolist(), seq_slots, scale, out,
                                        attend_cached)


def attend_group(q, k_new, v_new, slots: torch.Tensor, ctx: list[int], T: int, cache, scale: float) -> torch.Tensor:
    """n sequences with T new tokens each, packed sequence by sequence.

    q: [n*T, Hq, D]  k_new, v_new: [n*T, Hkv, D]  slots: [n]  ctx: n ints  -> [n*T, Hq, D]

    Logits of the three key sources (kept pages, ring, new tokens) are computed separately and
    softmaxed together: only the logits are concatenated, never the keys or values. In float32
    whatever the cache's dtype (as the reference), rounded once to q's dtype.
    """
    k_pool, v_pool, block_table, kept_len, ring_k, ring_v = cache
    n, (Hq, D), H, W, bs = len(ctx), q.shape[1:], k_new.shape[1], ring_k.shape[2], k_pool.shape[1]
    G = Hq // H
    slots = slots.long()
    kept = kept_len[slots].long()  # [n, H]
    blocks = -(-int(kept.max()) // bs) if kept.numel() else 0
    ids = block_table[slots, :, :blocks].long().clamp(min=0).reshape(-1)  # [n*H*blocks]
    page_k = k_pool.index_select(0, ids).view(n, H, blocks * bs, D).float()
    page_v = v_pool.index_select(0, ids).view(n, H, blocks * bs, D).float()
    ring_k, ring_v = ring_k[slots].float(), ring_v[slots].float()  # [n, H, W, D]
    new_k, new_v = (t.view(n, T, H, D).transpose(1, 2).float() for t in (k_new, v_new))  # [n, H, T, D]
    qs = q.view(n, T, H, G, D).permute(0, 2, 3, 1, 4).reshape(n, H, G * T, D).float() * scale  # rows (g, t)

    page_logits = (qs @ page_k.transpose(2, 3)).masked_fill_(
        (torch.arange(blocks * bs) >= kept[:, :, None])[:, :, None], float("-inf"))  # [n, H, G*T, P]
    ring_logits = (qs @ ring_k.transpose(2, 3)).masked_fill_(
        (torch.arange(W) >= torch.tensor(ctx)[:, None])[:, None, None], float("-inf"))  # [n, H, G*T, W]
    later = torch.ones(T, T, dtype=torch.bool).triu(1).repeat(G, 1)  # [G*T, T]: key after the row's token
    new_logits = (qs @ new_k.transpose(2, 3)).masked_fill_(later, float("-inf"))  # [n, H, G*T, T]
    probs = torch.cat([page_logits, ring_logits, new_logits], 3).softmax(-1)
    P = blocks * bs
    o = probs[..., :P] @ page_v + probs[..., P : P + W] @ ring_v + probs[..., P + W :] @ new_v  # [n, H, G*T, D]
    return o.view(n, H, G, T, D).permute(0, 3, 1, 2, 4).reshape(n * T, Hq, D).to(q.dtype)


def evict_append(
    k_new, v_new, scores, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, pos_pool, block_table, kept_len,
    ring_k, ring_v, ring_score, free_stack, num_free, threshold: float,
) -> None:
    """In place; arguments and shapes as kvzap_trt.ops.evict_append.evict_append."""
    cu, ctx = cu_seqlens.tolist(), ctx_lens.tolist()
    lens = [b - a for a, b in zip(cu, cu[1:])]
    cache = (k_pool, v_pool, pos_pool, block_table, kept_len, ring_k, ring_v, ring_score, free_stack, num_free)
    for b, n in enumerate(lens):
        if n > 1:
            rows = slice(cu[b], cu[b + 1])
            reference.evict_append(k_new[rows], v_new[rows], scores[rows], torch.tensor([0, n]), seq_slots[b : b + 1],
                                   ctx_lens[b : b + 1], *cache, threshold)
    decode = [b for b, n in enumerate(lens) if n == 1]
    if decode:
        rows = torch.tensor([cu[b] for b in decode])
        evict_decode(k_new[rows], v_new[rows], scores[rows], seq_slots[decode].long(),
                     torch.tensor([ctx[b] for b in decode]), cache, threshold)


def evict_decode(k_new, v_new, scores, slots: torch.Tensor, ctx: torch.Tensor, cache, threshold: float) -> None:
    """One new token for each of n sequences (distinct slots).

    k_new, v_new: [n, Hkv, D]  scores: [n, Hkv]  slots, ctx: [n]
    With c tokens written, position c - W leaves the window (when c >= W) from ring slot c % W,
    which the new token then takes; with W = 0 the new token itself leaves.
    """
    k_pool, v_pool, pos_pool, block_table, kept_len, ring_k, ring_v, ring_score, free_stack, num_free = cache
    W, bs, M = ring_k.shape[2], k_pool.shape[1], block_table.shape[2]
    if W:
        slot = ctx % W  # [n]
        leaving = ctx >= W
        leave_k, leave_v = ring_k[slots, :, slot], ring_v[slots, :, slot]  # [n, H, D]
        leave_score, leave_pos = ring_score[slots, :, slot], ctx - W  # [n, H], [n]
    else:
        leaving = torch.ones_like(ctx, dtype=torch.bool)
        leave_k, leave_v, leave_score, leave_pos = k_new, v_new, scores, ctx
    keep = (leave_score >= threshold) & leaving[:, None]  # [n, H]
    kept = kept_len[slots].long()  # [n, H]
    if int((kept + keep).max()) > M * bs:
        raise CacheFullError(f"a head needs {M + 1} blocks, block table holds {M}")
    fresh_page = keep & (kept % bs == 0)  # [n, H]: the kept token opens a new page
    total = int(fresh_page.sum())
    if total:
        seq, head = fresh_page.nonzero(as_tuple=True)
        block_table[slots[seq], head, kept[seq, head] // bs] = pop_blocks(free_stack, num_free, total)
    seq, head = keep.nonzero(as_tuple=True)
    dst = kept[seq, head]
    blk = block_table[slots[seq], head, dst // bs].long()
    k_pool[blk, dst % bs] = leave_k[seq, head]
    v_pool[blk, dst % bs] = leave_v[seq, head]
    pos_pool[blk, dst % bs] = leave_pos[seq].to(pos_pool.dtype)
    kept_len[slots] = (kept + keep).to(kept_len.dtype)
    if W:  # after the leavers were read: the new token takes their slot
        ring_k[slots, :, slot] = k_new
        ring_v[slots, :, slot] = v_new
        ring_score[slots, :, slot] = scores.to(ring_score.dtype)
