"""The runtime: continuous batching equals one-by-one, sampling, stop tokens, limits, blocks."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.config import RunConfig
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.sampler import SamplingParams, sample
from tests.tiny_models import random_prompts


@pytest.fixture
def runtime(tiny_llama_runtime):
    return tiny_llama_runtime


def prompts(lengths, seed=0):
    return random_prompts(lengths, seed)


@pytest.mark.parametrize("temperature", [0.0, 1.5])  # sampled: each request draws from its own generator
def test_batch_of_uneven_prompts_equals_one_by_one(runtime, temperature):
    ps = prompts([5, 40, 90, 17])
    sp = runtime.sampling(temperature=temperature, seed=3, stop_token_ids=())
    together = runtime.generate(ps, sp, positions=True)
    for p, got in zip(ps, together):
        alone = runtime.generate([p], sp, positions=True)[0]
        assert got.token_ids == alone.token_ids
        assert got.kv == alone.kv
    assert any(r.kv["compression_ratio"] > 0 for r in together)
    if temperature:  # it really sampled
        greedy = runtime.generate(ps, runtime.sampling(stop_token_ids=()))
        assert [r.token_ids for r in together] != [r.token_ids for r in greedy]


def test_seeded_sampling_is_reproducible_and_seed_dependent(runtime):
    p = prompts([30])
    runs = {seed: runtime.generate(p, runtime.sampling(temperature=1.5, seed=seed, stop_token_ids=()))[0].token_ids
            for seed in range(4)}
    again = runtime.generate(p, runtime.sampling(temperature=1.5, seed=2, stop_token_ids=()))[0].token_ids
    assert again == runs[2]
    assert len({tuple(v) for v in runs.values()}) > 1


def test_top_k_1_and_tiny_top_p_are_greedy(runtime):
    p = prompts([25], seed=1)
    greedy = runtime.generate(p, runtime.sampling(stop_token_ids=()))[0].token_ids
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        got = runtime.generate(p, runtime.sampling(temperature=2.0, seed=5, stop_token_ids=(), **kw))[0].token_ids
        assert got == greedy


def test_stop_token_ends_generation(runtime):
    p = prompts([25], seed=2)
    greedy = runtime.generate(p, runtime.sampling(stop_token_ids=()))[0].token_ids
    stop = greedy[3]
    got = runtime.generate(p, runtime.sampling(stop_token_ids=(stop,)))[0]
    assert got.token_ids == greedy[: greedy.index(stop) + 1]
    assert got.finish_reason == "stop"


def test_context_limit_ends_generation(runtime):
    limit = runtime.loaded.config.max_position_embeddings
    got = runtime.generate(prompts([limit - 3]), runtime.sampling(max_new_tokens=50, stop_token_ids=()))[0]
    assert len(got.token_ids) == 3 and got.finish_reason == "length"
    assert got.kv["tokens"] == limit - 1  # the last sampled token is never fed


def test_kv_report_is_consistent_with_the_cache_layout(runtime):
    got = runtime.generate(prompts([120]), runtime.sampling(stop_token_ids=()), positions=True)[0]
    kv, m = got.kv, runtime.loaded.config
    tokens = 120 + len(got.token_ids) - 1
    assert kv["tokens"] == tokens
    assert kv["kept"] == [[len(h) for h in layer] for layer in kv["positions"]]
    ratio = 1 - sum(map(sum, kv["kept"])) / (m.num_layers * m.num_kv_heads * tokens)
    assert kv["compression_ratio"] == pytest.approx(ratio)


def test_reported_bytes_are_the_bytes_the_cache_holds(runtime):
    """bytes_allocated: the pool blocks a sequence holds, kept and window pages (K, V, positions,
    scores), measured on the tensors after every step; bytes_dense: an uncompressed K/V tensor. A
    short sequence's window pages are only those its tokens reach."""
    from kvzap_trt.runtime.engine import Engine, EvictionPolicy

    cache = runtime.make_cache(max_seq_len=256, max_seqs=2, num_blocks=2000)
    engine = Engine(runtime.loaded.model, cache, EvictionPolicy(runtime.surrogate, 0.0), 1024)
    for p in prompts([120, 37], seed=9):
        engine.submit(p, SamplingParams(max_new_tokens=8))
    block = sum(pool[0].nbytes for pool in (cache.k_pool, cache.v_pool, cache.pos_pool, cache.score_pool))
    spec, checked = cache.spec, 0
    while engine.has_work():
        engine.step()
        for r in engine.running:
            held_ids = torch.cat([cache.block_table[:, r.slot].flatten(), cache.ring_table[:, r.slot].flatten()])
            held = held_ids[held_ids >= 0].unique().numel()
            tokens = cache.ctx_len[r.slot]
            window = int((cache.ring_table[:, r.slot] >= 0).sum())
            assert window == spec.num_layers * spec.num_kv_heads * -(-min(tokens, spec.window) // spec.block_size)
            dense = torch.empty(tokens, spec.num_layers, spec.num_kv_heads, 2, spec.head_dim, dtype=spec.dtype)
            kv = cache.stats(r.slot)
            assert kv["bytes_allocated"] == held * block
            assert kv["bytes_dense"] == dense.nbytes
            if tokens > 2 * spec.window:
                assert held * block < dense.nbytes  # eviction really saves pool memory here
            checked += 1
    assert checked >= 10


def test_dense_policy_keeps_everything(tiny_dirs):
    cfg = RunConfig(model=str(tiny_dirs["qwen3"]), surrogate=None, window=4, max_new_tokens=3).validate()
    got = Runtime.from_config(cfg).generate(prompts([50]), positions=True)[0]
    assert got.kv["compression_ratio"] == 0
    assert all(h == list(range(got.kv["tokens"])) for layer in got.kv["positions"] for h in layer)


def test_all_blocks_return_to_the_pool(runtime):
    from kvzap_trt.runtime.engine import Engine, EvictionPolicy

    cache = runtime.make_cache(max_seq_len=200, max_seqs=2, num_blocks=2000)
    engine = Engine(runtime.loaded.model, cache, EvictionPolicy(runtime.surrogate, 0.0), 1024)
    for p in prompts([60, 100, 30, 7]):  # four requests through two slots
        engine.submit(p, SamplingParams(max_new_tokens=6))
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, cache.allocator.num_used)
        assert len(engine.running) <= 2
    assert peak > 0 and cache.allocator.num_free == 2000 and len(cache.free_slots) == 2


def test_sampler_cuts():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    seen_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(300)}
    seen_k = {sample(logits, SamplingParams(temperature=1.0, top_k=3), g) for _ in range(300)}
    assert seen_p == {0, 1}
    assert seen_k == {0, 1, 2}


def run_engine(runtime, ps, num_blocks, max_seqs, max_new=12, temperature=0.0):
    """Requests i = 0.. with seed i (sampled when temperature > 0), run to the end."""
    from kvzap_trt.runtime.engine import Engine, EvictionPolicy

    cache = runtime.make_cache(max_seq_len=256, max_seqs=max_seqs, num_blocks=num_blocks)
    engine = Engine(runtime.loaded.model, cache, EvictionPolicy(runtime.surrogate, 0.0), 1024)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=i))
            for i, p in enumerate(ps)]
    engine.run()
    assert cache.allocator.num_free == num_blocks
    return reqs


@pytest.mark.parametrize("temperature", [0.0, 1.5])  # sampled: a restart reseeds its request's generator
def test_preemption_under_a_tight_pool_keeps_outputs(runtime, temperature):
    ps = prompts([70, 90, 60, 80], seed=4)
    roomy = run_engine(runtime, ps, num_blocks=4000, max_seqs=4, max_new=40, temperature=temperature)
    tight = run_engine(runtime, ps, num_blocks=180, max_seqs=4, max_new=40, temperature=temperature)
    assert [r.output_ids for r in tight] == [r.output_ids for r in roomy]
    assert sum(r.preemptions for r in tight) > 0  # the pool really was too small for all at once
    if temperature:  # and the first request alone (seed 0 too), in a pool of its own, gives the same tokens
        (alone,) = run_engine(runtime, ps[:1], num_blocks=4000, max_seqs=1, max_new=40, temperature=temperature)
        assert alone.output_ids == roomy[0].output_ids


def test_exact_step_bound_is_never_exceeded(runtime):
    from kvzap_trt.runtime.engine import Engine, EvictionPolicy

    cache = runtime.make_cache(max_seq_len=256, max_seqs=3, num_blocks=3000)
    engine = Engine(runtime.loaded.model, cache, EvictionPolicy(None, 0.0), 1024)  # dense: every leaver kept
    for p in prompts([20, 33, 47], seed=5):
        engine.submit(p, SamplingParams(max_new_tokens=30))
    engine.step()  # prefill all three
    tight_steps = 0
    while engine.running:
        predicted = sum(cache.blocks_needed(r.slot, 1) for r in engine.running)
        before = cache.allocator.num_free
        finished = engine.step()
        if not finished:
            taken = before - cache.allocator.num_free
            assert taken <= predicted
            tight_steps += taken == predicted > 0
    assert tight_steps > 0  # with nothing evicted the bound is met exactly when blocks fill


def test_a_request_the_pool_can_never_finish_fails_alone(runtime):
    # 60 prompt tokens fit the pool; 200 more, half of them kept, do not.
    (r,) = run_engine(runtime, prompts([60], seed=4), num_blocks=100, max_seqs=1, max_new=200)
    assert r.finish_reason == "error" and "cannot hold this request past" in r.error
    assert 0 < len(r.output_ids) < 200


def test_abort_returns_blocks(runtime):
    from kvzap_trt.runtime.engine import Engine, EvictionPolicy

    cache = runtime.make_cache(max_seq_len=256, max_seqs=2, num_blocks=500)
    engine = Engine(runtime.loaded.model, cache, EvictionPolicy(runtime.surrogate, 0.0), 1024)
    a, b, c = (engine.submit(p, SamplingParams(max_new_tokens=50)) for p in prompts([80, 90, 10], seed=6))
    engine.step()
    assert cache.allocator.num_used > 0 and c in engine.waiting
    engine.abort(a)
    engine.abort(c)
    assert a.finish_reason == c.finish_reason == "cancelled" and c not in engine.waiting
    engine.run()
    assert b.finish_reason == "length" and cache.allocator.num_free == 500


@pytest.mark.parametrize("choice", ["reference", "auto"])  # the references, and the CPU fast path
@pytest.mark.parametrize("chunk", [None, 16])
def test_a_request_that_opts_out_keeps_every_token_beside_evicting_ones(tiny_dirs, monkeypatch, choice, chunk):
    # evict=False: that request's cache is what a dense runtime gives it; the others' what they
    # get without it beside them, evictions included.
    monkeypatch.setenv("KVZAP_TRT_OPS", choice)
    cfg = RunConfig(model=str(tiny_dirs["llama"]), surrogate="random:mlp:3", threshold=0.0, window=8,
                    block_size=4, max_num_tokens=chunk).validate()
    rt = Runtime.from_config(cfg)
    dense = Runtime(cfg, rt.loaded, None)
    ps = prompts([60, 45, 30], seed=5)
    sp = rt.sampling(max_new_tokens=12, stop_token_ids=())
    engine, reqs = rt.start(ps, sp, positions=True, evict=[True, False, True])
    assert engine.ops.name == ("reference" if choice == "reference" else "cpu")
    engine.run()
    got = [rt.result(r) for r in reqs]
    (want_dense,) = dense.generate([ps[1]], sp, positions=True)
    assert (got[1].token_ids, got[1].kv) == (want_dense.token_ids, want_dense.kv)
    assert got[1].kv["compression_ratio"] == 0
    others = rt.generate([ps[0], ps[2]], sp, positions=True)
    for g, w in zip([got[0], got[2]], others):
        assert (g.token_ids, g.kv) == (w.token_ids, w.kv) and g.kv["compression_ratio"] > 0
