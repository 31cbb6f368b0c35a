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

from kvzap_trt.ops.interface import StepPlan

# attend_rest(q, k_new, v_new, plan, out) -> out [n, Hq, D] for the packed rows of the sequences
# routed to it, `plan` their StepPlan; out is a buffer to write into, or None.
AttendRest = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, StepPlan, torch.Tensor | None], torch.Tensor]
# attend_chunk(q, k_new, v_new, slot, ctx) -> [T, Hq, D] for one sequence's T new tokens.
AttendChunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]  k, v: [T, Hkv, D] of one sequence -> [T, Hq, D], causal, GQA."""
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, T, D]
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def attend_routing_fresh_prompts(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, plan: StepPlan, scale: float, out: torch.Tensor,
    attend_rest: AttendRest, attend_chunk: AttendChunk | None = None,
) -> torch.Tensor:
    """Fill `out` [N, Hq, D]: fresh prompts by causal self-attention, chunks over a cache by
    `attend_chunk` (if given), the other sequences through `attend_rest` as one packed sub-batch
    (the step's plan itself when nothing was routed elsewhere). The routing is the plan's
    (`StepPlan.routing`), made once per step."""
    route = plan.routing(chunks=attend_chunk is not None)
    for start, end in route.fresh:
        out[start:end] = causal_self_attention(q[start:end], k_new[start:end], v_new[start:end], scale)
    for start, end, slot, ctx in route.chunks:
        out[start:end] = attend_chunk(q[start:end], k_new[start:end], v_new[start:end], slot, ctx)
    if route.rest is None:
        return out
    if route.rest_rows is None:
        return attend_rest(q, k_new, v_new, route.rest, out)
    rows = route.rest_rows
    out[rows] = attend_rest(q[rows], k_new[rows], v_new[rows], route.rest, None)
    return out
