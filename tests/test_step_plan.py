"""The per-step plan (kvzap_trt/ops/interface.py): validation, routing, memoisation, and the ops
taking one plan for every layer of a step with the results of planning per call."""

import pytest
import torch

from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.errors import KvzapError
from kvzap_trt.ops import cpu_fast, cuda_kernels
from kvzap_trt.ops import evict_append as reference_evict
from kvzap_trt.ops.interface import StepPlan, key_bound
from kvzap_trt.ops.paged_attention import paged_attention as reference_attention

i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731


@pytest.mark.parametrize("cu,slots,ctx,match", [
    ([0, 2, 3], [0, 1], [5, 5], "cu_seqlens"),      # ends at 3 rows, N is 4
    ([0, 3, 2, 4], [0, 1, 2], [1, 1, 1], "cu_seqlens"),  # decreasing
    ([0, 2, 4], [0, 0], [5, 5], "seq_slots"),       # one slot twice: two blocks race on its heads
    ([0, 2, 4], [0, 4], [5, 5], "seq_slots"),       # slot past S = 4
    ([0, 2, 4], [0, 1], [5, -1], "ctx_lens"),
    ([0, 2, 4], [0, 1, 2], [5, 5, 5], "cu_seqlens"),  # B + 1 entries expected
])
def test_batch_description_values_are_checked_before_a_kernel_indexes_with_them(cu, slots, ctx, match):
    with pytest.raises(KvzapError, match=match):
        StepPlan.make(i32(cu), i32(slots), i32(ctx), 8, "cpu").validate(num_slots=4, num_rows=4)
    StepPlan.make(i32([0, 2, 4]), i32([3, 1]), i32([5, 0]), 8, "cpu").validate(num_slots=4, num_rows=4)  # valid


def test_device_copies_are_made_once_per_plan_and_stream():
    cu, slots, ctx = i32([0, 1, 301, 302]), i32([2, 0, 1]), i32([40000, 9, 0])
    plan = StepPlan.make(cu, slots, ctx, 16, "cpu")
    batch = cuda_kernels.device_batch(plan)
    assert cuda_kernels.device_batch(plan) is batch  # every layer of the step: the same copies
    assert batch.cu_seqlens.dtype == torch.int32 and batch.seq_slots.tolist() == [2, 0, 1]
    assert plan.max_chunk == 300 and plan.lens == (1, 300, 1)
    assert cuda_kernels.device_batch(StepPlan.make(cu, slots, ctx, 16, "cpu")) is not batch  # a new step, new copies


def test_an_op_refuses_a_plan_of_another_batch():
    cu, slots, ctx = i32([0, 1, 2]), i32([0, 1]), i32([3, 4])
    plan = StepPlan.make(cu, slots, ctx, 8, "cpu", max_kept=5)
    assert StepPlan.of(plan, cu, slots, ctx, 8, "cpu") is plan
    assert StepPlan.of(plan, cu, slots, ctx, 8, "cpu", max_kept=5) is plan
    with pytest.raises(KvzapError, match="another batch"):
        StepPlan.of(plan, cu.clone(), slots, ctx, 8, "cpu")  # equal values, not the step's tensors
    with pytest.raises(KvzapError, match="window 8 and max_kept 5"):
        StepPlan.of(plan, cu, slots, ctx, 16, "cpu")
    with pytest.raises(KvzapError, match="window 8 and max_kept 5"):
        StepPlan.of(plan, cu, slots, ctx, 8, "cpu", max_kept=7)
    assert StepPlan.of(None, cu, slots, ctx, 8, "cpu") is not plan
    with pytest.raises(KvzapError, match="made for cpu; the call's tensors are on meta"):
        StepPlan.of(plan, cu, slots, ctx, 8, "meta")


def test_routing_sorts_sequences_by_kind_once_per_step():
    # B = 5: decode (ctx 7), fresh prompt of 3, chunk of 2 over ctx 4, idle, one-token prompt.
    cu, slots, ctx = i32([0, 1, 4, 6, 6, 7]), i32([4, 0, 3, 1, 2]), i32([7, 0, 4, 9, 0])
    plan = StepPlan.make(cu, slots, ctx, 8, "cpu", max_kept=3)
    route = plan.routing(chunks=True)
    assert plan.routing(chunks=True) is route
    assert route.fresh == ((1, 4),) and route.chunks == ((4, 6, 3, 4),)
    rest = route.rest
    assert rest.cu == (0, 1, 1, 2) and rest.slots == (4, 1, 2) and rest.ctx == (7, 9, 0)
    assert route.rest_rows.tolist() == [0, 6] and rest.max_kept == 3 and rest.window == 8
    kept_chunks = plan.routing(chunks=False)  # a kernel that takes the chunk rows itself
    assert kept_chunks.chunks == () and kept_chunks.rest.slots == (4, 3, 1, 2)
    assert kept_chunks.rest_rows.tolist() == [0, 4, 5, 6]
    decode = StepPlan.make(i32([0, 1, 2]), i32([1, 0]), i32([5, 6]), 8, "cpu")
    assert decode.routing(chunks=True).rest is decode and decode.routing(chunks=True).rest_rows is None
    empty = StepPlan.make(i32([0]), i32([]), i32([]), 8, "cpu").routing(chunks=True)
    assert empty.rest is None and empty.fresh == () and empty.chunks == ()


def test_key_bound_is_the_plans_and_follows_max_kept():
    cu, slots, ctx = i32([0, 1, 2]), i32([0, 1]), i32([1000, 40])
    assert StepPlan.make(cu, slots, ctx, 16, "cpu", max_kept=100).key_bound == key_bound((0, 1, 2), (1000, 40), 16, 100)
    assert StepPlan.make(cu, slots, ctx, 16, "cpu", max_kept=100).key_bound == 100 + 16 + 1
    assert StepPlan.make(cu, slots, ctx, 16, "cpu").key_bound == 1000 + 1


def mixed_step(seed: int = 0, device: str = "cpu", D: int = 8, dtype: torch.dtype = torch.float32):
    """A 3-layer cache holding history for 3 of 5 sequences, and one step over all 5: decode
    (ctx 7), a fresh prompt of 3, a chunk of 2 over ctx 4, an idle sequence (ctx 9), a one-token
    prompt. Deterministic in `seed`, so two calls build identical caches. -> (cache, (q, k, v,
    scores) on `device`, (cu_seqlens, seq_slots, ctx_lens) host int32)."""
    g = torch.Generator().manual_seed(seed)
    spec = CacheSpec(3, 2, D, 4, 4, 512, 5, 256, dtype)  # L, H, D, W, bs, blocks, S, max len
    cache = PagedKVCache(spec, device)
    slots = [cache.add_sequence() for _ in range(5)]
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    history = {0: 7, 2: 4, 3: 9}
    for b, c in history.items():
        for layer in range(spec.num_layers):
            lc, a = cache.layer(layer), cache.allocator
            reference_evict.evict_append(rand(c, 2, D).to(dtype), rand(c, 2, D).to(dtype), rand(c, 2), i32([0, c]),
                                         i32([slots[b]]), i32([0]), lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool,
                                         lc.block_table, lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t,
                                         spec.window, 0.0)
    lens, ctx = [1, 3, 2, 0, 1], [7, 0, 4, 9, 0]
    cu = i32([0, *torch.tensor(lens).cumsum(0).tolist()])
    N = int(cu[-1])
    step = (rand(N, 4, D).to(dtype), rand(N, 2, D).to(dtype), rand(N, 2, D).to(dtype), rand(N, 2))
    return cache, step, (cu, i32(slots), i32(ctx))


def run_layers(cache, step, batch, attend, evict, **kw) -> list[torch.Tensor]:
    """Attention then eviction, layer by layer, of one step (the executor's order) -> each layer's output."""
    (q, k, v, scores), (cu, slots, ctx), W = step, batch, cache.spec.window
    outs = []
    for layer in range(cache.spec.num_layers):
        lc, a = cache.layer(layer), cache.allocator
        outs.append(attend(q, k, v, cu, slots, ctx, lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len, lc.ring_table,
                           W, 0.125, **kw))
        evict(k, v, scores, cu, slots, ctx, lc.k_pool, lc.v_pool, lc.pos_pool, lc.score_pool, lc.block_table,
              lc.kept_len, lc.ring_table, a.free_stack, a.num_free_t, W, 0.0, **kw)
    return outs


def test_one_plan_serves_every_layer_as_the_reference_computes(monkeypatch):
    """The CPU fast path given the step's plan for every layer (attention, then eviction, layer by
    layer) equals the reference, and derives its decode rows once per plan, not per layer."""
    calls = []
    of = cpu_fast.DecodeRows.of
    monkeypatch.setattr(cpu_fast.DecodeRows, "of", classmethod(lambda cls, plan: calls.append(plan) or of(plan)))
    (cache, step, batch), (ref, _, _) = mixed_step(), mixed_step()
    plan = StepPlan.make(*batch, cache.spec.window, "cpu")
    outs = run_layers(cache, step, batch, cpu_fast.paged_attention, cpu_fast.evict_append, plan=plan)
    ref_outs = run_layers(ref, step, batch, reference_attention, reference_evict.evict_append)
    for out, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.kept_len, ref.kept_len) and cache.allocator.num_free == ref.allocator.num_free
    assert cache.kept_len.sum() > 0
    # Once for the attention's decode sub-batch, once for the eviction's step: 2 for 3 layers.
    assert len(calls) == 2 and calls[1] is plan


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_with_one_plan_per_step_equal_the_reference(monkeypatch, dtype):
    """The kernels' wrapper given one plan for every layer of a mixed step: outputs as the
    reference's (tolerance relative to its own rounding), the same kept lengths and pool use, and
    the attention's split and workspace made once for the step, not per layer."""
    cuda_kernels.load()
    made = []
    split = cuda_kernels.split_and_workspace
    monkeypatch.setattr(cuda_kernels, "split_and_workspace", lambda *a, **k: made.append(a) or split(*a, **k))
    (cache, step, batch), (ref, _, _) = mixed_step(0, "cuda", 64, dtype), mixed_step(0, "cuda", 64, dtype)
    plan = StepPlan.make(*batch, cache.spec.window, cache.k_pool.device)
    with cuda_kernels.deferred_errors(cache.device):
        outs = run_layers(cache, step, batch, cuda_kernels.paged_attention, cuda_kernels.evict_append, plan=plan)
    ref_outs = run_layers(ref, step, batch, reference_attention, reference_evict.evict_append)
    # bf16: each side rounds once (half an ulp, 2^-8 relative) and the kernel's P passes through bf16.
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2**-7)
    for out, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
    assert torch.equal(cache.kept_len, ref.kept_len) and cache.allocator.num_free == ref.allocator.num_free
    assert len(made) == 1  # the decode sub-batch's split and workspace, for 3 layers


def test_the_attention_plugins_max_keys_length_follows_the_plan_rounded_and_capped():
    """export.plugins.max_keys_length: the step's key bound rounded up to KEY_BOUND_QUANTUM, at most
    the plugin's capacity bound M * block_size + W + N, at least 1."""
    from kvzap_trt.export.plugins import KEY_BOUND_QUANTUM, max_keys_length

    cu, ctx = (0, 1, 2), (1000, 40)  # decode of two sequences
    exact = key_bound(cu, ctx, 16, 100)  # 100 kept + 16 window + 1
    assert max_keys_length(cu, ctx, 16, 100, 2048, 16) == KEY_BOUND_QUANTUM >= exact
    assert max_keys_length(cu, ctx, 16, 300, 2048, 16) == 2 * KEY_BOUND_QUANTUM  # 317 keys
    assert max_keys_length(cu, ctx, 16, None, 2048, 16) == 4 * KEY_BOUND_QUANTUM  # uncompressed: 1001
    assert max_keys_length(cu, ctx, 16, None, 4, 16) == 4 * 16 + 16 + 2  # capped at the capacity
    assert max_keys_length((0,), (), 16, None, 4, 16) == 1  # an empty step still binds one element
