"""Read back every tensor a one-layer cache stores and compare it with the naive model of KVzap.

Kept pages (positions, K, V and scores in order), the window's pages (K, V, positions and scores
at each position's window slot), the block and ring tables (exactly the blocks the kept tokens
and the window need, -1 after them), kept_len, and the allocator: live block ids unique, none of
them in the free region, counts that add up. The expectations come
from `tests/cache_sim.naive_kept` and the sequences' own random streams, never from the ops.
"""

from __future__ import annotations

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from tests.cache_sim import SimSeq, naive_kept


def check_cache(cache: PagedKVCache, seqs: list[SimSeq], tau: float) -> None:
    """`seqs`: every live sequence of `cache` (layer 0), each with `written` tokens written."""
    spec = cache.spec
    bs, W, D = spec.block_size, spec.window, spec.head_dim
    pos_pool, k_pool, v_pool = cache.pos_pool.cpu(), cache.k_pool.cpu(), cache.v_pool.cpu()
    score_pool = cache.score_pool.cpu()
    table, kept_len = cache.block_table[0].cpu(), cache.kept_len[0].cpu()  # [S, H, M], [S, H]
    ring_table = cache.ring_table[0].cpu()  # [S, H, R]
    live: list[int] = []
    for s in seqs:
        assert cache.ctx_len[s.slot] == s.written
        in_window = min(s.written, W)
        window = torch.arange(s.written - in_window, s.written)  # positions in the ring
        want = naive_kept(s.scores, s.written, W, tau)
        assert cache.kept_positions(s.slot)[0] == want, s.slot  # what --positions reports
        for h, positions in enumerate(want):
            paged = torch.tensor(positions[: len(positions) - in_window], dtype=torch.long)
            n, blocks_needed = len(paged), -(-len(paged) // bs)
            assert int(kept_len[s.slot, h]) == n, (s.slot, h)
            row = table[s.slot, h]  # [M]
            assert bool((row[:blocks_needed] >= 0).all()) and bool((row[blocks_needed:] == -1).all()), row
            blocks = row[:blocks_needed].long()
            live += blocks.tolist()
            assert torch.equal(pos_pool[blocks].reshape(-1)[:n].long(), paged), (s.slot, h)
            assert torch.equal(k_pool[blocks].reshape(-1, D)[:n], s.k[paged, h]), (s.slot, h)
            assert torch.equal(v_pool[blocks].reshape(-1, D)[:n], s.v[paged, h]), (s.slot, h)
            assert torch.equal(score_pool[blocks].reshape(-1)[:n], s.scores[paged, h].float()), (s.slot, h)
            # The window: pages for slots [0, min(written, W)), then -1; position p at slot p % W.
            ring_row, ring_held = ring_table[s.slot, h], -(-in_window // bs)  # [R]
            assert bool((ring_row[:ring_held] >= 0).all()) and bool((ring_row[ring_held:] == -1).all()), ring_row
            live += ring_row[:ring_held].tolist()
            slots = window % max(W, 1)
            blk, off = ring_row[slots // bs].long(), slots % bs
            assert torch.equal(k_pool[blk, off], s.k[window, h]), (s.slot, h)
            assert torch.equal(v_pool[blk, off], s.v[window, h]), (s.slot, h)
            assert torch.equal(pos_pool[blk, off].long(), window), (s.slot, h)
            assert torch.equal(score_pool[blk, off], s.scores[window, h].float()), (s.slot, h)
    alloc = cache.allocator
    free = alloc.free_stack[: alloc.num_free].cpu().tolist()
    assert len(set(live)) == len(live), "a block is held by two heads"
    assert not set(live) & set(free), "a held block is also on the free stack"
    assert len(set(free)) == len(free), "a block is on the free stack twice"
    assert alloc.num_used == len(live)
