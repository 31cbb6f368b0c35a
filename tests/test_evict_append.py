"""evict_append against the naive model of KVzap eviction, chunk by chunk: the PyTorch reference
on CPU, and the CUDA kernel (plugins/src/evict_append.cu) on a GPU where one exists."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.ops.dispatch import CPU, CUDA, REFERENCE
from tests.cache_check import check_cache
from tests.cache_sim import (SimSeq, chunk_args, decode_cache_for_validation, make_cache, mutate,
                             mutation_ids, random_seq, write_chunk)

# (ops, device): the reference and the CPU fast path on CPU everywhere, the kernel where a GPU is.
IMPLS = [
    pytest.param((REFERENCE, "cpu"), id="reference"),
    pytest.param((CPU, "cpu"), id="cpu-fast"),
    pytest.param((CUDA, "cuda"), id="cuda", marks=pytest.mark.gpu),
]

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
    # The kernel's chunked path (some sequence writes >= 4096 tokens in one call), after context:
    # a full ring (c = 100 > W), a sequence idle in that call, a partly filled ring (c = 60 < W).
    (128, 16, [[100, 5000, 1], [3, 0, 1], [60, 4100, 1]]),
    (0, 16, [[100, 5000, 1]]),                 # chunked, no window
    (128, 1, [[4096, 1]]),                     # chunked from exactly 4096, page size 1
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,block_size,chunks", SCHEDULES)
def test_evict_append_matches_naive_model(window, block_size, chunks, impl):
    ops, device = impl
    tau = 0.3
    longest = max(sum(c) for c in chunks)
    cache = make_cache(H=3, W=window, bs=block_size, num_blocks=3 * len(chunks) * (longest // block_size + 1),
                       max_seq_len=longest, seed=window + block_size, device=device)
    g = torch.Generator().manual_seed(len(chunks))
    seqs = [random_seq(cache, sum(c), g, dead_head=1 if i == 0 else None) for i, c in enumerate(chunks)]
    for step in range(max(len(c) for c in chunks)):
        active = [(s, c[step]) for s, c in zip(seqs, chunks) if step < len(c)]
        write_chunk(cache, [s for s, _ in active], [n for _, n in active], tau, ops)
        check_cache(cache, seqs, tau)
    for s in seqs:
        cache.release(s.slot)
    assert cache.allocator.num_free == cache.spec.num_blocks


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt", [64, 5000])  # the kernel's one-block and chunked paths
def test_pool_exhaustion_is_a_clear_error(impl, prompt):
    ops, device = impl
    cache = make_cache(H=2, W=2, bs=4, num_blocks=3, max_seq_len=8192, device=device)
    seq = random_seq(cache, prompt, torch.Generator().manual_seed(0))
    seq.scores.fill_(1.0)  # keep everything: each head needs far more than 3 blocks
    with pytest.raises(CacheFullError, match="exhausted"):
        write_chunk(cache, [seq], [prompt], tau=0.0, ops=ops)
    assert cache.allocator.num_free == 3  # nothing taken


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt", [64, 5000])  # the kernel's one-block and chunked paths
def test_a_failed_write_leaves_a_partly_filled_page_untouched(impl, prompt):
    """A head with 5 kept tokens (a partly filled page) then a chunk it cannot take blocks for:
    CacheFullError, and the pool, tables and lengths are exactly as before (nothing written past
    kept_len either: the kernel's chunked copy checks that its head took its blocks)."""
    ops, device = impl
    cache = make_cache(H=2, W=2, bs=16, num_blocks=6, max_seq_len=8192, device=device)
    seq = random_seq(cache, 7 + prompt, torch.Generator().manual_seed(0))
    seq.scores.fill_(1.0)  # keep everything
    write_chunk(cache, [seq], [7], tau=0.0, ops=ops)  # 5 leavers per head: one kept page and one window page each
    names = ("k_pool", "v_pool", "pos_pool", "score_pool", "block_table", "kept_len", "ring_table")
    before = {name: getattr(cache, name).clone() for name in names}
    with pytest.raises(CacheFullError, match="exhausted"):
        write_chunk(cache, [seq], [prompt], tau=0.0, ops=ops)
    assert cache.allocator.num_free == 2
    assert all(torch.equal(getattr(cache, name), t) for name, t in before.items())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("free", [0, 5, 23])
@pytest.mark.parametrize("page", ["kept", "window"])
def test_decode_pops_serve_exactly_the_free_ids_when_too_many_heads_need_one(impl, free, page):
    """A decode step where every head needs one new page (24 heads: 4 sequences x 6 heads) and
    only `free` ids are left. page "kept": a full window and an empty kept list, every leaver
    kept; "window": 4 tokens written of an 8-token window, the 5th opens its second page. On the
    GPU one launch pops with a fetch-and-subtract per head (pop_one) that may take the counter
    below zero. CacheFullError; the heads served got their page and wrote their row, the others
    wrote nothing; every id is free or held once, and the count says what is left. The kernel
    serves every head it can (exactly `free`); the reference takes a sequence's heads together and
    the CPU fast path the batch's, so they serve fewer (which heads fail is the implementation's)."""
    ops, device = impl
    H, bs, S = 6, 4, 4
    W, first = (4, 4) if page == "kept" else (8, 4)
    cache = make_cache(H=H, W=W, bs=bs, num_blocks=S * H + free, max_seqs=S, max_seq_len=64, device=device)
    g = torch.Generator().manual_seed(free)
    seqs = [random_seq(cache, first + 1, g) for _ in range(S)]
    for s in seqs:
        s.scores.fill_(1.0)  # every leaver kept
    write_chunk(cache, seqs, [first] * S, tau=0.0, ops=ops)  # one window page per head, nothing kept
    assert cache.allocator.num_free == free and int(cache.kept_len.sum()) == 0
    with pytest.raises(CacheFullError, match="exhausted"):
        write_chunk(cache, seqs, [1] * S, tau=0.0, ops=ops)  # one token each: every head needs a page
    table, kept_len, ring = cache.block_table.cpu(), cache.kept_len.cpu(), cache.ring_table.cpu()
    got = kept_len == 1 if page == "kept" else ring[..., 1] >= 0  # [1, S, H]: the heads served
    served = int(got.sum())
    assert served <= free and (free if device == "cuda" else served) == served
    assert torch.equal((table >= 0).sum(-1), kept_len) and bool((kept_len <= int(page == "kept")).all())
    assert cache.allocator.num_free == free - served
    held = torch.cat([table[table >= 0], ring[ring >= 0]]).tolist()
    free_ids = cache.allocator.free_stack.cpu()[: cache.allocator.num_free].tolist()
    assert sorted(held + free_ids) == list(range(S * H + free))  # none lost, none held twice
    # What each served head wrote to its new page's first row: the leaver (position 0) it kept, or
    # the new token (position 4); an unserved head's window page 1 stays unheld.
    pos = cache.pos_pool.cpu()
    new_page = table[..., 0] if page == "kept" else ring[..., 1]
    assert [int(pos[int(new_page[0, s.slot, h]), 0]) for s in seqs for h in range(H) if got[0, s.slot, h]] == \
        [0 if page == "kept" else first] * served
    for s in seqs:  # after a release every id comes back, whatever the counter went through
        cache.release(s.slot)
    assert cache.allocator.num_free == S * H + free
    assert sorted(cache.allocator.free_stack.cpu().tolist()) == list(range(S * H + free))


def kept_pages(cache, slots):
    """{(layer, slot, head): (positions, scores, K, V)} of each head's kept pages in page order and
    of its window in slot order, on CPU. Gathered on the cache's device: only the pages travel,
    never the pool."""
    bs, W = cache.spec.block_size, cache.spec.window
    table, kept_len, ring = cache.block_table.cpu(), cache.kept_len.cpu(), cache.ring_table.cpu()
    out = {}
    for layer in range(cache.spec.num_layers):
        for s in slots:
            in_window = torch.arange(min(cache.ctx_len[s], W))  # window slots in use
            for h in range(cache.spec.num_kv_heads):
                n = int(kept_len[layer, s, h])
                blocks = table[layer, s, h, : math.ceil(n / bs)].long().to(cache.device)
                rows = [(blocks, slice(None)), (ring[layer, s, h, in_window // bs].long().to(cache.device), in_window % bs)]
                for where, (blk, off) in zip(("kept", "window"), rows):
                    pools = (cache.pos_pool, cache.score_pool, cache.k_pool, cache.v_pool)
                    if where == "kept":
                        out[layer, s, h, where] = tuple(pool[blk].flatten(0, 1)[:n].cpu() for pool in pools)
                    else:
                        out[layer, s, h, where] = tuple(pool[blk, off.to(cache.device)].cpu() for pool in pools)
    return out


def assert_same_cache(got, want, slots):
    """Same kept and window positions, scores, K/V in order, lengths and blocks used; block ids may
    differ."""
    assert got.allocator.num_used == want.allocator.num_used
    assert torch.equal(got.kept_len.cpu(), want.kept_len.cpu())
    assert torch.equal(got.ring_table.cpu() >= 0, want.ring_table.cpu() >= 0)
    got_pages, want_pages = kept_pages(got, slots), kept_pages(want, slots)
    for key, tensors in want_pages.items():
        assert all(torch.equal(a, b) for a, b in zip(got_pages[key], tensors)), key


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_cuda_evict_long_prefill_then_decode_equals_reference(block_size):
    """A batch of prompts of 32k, 577, 17 and 1 tokens, then decode steps, bf16, D=128: in each
    prompt head 0 keeps nothing, head 1 everything, the others a random part. The kernel's cache
    equals the reference's on the same inputs."""
    W, H, D, tau = 128, 4, 128, 0.0
    lengths = [32768, 577, 17, 1]
    kw = dict(H=H, D=D, W=W, bs=block_size, num_blocks=H * 34000 // block_size + 64, max_seqs=4,
              max_seq_len=33000, dtype=torch.bfloat16, seed=block_size)
    caches = {"cuda": make_cache(device="cuda", **kw), "cpu": make_cache(**kw)}
    g = torch.Generator().manual_seed(7)
    seqs = {}
    for dev, cache in caches.items():
        g.manual_seed(7)
        seqs[dev] = [random_seq(cache, n + 3, g) for n in lengths]
        for s in seqs[dev]:
            s.scores[:, 0], s.scores[:, 1] = -10.0, 10.0
    for chunk in (lengths, [1] * 4, [1] * 4, [1] * 4):
        write_chunk(caches["cuda"], seqs["cuda"], chunk, tau, CUDA)
        write_chunk(caches["cpu"], seqs["cpu"], chunk, tau, REFERENCE)
        assert_same_cache(caches["cuda"], caches["cpu"], [s.slot for s in seqs["cpu"]])
    assert int(caches["cuda"].kept_len[0, seqs["cuda"][0].slot, 1]) == 32768 + 3 - W


# Per step, the new tokens of each of two sequences (0: idle in that step).
LAYERED = {
    "decode": [[1, 1]] * 40,
    "prefill-then-decode": [[37, 5], [0, 20], [1, 1], [1, 0], [1, 1]],
    "chunked": [[100, 3], [5000, 0], [1, 4100], [1, 1]],  # >= 4096 new tokens: plan / copy / commit
}


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", LAYERED)
def test_cuda_evict_one_launch_over_layers_equals_per_layer_reference(schedule):
    """torch.ops.kvzap_trt.evict_append with a leading layer dimension (one launch per step)."""
    from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
    from kvzap_trt.ops import cuda_kernels

    cuda_kernels.load()
    L, H, D, W, bs, tau = 3, 2, 64, 8, 16, 0.1
    spec = CacheSpec(L, H, D, W, bs, 2100, 2, 5200, torch.float16)
    gpu, cpu = PagedKVCache(spec, "cuda"), PagedKVCache(spec, "cpu")
    slots = [gpu.add_sequence(), gpu.add_sequence()]
    assert slots == [cpu.add_sequence(), cpu.add_sequence()]
    g = torch.Generator().manual_seed(0)
    for chunk in LAYERED[schedule]:
        n = sum(chunk)
        cu = torch.tensor([0, chunk[0], n], dtype=torch.int32)
        ctx = torch.tensor([cpu.ctx_len[s] for s in slots], dtype=torch.int32)
        slots_t = torch.tensor(slots, dtype=torch.int32)
        k, v = (torch.randn(L, n, H, D, generator=g).half() for _ in range(2))
        scores = torch.randn(L, n, H, generator=g)
        for layer in range(L):
            lc = cpu.layer(layer)
            REFERENCE.evict_append(k[layer], v[layer], scores[layer], cu, slots_t, ctx, lc.k_pool, lc.v_pool,
                                   lc.pos_pool, lc.score_pool, lc.block_table, lc.kept_len, lc.ring_table,
                                   cpu.allocator.free_stack, cpu.allocator.num_free_t, W, tau)
        error = torch.zeros(1, dtype=torch.int32, device="cuda")
        dev = lambda t: t.to("cuda")  # noqa: E731
        torch.ops.kvzap_trt.evict_append(
            dev(k), dev(v), dev(scores), dev(cu), dev(slots_t), dev(ctx), gpu.k_pool, gpu.v_pool, gpu.pos_pool,
            gpu.score_pool, gpu.block_table, gpu.kept_len, gpu.ring_table, gpu.allocator.free_stack,
            gpu.allocator.num_free_t, error, W, tau, max(chunk), torch.cuda.current_stream().cuda_stream)
        assert int(error.item()) == 0
        for s, t in zip(slots, chunk):
            gpu.ctx_len[s] += t
            cpu.ctx_len[s] += t
        assert_same_cache(gpu, cpu, slots)
    assert int(cpu.kept_len.sum()) > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt", [64, 5000])  # the kernel's one-block and chunked paths
def test_block_table_overflow_is_a_clear_error(impl, prompt):
    """A head that would need more blocks than its table row holds (max_seq_len 16, block 4: 4
    columns): CacheFullError, no block taken, no page written."""
    ops, device = impl
    cache = make_cache(H=2, W=2, bs=4, num_blocks=4096, max_seq_len=16, device=device)
    seq = random_seq(cache, prompt, torch.Generator().manual_seed(0))
    seq.scores.fill_(1.0)  # keep everything
    with pytest.raises(CacheFullError, match="block table"):
        write_chunk(cache, [seq], [prompt], tau=0.0, ops=ops)
    assert cache.allocator.num_free == 4096
    assert bool((cache.pos_pool == -1).all()) and bool((cache.block_table == -1).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("prompts", [[40, 7, 90, 33, 64, 12, 50, 80], [40, 7, 90, 4100, 33, 64, 12, 50]],
                         ids=["fused", "chunked"])
def test_allocator_stays_exact_when_some_heads_fail(impl, seed, prompts):
    """8 sequences x 8 heads in one call against a pool for about half of what they keep and
    their windows hold: some heads take their blocks while others fail (on the GPU concurrently,
    in one launch). After the error every block id is exactly once either free
    (free_stack[:num_free]) or in one block or ring table, every head holds exactly the blocks its
    kept_len needs, and its window pages all or none."""
    ops, device = impl
    H, D, W, bs = 8, 8, 4, 4
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(-2.0, 2.0, H)  # head h keeps more as h grows
    streams = [(torch.randn(n, H, generator=g) + rates, torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g))
               for n in prompts]
    window_pages = [-(-min(len(sc), W) // bs) for sc, _, _ in streams]  # per head of each sequence
    need = sum(int((-(-(sc[: max(0, len(sc) - W)] >= 0).sum(0) // bs)).sum()) for sc, _, _ in streams)
    num_blocks = (need + H * sum(window_pages)) // 2
    cache = make_cache(H=H, D=D, W=W, bs=bs, num_blocks=num_blocks, max_seqs=len(prompts),
                       max_seq_len=max(prompts), seed=seed, device=device)
    seqs = [SimSeq(k, v, sc, cache.add_sequence()) for sc, k, v in streams]
    with pytest.raises(CacheFullError, match="exhausted"):
        write_chunk(cache, seqs, prompts, tau=0.0, ops=ops)
    table, kept_len, ring = cache.block_table.cpu(), cache.kept_len.cpu(), cache.ring_table.cpu()
    free = cache.allocator.free_stack.cpu()[: cache.allocator.num_free]
    assert sorted(torch.cat([free, table[table >= 0], ring[ring >= 0]]).tolist()) == list(range(num_blocks))
    assert torch.equal((table >= 0).sum(-1), -(-kept_len // bs))
    wanted = torch.stack([(sc[: max(0, len(sc) - W)] >= 0).sum(0) for sc, _, _ in streams])[None]  # [1, S, H]
    succeeded, failed = kept_len == wanted, (kept_len == 0) & (wanted > 0)
    assert bool(succeeded[wanted > 0].any()) and bool(failed.any())
    assert bool((succeeded | failed).all())  # a head either got everything or nothing
    held = (ring >= 0).sum(-1)  # [1, S, H] window pages held
    full = torch.tensor(window_pages)[None, :, None].expand_as(held)
    assert bool(((held == 0) | (held == full)).all()) and bool((held[failed] == 0).all())


@pytest.mark.gpu
def test_cuda_pool_past_2_31_elements_with_pages_at_the_top():
    """bf16, D=128, block 16: 2^20 + 512 blocks make each pool 2^31 + 2^20 elements (4 GiB). The
    free stack hands out the highest ids first, so every page written lies past element 2^31:
    evict and attention must index the pool in 64 bits. Only a 512-block reference lives on the
    host; the kept pages, rings and attention output equal it."""
    from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache

    H, G, D, W, bs, tau = 2, 4, 128, 16, 16, 0.0
    first_high = 2**31 // (bs * D)
    num_blocks = first_high + 512
    gpu = PagedKVCache(CacheSpec(1, H, D, W, bs, num_blocks, 2, 4096, torch.bfloat16), "cuda")
    gpu.allocator.free_stack.copy_(torch.arange(num_blocks, dtype=torch.int32))  # pops take the top ids
    cpu = make_cache(H=H, D=D, W=W, bs=bs, num_blocks=512, max_seqs=2, max_seq_len=4096, dtype=torch.bfloat16)
    seqs = {}
    for name, cache in (("gpu", gpu), ("cpu", cpu)):
        g = torch.Generator().manual_seed(11)
        seqs[name] = [random_seq(cache, n + 4, g) for n in (1500, 300)]
    for chunk in ([1500, 300], [1, 1], [1, 1], [1, 1]):
        write_chunk(gpu, seqs["gpu"], chunk, tau, CUDA)
        write_chunk(cpu, seqs["cpu"], chunk, tau, REFERENCE)
    slots = [s.slot for s in seqs["cpu"]]
    assert_same_cache(gpu, cpu, slots)
    ids = gpu.block_table[gpu.block_table >= 0]
    assert ids.numel() > 100 and int(ids.min()) >= first_high

    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, H * G, D, generator=g).to(torch.bfloat16)
    outs = {}
    for name, cache, ops in (("gpu", gpu, CUDA), ("cpu", cpu, REFERENCE)):
        k, v, _, cu, slots_t, ctx = chunk_args(cache, seqs[name], [1, 1])
        lc = cache.layer(0)
        outs[name] = ops.paged_attention(q.to(cache.device), k, v, cu, slots_t, ctx, lc.k_pool, lc.v_pool,
                                         lc.block_table, lc.kept_len, lc.ring_table, W, D**-0.5).cpu().float()
    # Each side rounds its fp32 result once to bf16: equal up to one bf16 ulp (2^-7 relative).
    assert ((outs["gpu"] - outs["cpu"]).abs() <= 2**-7 * torch.maximum(outs["gpu"].abs(), outs["cpu"].abs())).all()


def evict_args(cache, seqs) -> dict:
    """Keyword arguments of evict_append for one decode token of each sequence (ctx > 0)."""
    k, v, sc, cu, slots, ctx = chunk_args(cache, seqs, [1] * len(seqs))
    lc, a = cache.layer(0), cache.allocator
    return dict(k_new=k, v_new=v, scores=sc, cu_seqlens=cu, seq_slots=slots, ctx_lens=ctx, k_pool=lc.k_pool,
                v_pool=lc.v_pool, pos_pool=lc.pos_pool, score_pool=lc.score_pool, block_table=lc.block_table,
                kept_len=lc.kept_len, ring_table=lc.ring_table, free_stack=a.free_stack, num_free=a.num_free_t,
                window=cache.spec.window, threshold=0.0)


# (argument, (dim, size change) or "misaligned", what the RuntimeError must say)
EVICT_MUTATIONS = [
    ("k_new", (1, 1), "k_new"),            # a kv head more than the cache
    ("v_new", (0, 1), "v_new"),            # a row more than k_new
    ("ring_table", (2, 1), "ring_table"),  # window pages != ceil(W / block_size)
    ("ring_table", (1, 1), "ring_table"),  # a kv head more than the cache
    ("score_pool", (1, 1), "score_pool"),  # block size
    ("kept_len", (1, 1), "kept_len"),
    ("scores", (1, 1), "scores"),
    ("pos_pool", (1, 1), "pos_pool"),
    ("free_stack", (0, -1), "free_stack"),  # length != num_blocks
    ("cu_seqlens", (0, 1), "cu_seqlens"),   # B + 2 entries
    ("k_new", "misaligned", "16-byte aligned"),
    ("k_pool", "misaligned", "16-byte aligned"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("argument,change,match", EVICT_MUTATIONS,
                         ids=mutation_ids(EVICT_MUTATIONS))
def test_cuda_evict_rejects_an_inconsistent_argument(argument, change, match):
    from kvzap_trt.ops import cuda_kernels

    cache, seqs = decode_cache_for_validation()
    args = evict_args(cache, seqs)
    cuda_kernels.evict_append(**args)  # unchanged, the call is valid
    mutate(args, argument, change)
    with pytest.raises((RuntimeError, KvzapError), match=match):  # torch op checks, or the wrapper's batch checks
        cuda_kernels.evict_append(**args)


@pytest.mark.gpu
def test_cuda_deferred_errors_raise_once_when_the_step_ends():
    cache = make_cache(H=2, W=2, bs=4, num_blocks=3, device="cuda")
    seq = random_seq(cache, 64, torch.Generator().manual_seed(0))
    seq.scores.fill_(1.0)
    reached_end_of_block = False
    with pytest.raises(CacheFullError, match="exhausted"):
        with CUDA.deferred_errors("cuda"):
            write_chunk(cache, [seq], [64], tau=0.0, ops=CUDA)  # no sync, no raise here
            reached_end_of_block = True
    assert reached_end_of_block
