"""Bounds the host passes to the kernels are checked on the device: a max_new_tokens below some
sequence's new tokens (kvzapEvict) or a max_keys below some row's keys (kvzapVarlenPagedAttention)
sets KVZAP_ERR_BOUND_EXCEEDED instead of silently dropping leavers or keys, and the wrappers turn
the flag into KernelBoundError. GPU only; the flag's decoding is tested on CPU."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.errors import CacheFullError
from kvzap_trt.ops import cuda_kernels
from tests.cache_sim import chunk_args, make_cache, random_seq


def test_error_flags_decode_to_the_right_exception():
    cuda_kernels.raise_kernel_error(0)  # no bit: nothing raised
    with pytest.raises(CacheFullError, match="exhausted"):
        cuda_kernels.raise_kernel_error(cuda_kernels.ERR_POOL_EXHAUSTED)
    with pytest.raises(CacheFullError, match="block table"):
        cuda_kernels.raise_kernel_error(cuda_kernels.ERR_BLOCK_TABLE_FULL)
    with pytest.raises(cuda_kernels.KernelBoundError, match="max_new_tokens or max_keys"):
        cuda_kernels.raise_kernel_error(cuda_kernels.ERR_BOUND_EXCEEDED)


def test_error_bits_match_the_c_header():
    header = (cuda_kernels.PLUGINS / "include" / "kvzap_kernels.h").read_text()
    for name in ("POOL_EXHAUSTED", "BLOCK_TABLE_FULL", "BOUND_EXCEEDED"):
        assert f"KVZAP_ERR_{name} = {getattr(cuda_kernels, 'ERR_' + name)}" in header


def evict_call(cache, seq, n: int, max_new_tokens: int) -> torch.Tensor:
    """torch.ops.kvzap_trt.evict_append of n new tokens with the given bound -> error flag [1]."""
    k, v, sc, cu, slots, ctx = chunk_args(cache, [seq], [n])
    error = torch.zeros(1, dtype=torch.int32, device="cuda")
    lc, a = cache.layer(0), cache.allocator
    torch.ops.kvzap_trt.evict_append(
        k, v, sc, cu.cuda(), slots.cuda(), ctx.cuda(), lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool, lc.block_table,
        lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t, error, cache.spec.window, 0.0, max_new_tokens,
        torch.cuda.current_stream().cuda_stream)
    return error


@pytest.mark.gpu
@pytest.mark.parametrize("n,max_new_tokens,flagged", [
    (5000, 4096, True),    # chunked path: its grid covers 2 chunks of 2048, the sequence needs 3
    (5000, 5000, False),
    (300, 299, True),      # fused path, bound known and wrong
    (300, 0, False),       # fused path, bound unknown (0): no check
])
def test_evict_flags_a_max_new_tokens_below_the_real_count(n, max_new_tokens, flagged):
    cuda_kernels.load()
    cache = make_cache(H=2, D=64, W=128, bs=16, num_blocks=1024, max_seq_len=8192, device="cuda")
    seq = random_seq(cache, n, torch.Generator().manual_seed(0))
    free = cache.allocator.num_free
    error = evict_call(cache, seq, n, max_new_tokens)
    assert int(error.item()) == (cuda_kernels.ERR_BOUND_EXCEEDED if flagged else 0)
    if flagged:  # nothing taken (kept or window pages), nothing appended
        assert cache.allocator.num_free == free and int(cache.kept_len.sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("max_keys,flagged", [(600, False), (599, False), (256, True), (1, True)])
def test_attention_flags_a_max_keys_below_a_rows_keys(max_keys, flagged):
    """A row with 568 kept + 32 window + 1 new = 601 keys, split_size 64: 599 still rounds up to
    enough splits (10 x 64 = 640), 256 (4 splits) and 1 do not."""
    cuda_kernels.load()
    cache = make_cache(H=2, D=64, W=32, bs=16, num_blocks=1024, device="cuda", dtype=torch.float16)
    seq = random_seq(cache, 601, torch.Generator().manual_seed(1))
    seq.scores.fill_(1.0)
    evict_call(cache, seq, 600, 600)
    cache.ctx_len[seq.slot] = seq.written = 600
    k, v, _, cu, slots, ctx = chunk_args(cache, [seq], [1])
    q = torch.randn(1, 8, 64, device="cuda", dtype=torch.float16)
    split, workspace = cuda_kernels.split_and_workspace(q.dtype, 1, 1, 8, 2, 64, max_keys, q.device, split_size=64)
    out, error = torch.empty_like(q), torch.zeros(1, dtype=torch.int32, device="cuda")
    lc = cache.layer(0)
    torch.ops.kvzap_trt.paged_attention(
        q, k, v, cu.cuda(), slots.cuda(), ctx.cuda(), lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len, lc.ring_table,
        cache.spec.window, 0.125, max_keys, split, out, workspace, error, torch.cuda.current_stream().cuda_stream)
    assert int(error.item()) == (cuda_kernels.ERR_BOUND_EXCEEDED if flagged else 0)
