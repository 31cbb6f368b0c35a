"""The serving loop without Triton: streaming, concurrency, stop words, cancellation, refusals."""

from __future__ import annotations

import dataclasses

import threading
import time

import pytest

from kvzap_trt.config import resolve_config
from kvzap_trt.errors import INTERNAL_ERROR, KV_POOL_EXHAUSTED
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.serve.engine_loop import EngineLoop, Event, Job, streamable
from kvzap_trt.serve.protocol import BadRequest, GenerationParams
from kvzap_trt.serve.triton_core import triton_error_kind

PROMPTS = [
    "The capital of France is",
    "Write a list of three fruits:\n1.",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew "
    "were Neil Armstrong, Buzz Aldrin and Michael Collins. Armstrong was the first to step out,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def runtime(smollm2_dir):
    # A small window so that these short prompts really evict.
    return Runtime.from_config(resolve_config("smollm2-135m", window=8, kv_cache_mb=64, max_seqs=8))


class Collector:
    def __init__(self):
        self.events: list[Event] = []
        self.done = threading.Event()
        self.closed = 0  # times the loop closed the stream without a response (a dropped job)

    def __call__(self, ev: Event):
        self.events.append(ev)
        if ev.final:
            self.done.set()

    def close(self):
        self.closed += 1

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def run_jobs(loop, params_list, cancel_after_first=()):
    collectors = []
    for i, params in enumerate(params_list):
        c = Collector()
        cancelled = (lambda c=c: len(c.events) >= 1) if i in cancel_after_first else (lambda: False)
        loop.submit(Job(params, loop.prepare(params), emit=c, is_cancelled=cancelled, close=c.close))
        collectors.append(c)
    for i, c in enumerate(collectors):
        if i not in cancel_after_first:
            assert c.done.wait(120), "no final event"
            assert c.closed == 0  # a job answered to the end is never closed as dropped
    return collectors


def test_concurrent_jobs_equal_sequential_generate_and_stream_adds_up(runtime):
    loop = EngineLoop.from_runtime(runtime).start()
    try:
        total = loop.engine.cache.allocator.num_free
        params = [GenerationParams(p, max_tokens=12, stream=i % 2 == 0) for i, p in enumerate(PROMPTS * 2)]
        got = run_jobs(loop, params)
        sp = runtime.sampling(max_new_tokens=12)
        for p, c in zip(params, got):
            want = runtime.generate([runtime.encode(p.prompt)], sp)[0]
            assert c.text == want.text
            assert c.events[-1].final and c.events[-1].error is None
            assert c.events[-1].compression_ratio == pytest.approx(want.kv["compression_ratio"])
            assert c.events[-1].kv_bytes == want.kv["bytes_allocated"]
            if p.stream:
                assert len(c.events) > 2  # token by token
            else:
                assert len(c.events) == 1
        assert any(c.events[-1].compression_ratio > 0 for c in got)  # eviction really happened
        time.sleep(0.2)
        assert loop.engine.cache.allocator.num_free == total and loop.metrics.running == 0
    finally:
        loop.stop()


def test_served_in_chunks_equals_generate_in_chunks(runtime):
    # max_num_tokens reaches the served engine: 8-token chunks over these prompts' compressed
    # caches, decodes beside them, the same text as the offline runtime with the same setting.
    chunked = Runtime(dataclasses.replace(runtime.cfg, max_num_tokens=8), runtime.loaded, runtime.surrogate)
    loop = EngineLoop.from_runtime(chunked).start()
    try:
        assert loop.engine.max_num_tokens == 8
        params = [GenerationParams(p, max_tokens=10, stream=True) for p in PROMPTS]
        got = run_jobs(loop, params)
        for p, c in zip(params, got):
            want = chunked.generate([chunked.encode(p.prompt)], chunked.sampling(max_new_tokens=10))[0]
            assert c.text == want.text and c.events[-1].kv_bytes == want.kv["bytes_allocated"]
    finally:
        loop.stop()


def test_stop_words_cut_the_answer(runtime):
    loop = EngineLoop.from_runtime(runtime).start()
    try:
        free = run_jobs(loop, [GenerationParams(PROMPTS[1], max_tokens=20)])[0].text
        words = free.strip().split()
        # A word whose tail first occurs inside it: both stop words complete in the same step.
        i, word = next((i, w) for i, w in enumerate(words[:-1])
                       if i and len(w) >= 3 and free.find(w[1:]) == free.find(w) + 1)
        stop_words = [words[i + 1], word[1:], "zzz", word]  # listed in no particular order
        (c,) = run_jobs(loop, [GenerationParams(PROMPTS[1], max_tokens=20, stop_words=stop_words)])
        first_hit = next(j for j in range(len(free)) if free.startswith(tuple(stop_words), j))
        assert c.text == free[:first_hit] and not any(w in c.text for w in stop_words)
        assert 0 < len(c.text) < len(free)
    finally:
        loop.stop()


def test_cancelled_job_returns_its_blocks(runtime):
    loop = EngineLoop.from_runtime(runtime).start()
    try:
        total = loop.engine.cache.allocator.num_free
        (c,) = run_jobs(loop, [GenerationParams(PROMPTS[2], max_tokens=4000, stream=True)], cancel_after_first={0})
        deadline = time.monotonic() + 60
        while not c.events and time.monotonic() < deadline:
            time.sleep(0.05)
        while (loop.jobs or loop.engine.running) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not loop.engine.running and loop.engine.cache.allocator.num_free == total
        assert not any(e.final for e in c.events) and 1 <= len(c.events) < 50
        assert c.closed == 1  # its stream was closed once (Triton: the FINAL flag releases the request)
    finally:
        loop.stop()


def test_refusals(runtime):
    loop = EngineLoop.from_runtime(runtime)
    with pytest.raises(BadRequest, match="exceeds the context limit of 8192"):
        loop.prepare(GenerationParams("hello", max_tokens=9000))
    small = EngineLoop.from_runtime(
        Runtime(resolve_config("smollm2-135m", window=8, kv_cache_mb=1), runtime.loaded, runtime.surrogate))
    cache = small.engine.cache
    # The pool is as many blocks as 1 MiB holds, measured on its tensors, and the message says so.
    pool_bytes = sum(pool.nbytes for pool in (cache.k_pool, cache.v_pool, cache.pos_pool, cache.score_pool))
    block_bytes = pool_bytes // cache.allocator.num_blocks
    assert pool_bytes <= 2**20 < pool_bytes + block_bytes
    with pytest.raises(BadRequest, match=f"KV blocks; the pool has {cache.allocator.num_free}$") as refused:
        small.prepare(GenerationParams(PROMPTS[2] * 3, max_tokens=5))
    need = int(str(refused.value).split(" may need ")[1].split()[0])
    assert need > cache.allocator.num_free
    assert small.prepare(GenerationParams(PROMPTS[0], max_tokens=5))  # a prompt that fits is accepted


@pytest.mark.parametrize("text, stop, want", [
    ("xab", ["bcd"], "xa"),                 # "b" may begin "bcd": held back
    ("xab", ["zzz"], "xab"),                # nothing to hold
    ("hello wor", ["world", "or"], "hello "),  # the longest prefix any stop word could still complete
    ("ab\ufffd", [], "ab"),                 # half a UTF-8 character waits for its other bytes
    ("ab\ufffd", ["b?"], "a"),              # both: the character, then a stop word's first letter
])
def test_streamable_holds_back_what_could_still_become_a_stop_word(text, stop, want):
    assert streamable(text, stop) == want


def test_an_unexpected_error_fails_its_request_and_the_loop_goes_on(runtime):
    """A seed torch cannot take (the Triton port's UINT64 always fits; a bug elsewhere could still
    raise) answers that request with an error; the engine thread keeps serving the next one."""
    loop = EngineLoop.from_runtime(runtime).start()
    try:
        bad = GenerationParams(PROMPTS[0], max_tokens=4, temperature=1.0, seed=2**64)
        (failed,) = run_jobs(loop, [bad])
        assert failed.events[-1].final and "internal error" in failed.events[-1].error
        assert failed.events[-1].error_code == INTERNAL_ERROR and triton_error_kind(failed.events[-1]) == "INTERNAL"
        (ok,) = run_jobs(loop, [GenerationParams(PROMPTS[0], max_tokens=4)])
        assert ok.events[-1].error is None and ok.text
        assert loop._thread.is_alive() and loop.engine.cache.allocator.num_used == 0
    finally:
        loop.stop()


def test_failures_carry_their_reason_to_both_doors(runtime, monkeypatch):
    """A failed engine step is the server's fault (INTERNAL_ERROR: OpenAI's 500, Triton's INTERNAL);
    an answer the pool cannot hold is the request's (KV_POOL_EXHAUSTED: 400, INVALID_ARG)."""
    spec = runtime.make_cache(1, 1, 1).spec  # 200 blocks: a window page for each of the 90 heads, and a few more
    small = EngineLoop.from_runtime(Runtime(dataclasses.replace(runtime.cfg, kv_cache_mb=200 * spec.block_bytes / 2**20),
                                            runtime.loaded, runtime.surrogate)).start()
    try:
        (long,) = run_jobs(small, [GenerationParams("1, 2, 3, 4,", max_tokens=400)])
        ev = long.events[-1]
        assert "cannot hold this request past" in ev.error and ev.error_code == KV_POOL_EXHAUSTED
        assert triton_error_kind(ev) == "INVALID_ARG"

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the forward")

        monkeypatch.setattr(small.engine.executor, "forward", broken)
        (failed,) = run_jobs(small, [GenerationParams(PROMPTS[0], max_tokens=3)])
        ev = failed.events[-1]
        assert "a bug in the forward" in ev.error and ev.error_code == INTERNAL_ERROR
        assert triton_error_kind(ev) == "INTERNAL"
        monkeypatch.undo()
        (ok,) = run_jobs(small, [GenerationParams(PROMPTS[0], max_tokens=3)])
        assert ok.events[-1].error is None and ok.events[-1].error_code is None and ok.text
        assert small.engine.cache.allocator.num_used == 0
    finally:
        small.stop()
