"""Chunked prefill (`max_num_tokens`): chunk boundaries, the step budget, interleaving with
decodes, load independence, and serving prompts whose uncompressed cache exceeds the pool."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.ops import dispatch
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.sampler import SamplingParams
from tests.tiny_models import random_prompts


@pytest.fixture
def runtime(tiny_llama_runtime):
    return tiny_llama_runtime


def prompts(lengths, seed=0):
    return random_prompts(lengths, seed)


class StepLog:
    """Wraps an engine's executor's forward: {slot: new tokens} of every step."""

    def __init__(self, engine: Engine):
        self.steps: list[dict[int, int]] = []
        forward = engine.executor.forward

        def logged(step, cache):
            lens = (step.cu_seqlens[1:] - step.cu_seqlens[:-1]).tolist()
            self.steps.append(dict(zip(step.seq_slots.tolist(), lens)))
            return forward(step, cache)

        engine.executor.forward = logged


def engine_for(runtime, chunk, num_blocks=4000, max_seqs=4, surrogate="keep", compress_decoding=True):
    policy = EvictionPolicy(runtime.surrogate if surrogate == "keep" else surrogate, 0.0, compress_decoding)
    cache = runtime.make_cache(max_seq_len=512, max_seqs=max_seqs, num_blocks=num_blocks)
    return Engine(runtime.loaded.model, cache, policy, 1024, record_positions=True, max_num_tokens=chunk)


def run(engine, ps, max_new=8, log=False):
    steps = StepLog(engine) if log else None
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=max_new)) for p in ps]
    engine.run()
    assert engine.cache.allocator.num_free == engine.cache.spec.num_blocks
    return (reqs, steps) if log else reqs


def outputs(reqs):
    return [(r.output_ids, r.kv["positions"], r.finish_reason) for r in reqs]


def test_without_eviction_chunks_change_nothing(runtime):
    # Nothing evicted: a chunk attends to every earlier prompt token, so tokens and caches equal
    # the whole-prompt prefill's, whatever the chunk size.
    ps = prompts([70, 33, 5], seed=1)
    whole = outputs(run(engine_for(runtime, None, surrogate=None), ps))
    for chunk in (1, 16, 29):
        assert outputs(run(engine_for(runtime, chunk, surrogate=None), ps)) == whole


def test_a_chunk_as_long_as_the_prompt_is_the_whole_prefill(runtime):
    ps = prompts([64, 40], seed=2)
    whole = outputs(run(engine_for(runtime, None), ps))
    assert any(kv for _, kv, _ in whole)
    assert outputs(run(engine_for(runtime, 64), ps)) == whole


def test_later_chunks_attend_to_the_compressed_cache(runtime):
    # With eviction, a 100-token prompt in 24-token chunks differs from its whole prefill (its
    # later chunks see the earlier ones compressed), and the reference ops agree with the fast path.
    (p,) = prompts([100], seed=3)
    whole = outputs(run(engine_for(runtime, None), [p], max_new=12))
    chunked = outputs(run(engine_for(runtime, 24), [p], max_new=12))
    assert chunked != whole
    reference = engine_for(runtime, 24)
    reference.ops = dispatch.REFERENCE
    assert outputs(run(reference, [p], max_new=12)) == chunked


def test_steps_hold_the_budget_and_decodes_go_on_during_a_long_prefill(runtime):
    short, long_ = prompts([6, 150], seed=4)
    engine = engine_for(runtime, 32, max_seqs=2)
    (a, b), log = run(engine, [short, long_], max_new=12, log=True)
    assert a.finish_reason == b.finish_reason == "length"
    # Slots 0 (short) and 1 (long). Step 1: the short prompt (6); the long one's first chunk (32)
    # no longer fits the step's 32 prompt tokens, so it starts in step 2 and takes the 32-token
    # chunks of its grid, one per step, while the short request decodes beside it.
    assert log.steps[0] == {0: 6}
    assert [s[1] for s in log.steps[1:6]] == [32, 32, 32, 32, 22]
    assert all(s[0] == 1 for s in log.steps[1:6])
    assert all(set(s.values()) == {1} for s in log.steps[6:])  # then both decode
    assert len(log.steps) == 6 + 11  # b's last chunk (step 6) samples its first token, 11 decodes follow


def test_chunk_boundaries_do_not_depend_on_the_load(runtime):
    # A request's output is the same alone and among others that take parts of each step's budget
    # (decodes, other prompts' chunks, preemptions under a tight pool): chunks sit on a fixed grid.
    target = prompts([90], seed=5)[0]
    alone = outputs(run(engine_for(runtime, 20), [target], max_new=10))[0]
    others = prompts([13, 50, 7], seed=6)
    busy = run(engine_for(runtime, 20), [*others[:2], target, others[2]], max_new=10)
    assert outputs(busy)[2] == alone
    tight = engine_for(runtime, 20, num_blocks=160)
    squeezed = run(tight, [*others[:2], target, others[2]], max_new=10)
    assert outputs(squeezed) == outputs(busy)
    assert sum(r.preemptions for r in squeezed) > 0  # the pool really was too small for all at once


def test_a_prompt_larger_than_the_pool_is_served_when_eviction_keeps_it_small(runtime):
    # 400 tokens x 3 layers x 4 heads uncompressed need 600+ blocks of 8; the pool has 330.
    ps = prompts([400], seed=7)
    engine = engine_for(runtime, None, num_blocks=330, max_seqs=1)
    with pytest.raises(CacheFullError, match="a 400-token prompt may need"):
        engine.submit(ps[0], SamplingParams(max_new_tokens=4))
    (r,) = run(engine_for(runtime, 32, num_blocks=330, max_seqs=1), ps, max_new=4)
    assert r.finish_reason == "length" and len(r.output_ids) == 4
    assert r.kv["compression_ratio"] > 0.5
    # Without eviction the same pool cannot: refused at submission (its dense size is known) ...
    dense = engine_for(runtime, 32, num_blocks=330, max_seqs=1, surrogate=None)
    with pytest.raises(CacheFullError, match="a 400-token prompt may need"):
        dense.submit(ps[0], SamplingParams(max_new_tokens=4))
    # ... and with eviction, a pool too small even for the compressed prompt fails it alone.
    (r,) = run(engine_for(runtime, 32, num_blocks=120, max_seqs=1), ps, max_new=4)
    assert r.finish_reason == "error" and "cannot hold this request past" in r.error and "prompt tokens" in r.error


def test_no_compress_decoding_pins_the_window_after_the_last_chunk_only(runtime):
    # kvpress decoding=False: the prompt is compressed, generated tokens never are. Chunked, the
    # earlier chunks' windows must still be evicted from, and after the prompt nothing is.
    (p,) = prompts([120], seed=8)
    (r,) = run(engine_for(runtime, 40, compress_decoding=False), [p], max_new=30)
    tokens = r.kv["tokens"]
    assert tokens == 120 + 29
    for layer in r.kv["positions"]:
        for held in layer:
            assert set(range(120 - 16, tokens)) <= set(held)  # the prompt's last window and every new token
    assert r.kv["compression_ratio"] > 0


def test_an_executor_limit_lowers_the_budget(runtime):
    engine = engine_for(runtime, 64)
    assert engine.max_num_tokens == 64
    engine.executor.max_num_tokens = 24  # what a TensorRT engine reports (its prefill profile's chunk)
    again = Engine(runtime.loaded.model, engine.cache, engine.policy, 1024, executor=engine.executor, max_num_tokens=64)
    assert again.max_num_tokens == 24
    assert Engine(runtime.loaded.model, engine.cache, engine.policy, 1024, executor=engine.executor).max_num_tokens == 24
    with pytest.raises(KvzapError, match="max_num_tokens must be >= 1, got 0"):
        engine_for(runtime, 0)


def test_runtime_and_config_carry_max_num_tokens(runtime):
    (p,) = prompts([80], seed=9)
    chunked_rt = Runtime(replace(runtime.cfg, max_num_tokens=24), runtime.loaded, runtime.surrogate)
    got = chunked_rt.generate([p], positions=True)[0]
    expected = outputs(run(engine_for(runtime, 24), [p], max_new=runtime.cfg.max_new_tokens))[0]
    assert (got.token_ids, got.kv["positions"]) == expected[:2]
    with pytest.raises(KvzapError, match="max_num_tokens must be >= 1"):
        replace(runtime.cfg, max_num_tokens=0).validate()


def test_a_preempted_prompt_waits_for_the_room_it_had(runtime):
    # A decodes for long while B's 300-token prompt is prefilled in 32-token chunks; the pool
    # fills and B, the youngest, is preempted. Re-admitted as soon as its first chunk fits, B
    # would be preempted again and again (65 restarts here before the fix); it waits until the
    # blocks it held are free, restarts once, and both outputs equal a roomy pool's.
    a, b = prompts([40, 300], seed=11)

    def serve(num_blocks):
        engine = engine_for(runtime, 32, num_blocks=num_blocks, max_seqs=2)
        log = StepLog(engine)
        reqs = [engine.submit(a, SamplingParams(max_new_tokens=200)), engine.submit(b, SamplingParams(max_new_tokens=5))]
        engine.run()
        return reqs, sum(n for step in log.steps for n in step.values())

    (ra, rb), fed = serve(250)
    assert ra.finish_reason == rb.finish_reason == "length"
    assert rb.preemptions == 1 and ra.preemptions == 0
    assert fed < 40 + 2 * 300 + 199 + 4 + 32  # one restart of B's prompt at most, none of A's
    roomy, _ = serve(4000)
    assert outputs([ra, rb]) == outputs(roomy)


def test_kv_coe_of_a_prompt_that_failed_part_way_is_none(runtime):
    # The pool cannot hold even the compressed 400-token prompt: it fails alone past 96 prompt
    # tokens. KV-CoE scores an answer after a whole prompt, so its score is None, and the other
    # request is unharmed (the step used to raise and take every request down with it).
    (p,) = prompts([400], seed=7)
    engine = engine_for(runtime, 32, num_blocks=120, max_seqs=2)
    engine.record_kv_coe = True
    big = engine.submit(p, SamplingParams(max_new_tokens=4), kv_coe=True)
    small = engine.submit(prompts([5], seed=1)[0], SamplingParams(max_new_tokens=4), kv_coe=True)
    engine.run()
    assert big.finish_reason == "error" and "past 96 prompt tokens" in big.error
    assert big.kv_coe_score is None and big.kv_coe_features is None
    assert small.finish_reason == "length" and small.kv_coe_features is not None
    assert engine.cache.allocator.num_free == 120
