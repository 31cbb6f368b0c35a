"""evict_append (reference) against the naive model of KVzap eviction, chunk by chunk."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_trt.errors import CacheFullError
from tests.cache_sim import make_cache, naive_kept, random_seq, write_chunk

# window, block size, per sequence the chunk sizes written step by step (prefill, then decode 1s)
SCHEDULES = [
    (4, 1, [[577, 1, 1, 1]]),                 # long prefill, page size 1
    (4, 16, [[577, 1, 1, 1]]),
    (4, 64, [[577, 1, 1, 1]]),
    (32, 16, [[17] + [1] * 40]),               # prompt shorter than the window: decode evicts first
    (0, 16, [[9, 1, 1]]),                      # no window: decided in the step of writing
    (8, 4, [[50, 50, 1, 30, 1]]),              # chunked prefill
    (8, 4, [[1] * 25]),                        # decode only
    (6, 16, [[40, 1, 1, 1], [3, 1, 1, 1], [100, 1, 1, 1]]),  # a batch of uneven sequences
    (6, 16, [[40, 0, 1, 1], [3, 1, 0, 1]]),    # a sequence idle in some steps
]


def check_cache(cache, seqs, tau):
    spec = cache.spec
    for s in seqs:
        want = naive_kept(s.scores, s.written, spec.window, tau)
        assert cache.kept_positions(s.slot)[0] == want
        in_window = min(s.written, spec.window)
        for h, positions in enumerate(want):
            n = int(cache.kept_len[0, s.slot, h])
            assert n == len(positions) - in_window
            blocks = cache.block_table[0, s.slot, h, : math.ceil(n / spec.block_size)].long()
            pos = cache.pos_pool[blocks].reshape(-1)[:n].long()
            assert torch.equal(cache.k_pool[blocks].reshape(-1, spec.head_dim)[:n], s.k[pos, h])
            assert torch.equal(cache.v_pool[blocks].reshape(-1, spec.head_dim)[:n], s.v[pos, h])
            window = torch.arange(s.written - in_window, s.written)
            assert torch.equal(cache.ring_k[0, s.slot, h, window % max(spec.window, 1)], s.k[window, h])
            assert torch.equal(cache.ring_score[0, s.slot, h, window % max(spec.window, 1)], s.scores[window, h])
            # Exactly the blocks the kept tokens need, no more.
            assert int((cache.block_table[0, s.slot, h] >= 0).sum()) == math.ceil(n / spec.block_size)
    used = sum(cache.blocks_held(s.slot) for s in seqs)
    assert cache.allocator.num_used == used


@pytest.mark.parametrize("window,block_size,chunks", SCHEDULES)
def test_evict_append_matches_naive_model(window, block_size, chunks):
    tau = 0.3
    cache = make_cache(H=3, W=window, bs=block_size, seed=window + block_size)
    g = torch.Generator().manual_seed(len(chunks))
    seqs = [random_seq(cache, sum(c), g, dead_head=1 if i == 0 else None) for i, c in enumerate(chunks)]
    for step in range(max(len(c) for c in chunks)):
        active = [(s, c[step]) for s, c in zip(seqs, chunks) if step < len(c)]
        write_chunk(cache, [s for s, _ in active], [n for _, n in active], tau)
        check_cache(cache, seqs, tau)
    for s in seqs:
        cache.release(s.slot)
    assert cache.allocator.num_free == cache.spec.num_blocks


def test_pool_exhaustion_is_a_clear_error():
    cache = make_cache(H=2, W=2, bs=4, num_blocks=3)
    seq = random_seq(cache, 64, torch.Generator().manual_seed(0))
    seq.scores.fill_(1.0)  # keep everything: 62 tokens per head need 16 blocks each
    with pytest.raises(CacheFullError, match="exhausted"):
        write_chunk(cache, [seq], [64], tau=0.0)
