"""Drive the cache ops chunk by chunk on random data, beside an independent naive model of KVzap.

The naive model is a list of positions per head: after writing up to position e (exclusive), a
position p < e - W is present iff score[p] >= tau; positions >= e - W are in the window. It
shares no code with the ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.ops.dispatch import REFERENCE


def naive_kept(scores: torch.Tensor, written: int, window: int, tau: float) -> list[list[int]]:
    """scores: [T_total, H] -> per head, sorted positions present after `written` tokens."""
    H = scores.shape[1]
    return [[p for p in range(written) if p >= written - window or scores[p, h] >= tau] for h in range(H)]


@dataclass
class SimSeq:
    """One sequence's full random stream: K/V/scores for every position it will ever write."""

    k: torch.Tensor  # [T_total, H, D]
    v: torch.Tensor
    scores: torch.Tensor  # [T_total, H]
    slot: int
    written: int = 0


def make_cache(H=2, D=8, W=4, bs=4, num_blocks=4096, max_seqs=4, max_seq_len=2048, dtype=torch.float32, seed=0,
               device="cpu"):
    """A one-layer cache whose free stack is shuffled, so pages land in random pool order."""
    cache = PagedKVCache(CacheSpec(1, H, D, W, bs, num_blocks, max_seqs, max_seq_len, dtype), device)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).to(device)
    cache.allocator.free_stack.copy_(cache.allocator.free_stack[perm])
    return cache


def random_seq(cache: PagedKVCache, total: int, g: torch.Generator, dead_head: int | None = None) -> SimSeq:
    H, D = cache.spec.num_kv_heads, cache.spec.head_dim
    scores = torch.randn(total, H, generator=g)
    if dead_head is not None:
        scores[:, dead_head] = -10.0  # this head keeps nothing outside the window
    k = torch.randn(total, H, D, generator=g).to(cache.spec.dtype)
    v = torch.randn(total, H, D, generator=g).to(cache.spec.dtype)
    return SimSeq(k, v, scores, cache.add_sequence())


def chunk_args(cache: PagedKVCache, seqs: list[SimSeq], chunk: list[int]):
    """Packed new-token tensors (on the cache's device) and the shared call arguments (host ints)
    for writing `chunk[i]` tokens to seqs[i]."""
    cu = torch.tensor([0] + torch.tensor(chunk).cumsum(0).tolist(), dtype=torch.int32)
    rows = lambda t: torch.cat([getattr(s, t)[s.written : s.written + n] for s, n in zip(seqs, chunk)]).to(cache.device)  # noqa: E731
    slots = torch.tensor([s.slot for s in seqs], dtype=torch.int32)
    ctx = torch.tensor([s.written for s in seqs], dtype=torch.int32)
    return rows("k"), rows("v"), rows("scores"), cu, slots, ctx


def write_chunk(cache: PagedKVCache, seqs: list[SimSeq], chunk: list[int], tau: float, ops=REFERENCE) -> None:
    k, v, sc, cu, slots, ctx = chunk_args(cache, seqs, chunk)
    lc, a = cache.layer(0), cache.allocator
    ops.evict_append(k, v, sc, cu, slots, ctx, lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool, lc.block_table,
                     lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t, cache.spec.window, tau)
    for s, n in zip(seqs, chunk):
        s.written += n
        cache.ctx_len[s.slot] = s.written


def resized(t: torch.Tensor, dim: int, delta: int) -> torch.Tensor:
    """Zeros like `t` with size[dim] changed by `delta`: a shape mismatch for validation tests."""
    shape = list(t.shape)
    shape[dim] += delta
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` whose data pointer sits one element past an allocation's start
    (the caching allocator's blocks are 512-byte aligned): not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def mutation_ids(table: list[tuple]) -> list[str]:
    """pytest ids of a table of (argument, (dim, size change) or "misaligned", match) mutations."""
    return [f"{a}-{c if isinstance(c, str) else 'dim%d%+d' % c}" for a, c, _ in table]


def mutate(args: dict, argument: str, change) -> None:
    """args[argument] replaced by a misaligned copy, or one with a dimension resized (in place)."""
    args[argument] = misaligned(args[argument]) if change == "misaligned" else resized(args[argument], *change)


def decode_cache_for_validation(device: str = "cuda") -> tuple[PagedKVCache, list[SimSeq]]:
    """Two sequences with 10 tokens written and an 11th to feed, bf16, D = 64: decode rows over a
    context, the kernels' path (an empty cache is valid memory, so failures are the checks')."""
    cache = make_cache(H=2, D=64, W=4, bs=16, num_blocks=64, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(0)
    seqs = [random_seq(cache, 11, g) for _ in range(2)]
    for s in seqs:
        s.written = cache.ctx_len[s.slot] = 10
    return cache, seqs
