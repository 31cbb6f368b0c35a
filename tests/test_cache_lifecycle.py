"""Allocator and cache through a lifetime: random interleavings of pop/push, and of
add_sequence / write / release over several sequences, checked after every operation against
an independent bookkeeping (a Python set of live ids; the naive model of tests/cache_sim.py)."""

from __future__ import annotations

import random

import pytest
import torch

from kvzap_trt.cache.allocator import BlockAllocator, pop_blocks
from kvzap_trt.errors import CacheFullError
from tests.cache_check import check_cache
from tests.cache_sim import SimSeq, make_cache, write_chunk


def check_allocator(a: BlockAllocator, live: set[int]) -> None:
    free = a.free_stack[: a.num_free].tolist()
    assert a.num_free == a.num_blocks - len(live) and a.num_used == len(live)
    assert sorted(free + sorted(live)) == list(range(a.num_blocks))  # every id exactly once


@pytest.mark.parametrize("seed", range(4))
def test_allocator_random_pops_and_pushes(seed):
    rng, a, live = random.Random(seed), BlockAllocator(64), set()
    for _ in range(300):
        if rng.random() < 0.55:
            n = rng.randint(0, 12)
            if n > a.num_free:
                with pytest.raises(CacheFullError, match=f"{n} blocks needed, {a.num_free} free"):
                    pop_blocks(a.free_stack, a.num_free_t, n)
            else:
                ids = pop_blocks(a.free_stack, a.num_free_t, n).tolist()
                assert len(ids) == n and len(set(ids)) == n and not set(ids) & live  # never handed out twice
                live |= set(ids)
        elif live:
            back = rng.sample(sorted(live), rng.randint(1, len(live)))
            a.push(torch.tensor(back, dtype=torch.int32))
            live -= set(back)
        check_allocator(a, live)


def test_a_count_below_zero_reads_as_none_free_and_pushes_count_from_zero():
    """The decode evict kernel's pop_one leaves the device count below zero, by one per head that
    found no id: that count means none free, for every reader (the kernel's own pops, the
    scheduler through num_free, push, the reference's pop_blocks)."""
    a = BlockAllocator(6)
    ids = pop_blocks(a.free_stack, a.num_free_t, 6)  # every id handed out
    a.num_free_t.fill_(-3)  # three heads of a launch found none
    assert a.num_free == 0 and a.num_used == 6
    with pytest.raises(CacheFullError, match="1 blocks needed, 0 free"):
        pop_blocks(a.free_stack, a.num_free_t, 1)
    assert pop_blocks(a.free_stack, a.num_free_t, 0).numel() == 0
    a.push(ids[:2])
    assert int(a.num_free_t) == 2 and a.free_stack[:2].tolist() == ids[:2].tolist()
    check_allocator(a, set(ids[2:].tolist()))


def test_pushing_more_than_the_pool_is_refused():
    a = BlockAllocator(4)
    ids = pop_blocks(a.free_stack, a.num_free_t, 2)
    a.push(ids)
    with pytest.raises(RuntimeError, match="overflow: 4 free \\+ 1 returned > 4"):
        a.push(torch.tensor([0], dtype=torch.int32))
    assert a.num_free == 4


def new_seq(cache, rng: random.Random, g: torch.Generator) -> SimSeq:
    """A sequence of random length whose scores sit on a grid with tau = 0 on it."""
    total, (H, D) = rng.randint(1, cache.spec.max_seq_len), (cache.spec.num_kv_heads, cache.spec.head_dim)
    scores = torch.randint(-2, 3, (total, H), generator=g) * 0.5
    k, v = (torch.randn(total, H, D, generator=g) for _ in range(2))
    return SimSeq(k, v, scores, cache.add_sequence())


@pytest.mark.parametrize("seed", range(3))
def test_cache_random_add_write_release(seed):
    rng, g, tau = random.Random(seed), torch.Generator().manual_seed(seed), 0.0
    cache = make_cache(H=2, D=4, W=3, bs=2, num_blocks=400, max_seqs=3, max_seq_len=48, seed=seed)
    live: list[SimSeq] = []
    released = 0
    for _ in range(120):
        op = rng.random()
        if op < 0.2 and cache.free_slots:
            live.append(new_seq(cache, rng, g))
        elif op < 0.35 and live:
            s = live.pop(rng.randrange(len(live)))
            before, held = cache.allocator.num_free, cache.blocks_held(s.slot)
            cache.release(s.slot)
            assert cache.allocator.num_free == before + held
            released += held > 0
        else:
            batch = [s for s in live if s.written < len(s.scores) and rng.random() < 0.7]
            if not batch:
                continue
            chunk = [min(rng.choice([1, 1, 2, 5, 17]), len(s.scores) - s.written) for s in batch]
            write_chunk(cache, batch, chunk, tau)
        check_cache(cache, live, tau)
    assert released > 3  # blocks really were reused mid-run
    for s in live:
        cache.release(s.slot)
    assert cache.allocator.num_free == 400
    assert sorted(cache.allocator.free_stack.tolist()) == list(range(400))
    assert sorted(cache.free_slots) == [0, 1, 2]


def test_pool_exhaustion_mid_run_takes_nothing_and_release_makes_room():
    tau, g = 0.0, torch.Generator().manual_seed(0)
    cache = make_cache(H=2, D=4, W=2, bs=2, num_blocks=14, max_seqs=2, max_seq_len=64)
    seqs = []
    for _ in range(2):
        k, v = torch.randn(40, 2, 4, generator=g), torch.randn(40, 2, 4, generator=g)
        seqs.append(SimSeq(k, v, torch.ones(40, 2), cache.add_sequence()))  # everything kept
    write_chunk(cache, [seqs[0]], [12], tau)  # per head 10 leavers (5 blocks) + a window page: 12 in all
    check_cache(cache, seqs, tau)
    with pytest.raises(CacheFullError, match="exhausted: 6 blocks needed, 2 free"):  # 2 x (2 kept + 1 window)
        write_chunk(cache, [seqs[1]], [6], tau)
    seqs[1].written = 0  # write_chunk raised before counting the chunk
    check_cache(cache, seqs, tau)  # the failed write took nothing and changed nothing
    cache.release(seqs[0].slot)
    write_chunk(cache, [seqs[1]], [6], tau)
    check_cache(cache, [seqs[1]], tau)


def test_block_table_full_is_a_clear_error():
    cache = make_cache(H=2, D=4, W=2, bs=4, num_blocks=100, max_seqs=1, max_seq_len=16)  # 4 blocks per head
    g = torch.Generator().manual_seed(0)
    seq = SimSeq(torch.randn(19, 2, 4, generator=g), torch.randn(19, 2, 4, generator=g), torch.ones(19, 2),
                 cache.add_sequence())
    write_chunk(cache, [seq], [18], tau=0.0)  # 16 leavers per head: the table's 4 blocks, full; a window page
    check_cache(cache, [seq], 0.0)
    with pytest.raises(CacheFullError, match="a head needs 5 blocks, block table holds 4"):
        write_chunk(cache, [seq], [1], tau=0.0)
    assert cache.allocator.num_free == 100 - 2 * (4 + 1)


def test_all_sequence_slots_in_use_is_a_clear_error():
    cache = make_cache(max_seqs=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    with pytest.raises(CacheFullError, match="all 2 sequence slots are in use"):
        cache.add_sequence()
    cache.release(a)
    assert cache.add_sequence() == a and a != b
