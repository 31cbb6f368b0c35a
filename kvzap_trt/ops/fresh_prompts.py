"""Rows of a packed batch routed by kind: fresh prompts, chunks over a cache, decode rows.

A sequence with nothing cached (ctx 0) and several new tokens attends only to its own tokens,
causally: `scaled_dot_product_attention(is_causal=True)` (flash on GPUs, the fused CPU kernel on
CPUs) does that better than any row-wise paged kernel. A sequence with a cache and several new
tokens (chunked prefill) goes to `attend_chunk` (cached_chunks.py) when the caller gives one.
The other rows (decode: one new token per sequence) go to the caller's cache kernel as one packed
sub-batch. The fast paths (CUDA and CPU) share this routing; the reference does not use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# attend_rest(q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, out) -> out [n, Hq, D] for the
# packed rows of the sequences routed to it (host-readable cu_seqlens, seq_slots, ctx_lens); out
# is a buffer to write into, or None.
AttendRest = Callable[..., torch.Tensor]
# attend_chunk(q, k_new, v_new, slot, ctx) -> [T, Hq, D] for one sequence's T new tokens.
AttendChunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]  k, v: [T, Hkv, D] of one sequence -> [T, Hq, D], causal, GQA."""
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def attend_routing_fresh_prompts(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, host_cu: list[int], host_ctx: list[int],
    seq_slots: torch.Tensor, scale: float, out: torch.Tensor, attend_rest: AttendRest,
    attend_chunk: AttendChunk | None = None,
) -> torch.Tensor:
    """Fill `out` [N, Hq, D]: fresh prompts by causal self-attention, chunks over a cache by
    `attend_chunk` (if given), the other sequences through `attend_rest` as one packed sub-batch
    (or the whole batch when nothing was routed elsewhere).

    host_cu: [B+1] and host_ctx: [B] as Python ints; seq_slots: [B] host tensor.
    """
    bounds = list(zip(host_cu[:-1], host_cu[1:], host_ctx))
    slots = seq_slots.tolist()
    routed = set()
    for b, (start, end, c) in enumerate(bounds):
        if end - start > 1 and c == 0:
            out[start:end] = causal_self_attention(q[start:end], k_new[start:end], v_new[start:end], scale)
        elif end - start > 1 and attend_chunk is not None:
            out[start:end] = attend_chunk(q[start:end], k_new[start:end], v_new[start:end], slots[b], c)
        else:
            continue
        routed.add(b)
    if len(routed) == len(bounds):
        return out
    if not routed:
        return attend_rest(q, k_new, v_new, torch.tensor(host_cu), seq_slots, torch.tensor(host_ctx), out)
    rest = [b for b in range(len(bounds)) if b not in routed]
    rows = torch.cat([torch.arange(bounds[b][0], bounds[b][1]) for b in rest]).to(q.device)
    lens = torch.tensor([bounds[b][1] - bounds[b][0] for b in rest])
    sub_cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    idx = torch.tensor(rest)
    out[rows] = attend_rest(q[rows], k_new[rows], v_new[rows], sub_cu, seq_slots[idx], torch.tensor(host_ctx)[idx], None)
    return out
