"""The scheduler alone (kvzap_trt/runtime/scheduler.py): a real cache's block accounting, no model.
What one `schedule()` returns, how `advance` and `update` move requests on, aborts and failures.
The engine's behaviour through it (preemption with outputs kept, chunked prefill) is in
test_runtime.py and test_chunked_prefill.py."""

from __future__ import annotations


from kvzap_trt.cache.paged_cache import CacheSpec, PagedKVCache
from kvzap_trt.runtime.sampler import SamplingParams
from kvzap_trt.runtime.scheduler import Request, Scheduler


def make(max_num_tokens=None, evicts=True, max_seqs=4, num_blocks=4000, max_seq_len=64):
    cache = PagedKVCache(CacheSpec(2, 2, 4, window=4, block_size=4, num_blocks=num_blocks, max_seqs=max_seqs,
                                   max_seq_len=max_seq_len))
    finished = []

    def finish(r, reason):
        r.finish_reason, r.finished = reason, True
        finished.append(r)
        sched.release(r)

    sched = Scheduler(cache, max_num_tokens, evicts, max_seq_len)
    return sched, finish, finished


def request(n, rid, **sampling):
    return Request(list(range(1, n + 1)), SamplingParams(**sampling), rid)


def test_prompts_are_admitted_whole_in_arrival_order_without_a_budget():
    sched, finish, _ = make()
    reqs = [request(n, i) for i, n in enumerate((10, 6, 3))]
    for r in reqs:
        sched.add(r)
    out = sched.schedule(finish)
    assert out.work == [(r, len(r.prompt_ids)) for r in reqs]
    assert out.feeds == [r.prompt_ids for r in reqs] and out.is_decode == [False] * 3
    assert out.failed == [] and out.max_kept == 0 and not sched.waiting
    assert len({r.slot for r in reqs}) == 3 and sched.running == reqs


def test_the_budget_cuts_prompts_into_chunks_and_admits_first_come_first_served():
    sched, finish, _ = make(max_num_tokens=12)
    a, b, c = request(20, 0), request(6, 1), request(3, 2)
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule(finish)
    assert out.work == [(a, 12)] and out.feeds == [a.prompt_ids[:12]]
    assert list(sched.waiting) == [b, c]  # c would fit the 0 left, but b waits first: no overtaking
    assert sched.advance(out) == [] and a.prefilled == 12 and a.prefilling
    out = sched.schedule(finish)  # a's last 8 tokens, then b would need 6 > 4 left
    assert out.work == [(a, 8)] and out.feeds == [a.prompt_ids[12:]]
    assert sched.advance(out) == [a] and not a.prefilling


def test_slots_and_free_blocks_bound_admission():
    sched, finish, _ = make(max_seqs=2)
    reqs = [request(5, i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert [r for r, _ in sched.schedule(finish).work] == reqs[:2] and list(sched.waiting) == reqs[2:]

    cost = CacheSpec(2, 2, 4, 4, 4, 1, 1, 64).prefill_blocks(40)  # a 40-token prompt's worst case
    sched, finish, _ = make(num_blocks=cost + 1)
    big, small = request(40, 0), request(40, 1)
    sched.add(big)
    sched.add(small)
    assert [r for r, _ in sched.schedule(finish).work] == [big] and list(sched.waiting) == [small]


def test_admission_counts_the_first_chunk_only_when_a_surrogate_evicts():
    # a prompt whose whole uncompressed cache exceeds the pool: admitted with eviction and chunks
    spec = CacheSpec(2, 2, 4, 4, 4, 1, 1, 64)
    pool = spec.prefill_blocks(16)
    assert spec.prefill_blocks(48) > pool
    # A request that opts out of eviction (evict=False) counts as without a surrogate.
    for evicts, opt_out, admitted in ((True, False, True), (False, False, False), (True, True, False)):
        sched, finish, _ = make(max_num_tokens=16, evicts=evicts, num_blocks=pool)
        r = request(48, 0)
        r.evict = not opt_out
        sched.add(r)
        assert bool(sched.schedule(finish).work) == admitted
        assert sched.first_step_tokens(48, r.evict) == (16 if admitted else 48)


def test_update_appends_tokens_and_applies_the_stop_rules():
    sched, finish, _ = make()
    stop, length, forced = (request(3, 0, stop_token_ids=(7,)), request(3, 1, max_new_tokens=2),
                            request(3, 2, stop_token_ids=(7,), max_new_tokens=5))
    forced.forced_ids = [7, 7]  # a stop id among forced ids does not stop
    for r in (stop, length, forced):
        sched.add(r)
    sched.advance(sched.schedule(finish))
    assert sched.update([stop, length, forced], [5, 5, 9]) == []
    assert (stop.output_ids, length.output_ids, forced.output_ids) == ([5], [5], [7])
    done = sched.update([stop, length, forced], [7, 6, 9])
    assert done == [stop, length] and (stop.finish_reason, length.finish_reason) == ("stop", "length")
    assert forced.output_ids == [7, 7] and forced.finish_reason is None
    assert sched.update([forced], [7]) == [forced] and forced.finish_reason == "stop"  # its own 7 stops it


def test_a_decode_feeds_its_last_token_and_comes_first():
    sched, finish, _ = make(max_num_tokens=8)
    a = request(4, 0)
    sched.add(a)
    sched.advance(sched.schedule(finish))
    sched.update([a], [11])
    b = request(6, 1)
    sched.add(b)
    out = sched.schedule(finish)
    assert out.work == [(a, 1), (b, 6)] and out.feeds == [[11], b.prompt_ids] and out.is_decode == [True, False]


def test_abort_frees_the_slot_and_drops_a_waiting_request():
    sched, finish, _ = make(max_seqs=1)
    a, b = request(4, 0), request(4, 1)
    sched.add(a)
    sched.add(b)
    sched.schedule(finish)
    free = len(sched.cache.free_slots)
    sched.abort(b)
    sched.abort(a)
    assert (a.finish_reason, b.finish_reason) == ("cancelled", "cancelled") and a.slot is None
    assert not sched.has_work() and len(sched.cache.free_slots) == free + 1


def test_a_request_the_pool_can_never_hold_fails_in_schedule():
    # alone and still too big: finished with "error" (kv_pool_exhausted) inside schedule(), its
    # slot released, and the step has no work for it
    from kvzap_trt.cache.allocator import pop_blocks

    sched, finish, finished = make()
    a = request(8, 0)
    sched.add(a)
    sched.advance(sched.schedule(finish))
    sched.update([a], [1])
    cache = sched.cache
    cache.ctx_len[a.slot] = 8  # what the forward wrote, as far as accounting goes: a full window,
    cache.kept_len[:, a.slot] = 4  # and a full kept block per head, so its next token may take L x H blocks
    assert cache.blocks_needed_many([a.slot], 1) == [2 * 2]
    pop_blocks(cache.allocator.free_stack, cache.allocator.num_free_t, cache.allocator.num_free - 3)  # 3 left
    out = sched.schedule(finish)
    assert out.work == [] and out.failed == finished == [a] and a.finish_reason == "error"
    assert a.error_code == "kv_pool_exhausted" and "cannot hold this request past 1 tokens" in a.error
    assert a.slot is None and not sched.running


def test_the_youngest_running_request_is_preempted_and_restarts_from_its_prompt():
    from kvzap_trt.cache.allocator import pop_blocks

    sched, finish, _ = make()
    old, young = request(8, 0, seed=3), request(8, 1, seed=3)
    for r in (old, young):
        sched.add(r)
    sched.advance(sched.schedule(finish))
    sched.update([old, young], [1, 2])
    cache = sched.cache
    for r in (old, young):
        cache.ctx_len[r.slot] = 8
        cache.kept_len[:, r.slot] = 4
    pop_blocks(cache.allocator.free_stack, cache.allocator.num_free_t, cache.allocator.num_free - 5)  # 4 + 4 > 5
    out = sched.schedule(finish)
    assert out.work == [(old, 1)] and out.feeds == [[1]]
    assert list(sched.waiting) == [young] and young.preemptions == 1
    assert (young.slot, young.output_ids, young.prefilled) == (None, [], 0)
    assert young.restart_blocks == 4  # it held none here, and its step needed L x H


def test_a_dropped_engine_frees_its_kv_pool_without_a_garbage_collection():
    # Runtime.generate builds an engine and a pool per batch: a reference cycle between the engine
    # and its scheduler would keep every old pool until the next full collection
    import gc
    import weakref

    from tests.test_device_reads import tiny_engine

    engine = tiny_engine(layers=1, max_seqs=2)
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2))
    engine.run()
    pool = weakref.ref(engine.cache.k_pool)
    gc.disable()
    try:
        del engine
        assert pool() is None
    finally:
        gc.enable()
