"""The CPU fast path of the cache ops: the references' signatures, batched over sequences.

The reference (paged_attention.py) is the oracle: per sequence, token-level gathers, keys
concatenated, an explicit fp32 softmax over query chunks. Here:
  - fresh prompts: PyTorch's fused causal attention (fresh_prompts.py);
  - every sequence with one new token (decode) in one batched call: whole kept and window pages
    gathered block by block (`index_select` of [bs, D] rows, not token by token), logits against
    the kept pages, the window and the new token computed apart and softmaxed together (only
    logits are concatenated), a per-(sequence, kv head) mask for the ragged kept lengths;
  - chunked prefill over a cache (several new tokens, ctx > 0): cached_chunks.py (the sequence's
    cache gathered once, fused attention with a mask).
Decisions do not depend on it (eviction reads scores, not attention), but the hidden states it
feeds forward differ from the reference's by rounding only; tests compare it with the reference.

Eviction: sequences with one new token (decode) are evicted in one batched call (at most one
leaver per head: the window slot the new token takes); longer chunks go to the reference, which is
vectorised over the chunk's tokens and heads already. Decisions, order and pool usage equal the
reference's; block ids may differ (blocks are popped for all sequences at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_trt.cache.allocator import pop_blocks
from kvzap_trt.cache.paged_cache import window_pages
from kvzap_trt.errors import CacheFullError
from kvzap_trt.ops import evict_append as reference
from kvzap_trt.ops.cached_chunks import cached_chunk_attention
from kvzap_trt.ops.fresh_prompts import attend_routing_fresh_prompts
from kvzap_trt.ops.interface import StepPlan


@dataclass(frozen=True)
class DecodeRows:
    """The sequences of a batch with one new token (decode), as every layer of a step uses them.

    rows: [n] long, their rows in the packing (None: every sequence has one, rows in order)
    slots: [n] long   ctx: [n] long: tokens written before this step
    """

    rows: torch.Tensor | None
    slots: torch.Tensor
    ctx: torch.Tensor

    @classmethod
    def of(cls, plan: StepPlan) -> "DecodeRows":
        decode = [b for b, n in enumerate(plan.lens) if n == 1]
        rows = None if len(decode) == len(plan.lens) else torch.tensor([plan.cu[b] for b in decode], dtype=torch.long)
        return cls(rows, torch.tensor([plan.slots[b] for b in decode], dtype=torch.long),
                   torch.tensor([plan.ctx[b] for b in decode], dtype=torch.long))

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """t's decode rows ([N, ...] -> [n, ...]; t itself when they are all its rows)."""
        return t if self.rows is None else t[self.rows]


def decode_rows(plan: StepPlan) -> DecodeRows:
    return plan.memo("cpu_decode_rows", lambda: DecodeRows.of(plan))


def paged_attention(
    q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, block_table, kept_len, ring_table,
    window: int, scale: float, max_kept: int | None = None, out: torch.Tensor | None = None, *,
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """-> [N, Hq, D]; arguments and shapes as kvzap_trt.ops.paged_attention.paged_attention (max_kept
    unused: the batched gather reads the kept lengths it needs anyway). plan: the step's
    (interface.py), or None."""
    plan = StepPlan.of(plan, cu_seqlens, seq_slots, ctx_lens, window, q.device, max_kept)
    out = torch.empty_like(q) if out is None else out
    cache = (k_pool, v_pool, block_table, kept_len, ring_table, window)

    def attend_decode(q, k_new, v_new, sub: StepPlan, out):
        """Decode rows only (chunks and fresh prompts were routed away); idle sequences have none."""
        out = torch.empty_like(q) if out is None else out
        dec = decode_rows(sub)
        if len(dec.slots):
            ring = sub.memo(("cpu_ring_masked", k_pool.shape[1]), lambda: ring_masked(dec.ctx, window, k_pool.shape[1]))
            o = attend_group(dec.take(q), dec.take(k_new), dec.take(v_new), dec.slots, ring, cache, scale)
            if dec.rows is None:
                out.copy_(o)
            else:
                out[dec.rows] = o
        return out

    def attend_chunk(q, k_new, v_new, slot: int, ctx: int) -> torch.Tensor:
        return cached_chunk_attention(q, k_new, v_new, slot, ctx, *cache, scale)

    return attend_routing_fresh_prompts(q, k_new, v_new, plan, scale, out, attend_decode, attend_chunk)


def ring_masked(ctx: torch.Tensor, window: int, block_size: int) -> torch.Tensor:
    """[n, 1, R * bs] bool: the window slots of each sequence not written yet, R = the window pages
    of the fullest window (ctx: [n] tokens written)."""
    R = window_pages(int(ctx.max()) if len(ctx) else 0, window, block_size)
    return (torch.arange(R * block_size) >= ctx.clamp(max=window)[:, None])[:, None]


def attend_group(q, k_new, v_new, slots: torch.Tensor, ring: torch.Tensor, cache, scale: float) -> torch.Tensor:
    """n sequences with one new token each (decode).

    q: [n, Hq, D]  k_new, v_new: [n, Hkv, D]  slots: [n] long  ring: [n, 1, R*bs] (`ring_masked`)
    -> [n, Hq, D]

    Each (sequence, head)'s kept pages and window pages are gathered in one index_select per pool
    (the window is pages of the same pool); their logits and the new token's are softmaxed
    together: only the logits are concatenated, never the keys or values. In float32 whatever the
    cache's dtype (as the reference), rounded once to q's dtype.
    """
    k_pool, v_pool, block_table, kept_len, ring_table, W = cache
    n, (Hq, D), H, bs = len(slots), q.shape[1:], k_new.shape[1], k_pool.shape[1]
    G, R = Hq // H, ring.shape[2] // bs
    kept = kept_len[slots].long()  # [n, H]
    blocks = -(-int(kept.max()) // bs)
    keys = (blocks + R) * bs
    ids = torch.cat([block_table[slots, :, :blocks], ring_table[slots, :, :R]], 2)  # [n, H, blocks + R] (-1: unheld)
    ids = ids.long().clamp_(min=0).view(-1)  # a -1 page is read as block 0 and masked
    k, v = (pool.index_select(0, ids).view(n, H, keys, D).float() for pool in (k_pool, v_pool))  # [n, H, keys, D]
    masked = torch.cat([torch.arange(blocks * bs) >= kept[:, :, None], ring.expand(n, H, R * bs)], 2)  # [n, H, keys]
    qs = q.view(n, H, G, D).float() * scale  # [n, H, G, D]
    logits = (qs @ k.transpose(2, 3)).masked_fill_(masked[:, :, None], float("-inf"))  # [n, H, G, keys]
    new_k, new_v = (t.view(n, H, 1, D).float() for t in (k_new, v_new))  # [n, H, 1, D]
    probs = torch.cat([logits, qs @ new_k.transpose(2, 3)], 3).softmax(-1)  # [n, H, G, keys + 1]
    o = probs[..., :keys] @ v + probs[..., keys:] * new_v  # [n, H, G, D]
    return o.reshape(n, Hq, D).to(q.dtype)


def evict_append(
    k_new, v_new, scores, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, pos_pool, score_pool, block_table,
    kept_len, ring_table, free_stack, num_free, window: int, threshold: float, *, plan: StepPlan | None = None,
) -> None:
    """In place; arguments and shapes as kvzap_trt.ops.evict_append.evict_append. plan: the
    step's (interface.py), or None."""
    plan = StepPlan.of(plan, cu_seqlens, seq_slots, ctx_lens, window, k_pool.device)
    cache = (k_pool, v_pool, pos_pool, score_pool, block_table, kept_len, ring_table, free_stack, num_free)
    for b, n in enumerate(plan.lens):
        if n > 1:
            rows = slice(plan.cu[b], plan.cu[b + 1])
            reference.evict_append(k_new[rows], v_new[rows], scores[rows], torch.tensor([0, n]), seq_slots[b : b + 1],
                                   ctx_lens[b : b + 1], *cache, window, threshold)
    dec = decode_rows(plan)
    if len(dec.slots):
        evict_decode(dec.take(k_new), dec.take(v_new), dec.take(scores), dec.slots, dec.ctx, cache, window, threshold)


def evict_decode(k_new, v_new, scores, slots: torch.Tensor, ctx: torch.Tensor, cache, W: int, threshold: float) -> None:
    """One new token for each of n sequences (distinct slots).

    k_new, v_new: [n, Hkv, D]  scores: [n, Hkv]  slots, ctx: [n]
    With c tokens written, position c - W leaves the window (when c >= W) from window slot c % W,
    which the new token then takes; with W = 0 the new token itself leaves. A head whose window
    reaches a new page (c < W, c % bs == 0) pops it, after the kept pages' blocks (the
    reference's order within a sequence).
    """
    k_pool, v_pool, pos_pool, score_pool, block_table, kept_len, ring_table, free_stack, num_free = cache
    bs, M = k_pool.shape[1], block_table.shape[2]
    H = k_new.shape[1]
    if W:
        slot = ctx % W  # [n]
        col, off = slot // bs, slot % bs
        ring_blk = ring_table[slots, :, col].long()  # [n, H] (-1 where the window has not reached this page)
        leaving = ctx >= W
        rows = ring_blk.clamp(min=0), off[:, None]
        leave_k, leave_v, leave_score = k_pool[rows], v_pool[rows], score_pool[rows]  # [n, H, D], [n, H]
        leave_pos = ctx - W
    else:
        leaving = torch.ones_like(ctx, dtype=torch.bool)
        leave_k, leave_v, leave_score, leave_pos = k_new, v_new, scores.to(score_pool.dtype), ctx
    keep = (leave_score >= threshold) & leaving[:, None]  # [n, H]
    kept = kept_len[slots].long()  # [n, H]
    if int((kept + keep).max()) > M * bs:
        raise CacheFullError(f"a head needs {M + 1} blocks, block table holds {M}")
    fresh_page = keep & (kept % bs == 0)  # [n, H]: the kept token opens a new page
    fresh_ring = (ctx < W) & (ctx % bs == 0) if W else torch.zeros_like(leaving)  # [n]: the window opens a page
    n_kept, n_ring = int(fresh_page.sum()), H * int(fresh_ring.sum())
    if n_kept + n_ring:
        ids = pop_blocks(free_stack, num_free, n_kept + n_ring)
        seq, head = fresh_page.nonzero(as_tuple=True)
        block_table[slots[seq], head, kept[seq, head] // bs] = ids[:n_kept]
        if n_ring:
            (opening,) = fresh_ring.nonzero(as_tuple=True)
            ring_table[slots[opening], :, col[opening]] = ids[n_kept:].view(-1, H)
            ring_blk = ring_table[slots, :, col].long()
    seq, head = keep.nonzero(as_tuple=True)
    dst = kept[seq, head]
    blk = block_table[slots[seq], head, dst // bs].long()
    k_pool[blk, dst % bs] = leave_k[seq, head]
    v_pool[blk, dst % bs] = leave_v[seq, head]
    pos_pool[blk, dst % bs] = leave_pos[seq].to(pos_pool.dtype)
    score_pool[blk, dst % bs] = leave_score[seq, head]
    kept_len[slots] = (kept + keep).to(kept_len.dtype)
    if W:  # after the leavers were read: the new token takes their slot
        rows = ring_blk, off[:, None]
        k_pool[rows] = k_new
        v_pool[rows] = v_new
        pos_pool[rows] = ctx[:, None].to(pos_pool.dtype)
        score_pool[rows] = scores.to(score_pool.dtype)
