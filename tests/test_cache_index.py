"""The kernels' index arithmetic (plugins/src/cache_index.cuh), called on the host through the C
ABI (kvzapIndex*), against the PyTorch references on many random cases: a bug in a leaver range,
window slot or page, page slot, key order, split or chunk bound fails here, in CI, not on the first GPU.

The expected values come from running the references (kvzap_trt/ops/evict_append.py and
paged_attention.py's key order) on tagged data, not from restating their formulas.
"""

from __future__ import annotations

import ctypes
import random

import pytest
import torch

from kvzap_trt.cache.paged_cache import window_pages
from kvzap_trt.ops.dispatch import REFERENCE
from kvzap_trt.ops.evict_append import window_rows
from kvzap_trt.ops.paged_attention import gather_pages
from tests.cache_sim import make_cache

KEY_PAGE, KEY_RING, KEY_NEW = 0, 1, 2  # KeySource in cache_index.cuh


@pytest.fixture(scope="module")
def index(cmake_build):
    """The C ABI's index functions as Python callables returning tuples."""
    lib = ctypes.CDLL(str(cmake_build[0] / "libkvzap_kernels.so"))

    def outs(fn, n_out):
        def call(*args):
            out = [ctypes.c_int() for _ in range(n_out)]
            fn(*args, *[ctypes.byref(o) for o in out])
            return tuple(o.value for o in out)
        return call

    class Index:
        leavers = staticmethod(outs(lib.kvzapIndexLeavers, 3))
        ring_slot = staticmethod(lib.kvzapIndexRingSlot)
        ring_page_slot = staticmethod(outs(lib.kvzapIndexRingPageSlot, 2))
        ring_pages = staticmethod(lib.kvzapIndexRingPages)
        page_slot = staticmethod(outs(lib.kvzapIndexPageSlot, 2))
        row_keys = staticmethod(lib.kvzapIndexRowKeys)
        locate_key = staticmethod(outs(lib.kvzapIndexLocateKey, 2))
        split_keys = staticmethod(outs(lib.kvzapIndexSplitKeys, 4))
        num_splits = staticmethod(lib.kvzapIndexNumSplits)
        leaver_chunk = staticmethod(outs(lib.kvzapIndexLeaverChunk, 2))
        staged_key = staticmethod(outs(lib.kvzapIndexStagedKey, 6))
        split_tile = staticmethod(outs(lib.kvzapIndexSplitTile, 5))

        @staticmethod
        def row_sequence(cu: list[int], row: int) -> int:
            arr = (ctypes.c_int32 * len(cu))(*cu)
            return lib.kvzapIndexRowSequence(arr, len(cu) - 1, row)

        row_groups = staticmethod(lib.kvzapIndexRowGroups)

        @staticmethod
        def row_group(cu: list[int], tokens_per_group: int, group: int) -> tuple[int, int, int]:
            arr = (ctypes.c_int32 * len(cu))(*cu)
            return outs(lib.kvzapIndexRowGroup, 3)(arr, len(cu) - 1, tokens_per_group, group)

    return Index


def tagged_write(cache, slot: int, start: int, n: int):
    """Write positions [start, start + n) of one sequence, every one kept; K carries its position."""
    H, D = cache.spec.num_kv_heads, cache.spec.head_dim
    pos = torch.arange(start, start + n, dtype=torch.float32)
    k = pos[:, None, None].expand(n, H, D).contiguous()
    lc, a = cache.layer(0), cache.allocator
    REFERENCE.evict_append(k, k.clone(), torch.zeros(n, H), torch.tensor([0, n]), torch.tensor([slot]),
                           torch.tensor([start]), lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool, lc.block_table,
                           lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t, cache.spec.window, -1.0)
    cache.ctx_len[slot] = start + n


def test_ring_pages_and_window_page_slots_match_the_reference(index):
    """ring_pages and ring_page_slot against the reference's window_pages and window_rows (over a
    ring table whose block ids are its column numbers)."""
    rng = random.Random(5)
    for _ in range(400):
        W, bs, c = rng.choice([0, 1, 3, 8, 16, 128, 130]), rng.choice([1, 3, 16, 64]), rng.randrange(0, 400)
        assert index.ring_pages(c, W, bs) == window_pages(c, W, bs), (c, W, bs)
        if W == 0:
            continue
        columns = torch.arange(window_pages(W, W, bs), dtype=torch.int32)[None]  # [1, R]
        positions = torch.tensor([rng.randrange(0, 5000) for _ in range(20)])
        blocks, offsets = window_rows(columns, positions, W, bs)
        got = [index.ring_page_slot(int(p), W, bs) for p in positions]
        assert got == list(zip(blocks[0].tolist(), offsets.tolist())), (W, bs)
        assert [index.ring_slot(int(p), W) for p in positions] == (blocks[0] * bs + offsets).tolist()  # window slot


def test_leavers_window_and_page_slots_match_the_reference(index):
    """For random (c, T, W, block size): the reference appends exactly positions [lo, hi) to the
    pages, at the block-table column / offset page_slot gives, and leaves each window position p
    at the ring-table column / offset ring_page_slot(p, W, bs) gives, in a head holding
    ring_pages(c + T, W, bs) window pages; the new tokens from stay_lo on are in the window."""
    rng = random.Random(0)
    for _ in range(150):
        W, bs = rng.choice([0, 1, 3, 8, 16]), rng.choice([1, 3, 16])
        c, T = rng.randrange(0, 40), rng.randrange(1, 40)
        cache = make_cache(H=1, D=4, W=W, bs=bs, num_blocks=256, max_seqs=1, max_seq_len=128)
        slot = cache.add_sequence()
        if c:
            tagged_write(cache, slot, 0, c)
        before = int(cache.kept_len[0, slot, 0])
        tagged_write(cache, slot, c, T)
        after = int(cache.kept_len[0, slot, 0])
        lo, hi, stay_lo = index.leavers(c, T, W)
        table = cache.block_table[0, slot, 0]
        appended = []
        for dst in range(before, after):
            column, offset = index.page_slot(dst, bs)
            appended.append(int(cache.pos_pool[table[column], offset]))
        assert appended == list(range(lo, hi)), (c, T, W, bs)
        assert stay_lo == max(c, hi)  # the new tokens that did not leave
        ring = cache.layer(0).ring_table[slot, 0]
        held = index.ring_pages(c + T, W, bs)
        assert (ring[:held] >= 0).all() and (ring[held:] == -1).all(), (c, T, W, bs, ring.tolist())
        for p in range(max(0, c + T - W), c + T):
            column, offset = index.ring_page_slot(p, W, bs)
            block = int(ring[column])
            assert int(cache.k_pool[block, offset, 0]) == p and int(cache.pos_pool[block, offset]) == p, (c, T, W, p)


def test_key_order_matches_the_reference_attention(index):
    """locate_key(j) names the j-th key the reference attends to for row t: its kept pages in
    page order (gather_pages), then window slots 0..r-1 (window slot i at ring-table column /
    offset page_slot(i, bs)), then the new tokens 0..t."""
    rng = random.Random(1)
    for _ in range(40):
        W, bs = rng.choice([0, 4, 8]), rng.choice([1, 3, 16])
        c, T = rng.randrange(0, 60), rng.randrange(1, 6)
        cache = make_cache(H=1, D=4, W=W, bs=bs, num_blocks=256, max_seqs=1, max_seq_len=128, seed=rng.randrange(99))
        slot = cache.add_sequence()
        if c:
            tagged_write(cache, slot, 0, c)
        kept = int(cache.kept_len[0, slot, 0])
        r = min(c, W)
        k_new = torch.arange(1000, 1000 + T, dtype=torch.float32)[:, None, None].expand(T, 1, 4)
        pages, _, _ = gather_pages(cache.k_pool, cache.v_pool, cache.block_table[0, slot], cache.kept_len[0, slot])
        ring = cache.layer(0).ring_table[slot]  # [1, R]
        window, _, _ = gather_pages(cache.k_pool, cache.v_pool, ring, torch.tensor([r]))
        for t in range(T):
            want = torch.cat([pages[0, :kept, 0], window[0, :r, 0], k_new[: t + 1, 0, 0]]).tolist()
            assert index.row_keys(kept, c, W, t) == len(want)
            got = []
            for j in range(len(want)):
                source, i = index.locate_key(j, kept, r)
                if source == KEY_NEW:
                    got.append(float(k_new[i, 0, 0]))
                else:
                    column, offset = index.page_slot(i, bs)
                    table = cache.block_table[0, slot, 0] if source == KEY_PAGE else ring[0]
                    got.append(float(cache.k_pool[table[column], offset, 0]))
            assert got == want, (c, T, W, bs, t)


def test_splits_partition_each_row_and_stage_exactly_its_pages(index):
    rng = random.Random(2)
    for _ in range(600):
        bs, split_size = rng.choice([1, 16, 24, 64]), rng.choice([64, 100, 256, 4096])
        n_keys = rng.randrange(1, 20000)
        kept = rng.randrange(0, n_keys)
        max_keys = n_keys + rng.randrange(0, 3000)
        splits = index.num_splits(max_keys, split_size)
        assert (splits - 1) * split_size < max_keys <= splits * split_size or (max_keys == 0 and splits == 1)
        covered = []
        for split in range(splits):
            begin, end, page_lo, page_hi = index.split_keys(split, split_size, n_keys, kept, bs)
            covered += range(begin, end)
            # Kept keys are consecutive page slots, so their columns run from the first one's
            # column to the last one's (page_slot itself is checked against the reference above).
            last = min(end, kept) - 1
            columns = (index.page_slot(begin, bs)[0], index.page_slot(last, bs)[0] + 1) if last >= begin else None
            assert (page_lo, page_hi) == columns or (columns is None and page_lo == page_hi), (bs, split_size, n_keys,
                                                                                               kept, split)
            assert page_hi - page_lo <= split_size // bs + 2  # the launcher's shared-memory bound
        assert covered == list(range(n_keys))


def test_staged_page_ids_locate_every_cached_key_of_a_split(index):
    """The attention kernel stages, per split, the ids of its kept pages (table columns
    [page_lo, page_hi)) and then of its window pages (ring columns [ring_lo, ring_hi)), within
    max_staged ids of shared memory, and reads cached key j at staged[column] * bs + offset. That
    pool row must be the one the reference gathers for key j (gather_pages over the block table,
    then over the ring table; a pool tagged with its own row numbers tells which)."""
    rng = random.Random(6)
    for _ in range(300):
        bs, split_size = rng.choice([1, 3, 16, 24, 64]), rng.choice([40, 64, 100, 256])
        W, c = rng.choice([0, 5, 16, 40, 128, 130]), rng.randrange(0, 3000)
        r = min(c, W)
        kept = rng.randrange(0, max(1, c - r + 1))
        n_keys = kept + r + rng.randrange(1, 4)  # a row t = 0..2 of the new tokens
        M, R = -(-max(kept, 1) // bs), window_pages(W, W, bs)
        ids = torch.randperm(M + R + 8, dtype=torch.int32)  # distinct random blocks
        table, ring = ids[:M][None], ids[M : M + R][None]  # [1, M], [1, R]
        rows = torch.arange(len(ids) * bs, dtype=torch.float32).view(len(ids), bs, 1)  # pool row numbers
        kept_rows, _, _ = gather_pages(rows, rows, table, torch.tensor([kept]))
        window_rows_, _, _ = gather_pages(rows, rows, ring, torch.tensor([r]))
        want = kept_rows[0, :kept, 0].tolist() + window_rows_[0, :r, 0].tolist()  # cached keys in the reference's order
        for split in range(index.num_splits(n_keys, split_size)):
            begin, end, page_lo, page_hi = index.split_keys(split, split_size, n_keys, kept, bs)
            for j in range(begin, end):
                source, column, offset, ring_lo, ring_hi, max_staged = index.staged_key(
                    j, split, split_size, n_keys, kept, r, bs)
                staged = table[0, page_lo:page_hi].tolist() + ring[0, ring_lo:ring_hi].tolist()  # as the kernel stages
                assert len(staged) <= max_staged, (bs, split_size, W, c, kept, split)
                if j >= kept + r:
                    assert source == KEY_NEW
                    continue
                assert source == (KEY_PAGE if j < kept else KEY_RING)
                assert staged[column] * bs + offset == want[j], (bs, split_size, W, c, kept, split, j)


def test_tiles_of_a_split_cover_its_keys_once_in_order(index):
    """The tensor-core path reads a split in tiles of 16 keys of one source each (kept, window, new
    tokens; aligned in the source's own index, keys outside the split masked). Over all tiles, the
    unmasked keys mapped back to the row's key order are exactly the split's keys, each once, in
    order; a tile never mixes sources and always holds at least one key of the split."""
    rng = random.Random(8)
    for _ in range(600):
        split_size = rng.choice([40, 64, 100, 256, 4096])
        kept, r, t = rng.choice([0, 1, 15, 16, 17, rng.randrange(0, 3000)]), rng.choice([0, 5, 16, 128]), rng.randrange(0, 40)
        n_keys = kept + r + t + 1
        from_of = {KEY_PAGE: 0, KEY_RING: kept, KEY_NEW: kept + r}
        count_of = {KEY_PAGE: kept, KEY_RING: r, KEY_NEW: t + 1}
        covered = []
        for split in range(index.num_splits(n_keys, split_size)):
            begin, end = index.split_keys(split, split_size, n_keys, kept, 16)[:2]
            tiles = index.split_tile(0, split, split_size, n_keys, kept, r, t)[4]
            seen = []
            for i in range(tiles):
                source, first, lo, hi, n_tiles = index.split_tile(i, split, split_size, n_keys, kept, r, t)
                assert n_tiles == tiles and first % 16 == 0, (split_size, kept, r, t, split, i)
                assert 0 <= lo < hi <= count_of[source]
                keys = [from_of[source] + x for x in range(first, first + 16) if lo <= x < hi]
                assert keys, (split_size, kept, r, t, split, i)
                seen += keys
            assert seen == list(range(begin, end)), (split_size, kept, r, t, split)
            covered += seen
        assert covered == list(range(n_keys))


def test_key_bound_covers_every_row_and_follows_the_kept_lengths(index):
    """interface.key_bound, the max_keys the attention kernel is launched with: at least every
    row's keys (row_keys, checked against the reference above) given the largest kept length of
    the batch, never above the uncompressed bound, and below it once heads have evicted."""
    from kvzap_trt.ops.interface import key_bound

    rng = random.Random(7)
    tighter = 0
    for _ in range(400):
        W = rng.choice([0, 8, 128])
        lens = [rng.choice([0, 1, 1, 5]) for _ in range(rng.randrange(1, 6))]
        ctx = [rng.randrange(0, 3000) for _ in lens]
        kept = [[rng.randrange(0, max(1, c - min(c, W) + 1)) for _ in range(3)] for c in ctx]  # 3 heads each
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        rows = [index.row_keys(k, c, W, t) for ks, c, n in zip(kept, ctx, lens) for k in ks for t in range(n)]
        bound = key_bound(tuple(cu), tuple(ctx), W, max(max(ks) for ks in kept))
        uncompressed = key_bound(tuple(cu), tuple(ctx), W, None)
        assert all(r <= bound for r in rows) and bound <= uncompressed, (lens, ctx, kept, W)
        tighter += bound < uncompressed
    assert tighter > 100


def test_chunks_partition_the_leavers(index):
    rng = random.Random(3)
    for _ in range(500):
        W, c, T = rng.choice([0, 128]), rng.randrange(0, 10000), rng.randrange(4096, 12000)
        lo, hi, _ = index.leavers(c, T, W)
        chunks = -(-T // 2048)  # the launcher's grid for max_new_tokens = T
        covered = []
        for chunk in range(chunks):
            start, end = index.leaver_chunk(chunk, 2048, lo, hi)
            assert start <= end
            covered += range(start, end)
        assert covered == list(range(lo, hi))


def test_row_sequence_skips_idle_sequences(index):
    rng = random.Random(4)
    for _ in range(300):
        lens = [rng.choice([0, 0, 1, 3, 17]) for _ in range(rng.randrange(1, 9))]
        if not sum(lens):
            continue
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        for row in range(cu[-1]):
            b = index.row_sequence(cu, row)
            assert cu[b] <= row < cu[b + 1], (lens, row)  # its own sequence, never an idle one


@pytest.mark.parametrize("P", [2, 3, 4, 5, 8, 16])  # 16 // G for G = 8, 5, 4, 3, 2, 1
def test_row_groups_cover_every_token_once_within_one_sequence(index, P):
    """The packed attention launch: its groups hold every new token of every sequence exactly once,
    each group at most P consecutive tokens of one sequence, and the grid stays within
    ceil(N / P) + B groups (a decode-only batch: one group per sequence, its one token)."""
    rng = random.Random(P)
    for case in range(300):
        lens = [rng.choice([0, 1, 1, 2, P - 1, P, P + 1, 3 * P, 40]) for _ in range(rng.randrange(1, 9))]
        if case % 10 == 0:
            lens = [1] * len(lens)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        N, B = cu[-1], len(lens)
        groups = index.row_groups(N, B, P)
        assert groups <= -(-N // P) + B, (lens, groups)
        seen = []
        for i in range(groups):
            b, lo, hi = index.row_group(cu, P, i)
            if lo >= hi:
                continue
            assert 0 <= b < B and 0 <= lo < hi <= lens[b] and hi - lo <= P, (lens, i, b, lo, hi)
            seen += [(b, t) for t in range(lo, hi)]
        assert sorted(seen) == [(b, t) for b, n in enumerate(lens) for t in range(n)], lens
        assert len(seen) == len(set(seen)), lens
        if set(lens) == {1}:
            assert groups == B and [index.row_group(cu, P, i) for i in range(B)] == [(b, 0, 1) for b in range(B)]
