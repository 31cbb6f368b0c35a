"""The CPU fast path of paged attention: the references' signature, PyTorch's fused attention.

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
"""

from __future__ import annotations

import torch

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
