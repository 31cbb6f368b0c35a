"""evict_append against the naive model of KVzap eviction, chunk by chunk: the PyTorch reference
on CPU, and the CUDA kernel (plugins/src/evict_append.cu) on a GPU where one exists."""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_trt.errors import CacheFullError
from kvzap_trt.ops.dispatch import CUDA, REFERENCE
from tests.cache_sim import make_cache, naive_kept, random_seq, write_chunk

# (ops, device): the reference on CPU everywhere, the kernel where a GPU is.
IMPLS = [
    pytest.param((REFERENCE, "cpu"), id="reference"),
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
]


def check_cache(cache, seqs, tau):
    spec = cache.spec
    block_table, ring_k, ring_score = cache.block_table.cpu(), cache.ring_k.cpu(), cache.ring_score.cpu()
    pages = kept_pages(cache, [s.slot for s in seqs])
    for s in seqs:
        want = naive_kept(s.scores, s.written, spec.window, tau)
        assert cache.kept_positions(s.slot)[0] == want
        in_window = min(s.written, spec.window)
        for h, positions in enumerate(want):
            pos, k, v = pages[0, s.slot, h]
            n = len(pos)
            assert n == len(positions) - in_window
            pos = pos.long()
            assert torch.equal(pos, torch.tensor(positions[: n], dtype=torch.long))  # kept in order
            assert torch.equal(k, s.k[pos, h])
            assert torch.equal(v, s.v[pos, h])
            window = torch.arange(s.written - in_window, s.written)
            assert torch.equal(ring_k[0, s.slot, h, window % max(spec.window, 1)], s.k[window, h])
            assert torch.equal(ring_score[0, s.slot, h, window % max(spec.window, 1)], s.scores[window, h])
            # Exactly the blocks the kept tokens need, no more.
            assert int((block_table[0, s.slot, h] >= 0).sum()) == math.ceil(n / spec.block_size)
    used = sum(cache.blocks_held(s.slot) for s in seqs)
    assert cache.allocator.num_used == used


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window,block_size,chunks", SCHEDULES)
def test_evict_append_matches_naive_model(window, block_size, chunks, impl):
    ops, device = impl
    tau = 0.3
    cache = make_cache(H=3, W=window, bs=block_size, seed=window + block_size, device=device)
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


def kept_pages(cache, slots):
    """{(layer, slot, head): (positions, K, V)} of each head's kept pages, in page order, on CPU."""
    bs, D = cache.spec.block_size, cache.spec.head_dim
    pos_pool, k_pool, v_pool = cache.pos_pool.cpu(), cache.k_pool.cpu(), cache.v_pool.cpu()
    table, kept_len = cache.block_table.cpu(), cache.kept_len.cpu()
    out = {}
    for layer in range(cache.spec.num_layers):
        for s in slots:
            for h in range(cache.spec.num_kv_heads):
                n = int(kept_len[layer, s, h])
                blocks = table[layer, s, h, : math.ceil(n / bs)].long()
                out[layer, s, h] = (pos_pool[blocks].reshape(-1)[:n], k_pool[blocks].reshape(-1, D)[:n],
                                    v_pool[blocks].reshape(-1, D)[:n])
    return out


def assert_same_cache(got, want, slots):
    """Same kept positions, K/V in order, lengths, ring and pool usage; block ids may differ."""
    assert got.allocator.num_free == want.allocator.num_free
    assert torch.equal(got.kept_len.cpu(), want.kept_len.cpu())
    for name in ("ring_k", "ring_v", "ring_score"):
        assert torch.equal(getattr(got, name)[:, slots].cpu(), getattr(want, name)[:, slots].cpu()), name
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


@pytest.mark.gpu
def test_cuda_evict_one_launch_over_layers_equals_per_layer_reference():
    """torch.ops.kvzap_trt.evict_append with a leading layer dimension (one launch per decode step)."""
    from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache

    L, H, D, W, bs, tau = 3, 2, 64, 4, 16, 0.1
    spec = CacheSpec(L, H, D, W, bs, 512, 2, 256, torch.float16)
    gpu, cpu = PagedKVCache(spec, "cuda"), PagedKVCache(spec, "cpu")
    slots = [gpu.add_sequence(), gpu.add_sequence()]
    assert slots == [cpu.add_sequence(), cpu.add_sequence()]
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        cu, ctx = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([step, step], dtype=torch.int32)
        k, v = (torch.randn(L, 2, H, D, generator=g).half() for _ in range(2))
        scores = torch.randn(L, 2, H, generator=g)
        for layer in range(L):
            lc = cpu.layer(layer)
            REFERENCE.evict_append(k[layer], v[layer], scores[layer], cu, torch.tensor(slots, dtype=torch.int32), ctx,
                                   lc.k_pool, lc.v_pool, lc.pos_pool, lc.block_table, lc.kept_len, lc.ring_k,
                                   lc.ring_v, lc.ring_score, cpu.allocator.free_stack, cpu.allocator.num_free_t, tau)
        error = torch.zeros(1, dtype=torch.int32, device="cuda")
        ints = lambda t: t.to("cuda")  # noqa: E731
        torch.ops.kvzap_trt.evict_append(
            ints(k), ints(v), ints(scores), ints(cu), ints(torch.tensor(slots, dtype=torch.int32)), ints(ctx),
            gpu.k_pool, gpu.v_pool, gpu.pos_pool, gpu.block_table, gpu.kept_len, gpu.ring_k, gpu.ring_v,
            gpu.ring_score, gpu.allocator.free_stack, gpu.allocator.num_free_t, error, tau, 1,
            torch.cuda.current_stream().cuda_stream)
        assert int(error.item()) == 0
        for s in slots:
            gpu.ctx_len[s] = cpu.ctx_len[s] = step + 1
    assert_same_cache(gpu, cpu, slots)


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
