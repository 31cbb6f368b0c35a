"""Continuous batching behind a server: one thread owns the engine, others submit jobs.

A job is a parsed request plus an `emit(Event)` callback, an `is_cancelled()` probe and a
`close()` for a dropped job's stream (Triton's response sender provides all three). Each engine
step, every job gets its new text (stream mode) or, once finished, one final event with the KV
figures. Cancelled jobs are aborted, their streams closed, and their blocks return to the pool
before the next step. Nothing here imports Triton: it is tested directly.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from kvzap_trt.errors import INTERNAL_ERROR, KV_POOL_EXHAUSTED, CacheFullError, KvzapError, error_code
from kvzap_trt.kvcoe.reasoning import Reasoning
from kvzap_trt.runtime.engine import Engine, EvictionPolicy
from kvzap_trt.runtime.generate import Runtime
from kvzap_trt.runtime.scheduler import Request
from kvzap_trt.serve.protocol import BadRequest, GenerationParams

log = logging.getLogger(__name__)


@dataclass
class Event:
    text: str  # stream: the new text; otherwise the whole answer
    final: bool
    compression_ratio: float = 0.0
    kv_bytes: int = 0
    error: str | None = None
    error_code: str | None = None  # with error: KV_POOL_EXHAUSTED, INTERNAL_ERROR (a server fault), None (bad input)
    finish_reason: str | None = None  # final events: "stop" (EOS or a stop word) | "length"
    completion_tokens: int = 0  # final events: tokens generated (a stop word's included)
    reasoning: str | None = None  # final events of requests with a reasoning option: "fast" | "slow"
    reasoning_p_slow: float | None = None  # ... and the probe's P(slow) with reasoning "auto"
    kv_coe_score: float | None = None  # final events of requests with kv_coe: the answer's KV-CoE score


@dataclass
class Job:
    params: GenerationParams
    prompt_ids: list[int]
    emit: Callable[[Event], None]
    is_cancelled: Callable[[], bool] = lambda: False
    # Ends the job's response stream without a response, when the engine drops the job because its
    # client cancelled or cannot be reached (Triton: the response sender's FINAL flag, which
    # releases the request; a decoupled model holding an unreleased one cannot unload).
    close: Callable[[], None] = lambda: None
    embed: bool = False  # record the KV embedding: request.embedding once done (kvzap_trt/kvcoe)
    reasoning: Reasoning | None = None  # fast/slow reasoning (`Runtime.reasoning`), None: off
    request: Request | None = None
    sent: str = ""  # text already emitted in stream mode

    @property
    def done(self) -> bool:
        return self.request is not None and self.request.finished


@dataclass
class Metrics:
    queue_length: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    compression_ratio: float = 0.0  # mean over the running requests
    finished: int = 0
    preemptions: int = 0


def cut_at_stop_word(text: str, stop_words: list[str]) -> tuple[str, bool]:
    """Text before the first stop word, and whether one occurred."""
    hits = [i for i in (text.find(w) for w in stop_words) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def streamable(text: str, stop_words: list[str]) -> str:
    """`text` less a tail that could still become a stop word (and a partial UTF-8 character),
    so that streamed deltas always join to the final, cut text."""
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    hold = max((k for w in stop_words for k in range(min(len(w) - 1, len(text)), 0, -1)
                if text.endswith(w[:k])), default=0)
    return text[: len(text) - hold]


class EngineLoop:
    def __init__(self, runtime: Runtime, engine: Engine):
        self.runtime, self.engine = runtime, engine
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: list[Job] = []
        self.metrics = Metrics(kv_blocks_free=engine.cache.allocator.num_free)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvzap-engine", daemon=True)

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> "EngineLoop":
        """A KV pool of `kv_cache_mb` and `max_seqs` sequence slots, as the config says."""
        cfg = runtime.cfg
        max_seq_len, _ = runtime.context_limit()
        probe = runtime.make_cache(max_seq_len, 1, 1).spec
        num_blocks = int(cfg.kv_cache_mb * 2**20 // probe.block_bytes)
        bounds = getattr(runtime.executor(), "cache_bounds", None)
        if bounds is not None and (num_blocks > bounds.num_blocks or cfg.max_seqs > bounds.max_seqs):
            raise KvzapError(f"--kv-cache-mb {cfg.kv_cache_mb:g} ({num_blocks} blocks) and --max-seqs {cfg.max_seqs} "
                             f"exceed the engine's {bounds.num_blocks} blocks and {bounds.max_seqs} slots: serve with "
                             "the values it was built with, or less")
        cache = runtime.make_cache(max_seq_len, cfg.max_seqs, num_blocks)
        policy = EvictionPolicy(runtime.surrogate, cfg.threshold, cfg.compress_decoding)
        return cls(runtime, Engine(runtime.loaded.model, cache, policy, max_seq_len, executor=runtime.executor(),
                                   max_num_tokens=cfg.max_num_tokens))

    # -- called from request threads --------------------------------------------------------
    def prepare(self, params: GenerationParams, prompt_ids: list[int] | None = None) -> list[int]:
        """Tokenise (unless `prompt_ids` are given: a chat template's) and check a request;
        BadRequest for anything waiting would not cure."""
        ids = self.runtime.encode(params.prompt) if prompt_ids is None else list(prompt_ids)
        limit = self.engine.max_seq_len
        if not ids:
            raise BadRequest("text_input has no tokens")
        if len(ids) + params.max_tokens > limit:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context limit of {limit}",
                code="context_length_exceeded")
        try:
            self.engine.validate_prompt(ids, params.evict)
        except CacheFullError as e:  # the whole pool cannot take the prompt's first chunk
            raise BadRequest(str(e), code=KV_POOL_EXHAUSTED) from None
        except KvzapError as e:
            raise BadRequest(str(e)) from None
        return ids

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_new(block=not self.engine.has_work())
                for job in [j for j in self.jobs if j.is_cancelled()]:
                    self._drop(job)
                if self.engine.has_work():
                    try:
                        self.engine.step()
                    except Exception as e:  # noqa: BLE001 - a bug must not kill the server silently
                        log.exception("engine step failed")
                        self._fail_all(f"internal error: {e}")
                    for job in list(self.jobs):
                        self._progress(job)
                self._update_metrics()
            except Exception as e:  # noqa: BLE001 - the one thread that serves every request must go on
                log.exception("engine loop failed")
                self._fail_all(f"internal error: {e}")

    def _take_new(self, block: bool) -> None:
        try:
            job = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            p = job.params
            sampling = self.runtime.sampling(max_new_tokens=p.max_tokens, temperature=p.temperature,
                                             top_p=p.top_p, top_k=p.top_k, seed=p.seed)
            try:
                job.request = self.engine.submit(job.prompt_ids, sampling, embed=job.embed, kv_coe=job.params.kv_coe,
                                                 reasoning=job.reasoning, evict=job.params.evict)
                self.jobs.append(job)
            except Exception as e:  # noqa: BLE001 - a bug in one request's admission fails that request only
                code = error_code(e)
                if code == INTERNAL_ERROR:
                    log.exception("submitting a request failed")
                    message = f"internal error: {e}"
                else:
                    message = str(e)
                self._emit(job, Event("", True, error=message, error_code=code))
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _progress(self, job: Job) -> None:
        r = job.request
        text, stopped = cut_at_stop_word(self.runtime.decode(r.output_ids) or "", job.params.stop_words)
        if stopped and not r.finished:
            self.engine.finish(r, "stop")
        if r.finished:
            self.jobs.remove(job)
            self.metrics.finished += 1
            if r.finish_reason == "error":
                self._emit(job, Event("", True, error=r.error, error_code=r.error_code))
                return
            kv = r.kv
            rest = text[len(job.sent):] if job.params.stream else text
            reason = "stop" if r.finish_reason == "stop" else "length"
            self._emit(job, Event(rest, True, kv["compression_ratio"], kv["bytes_allocated"],
                                  finish_reason=reason, completion_tokens=len(r.output_ids),
                                  reasoning=r.reasoning_choice, reasoning_p_slow=r.reasoning_p_slow,
                                  kv_coe_score=r.kv_coe_score))
        elif job.params.stream:
            ready = streamable(text, job.params.stop_words)
            # After a preemption the request regenerates the same tokens: nothing is resent.
            if len(ready) > len(job.sent) and self._emit(job, Event(ready[len(job.sent):], False)):
                job.sent = ready

    def _emit(self, job: Job, ev: Event) -> bool:
        """Send an event; a client that cannot be reached any more loses its request, nobody else."""
        try:
            job.emit(ev)
            return True
        except Exception:  # noqa: BLE001 - e.g. the response sender of a closed connection
            log.warning("dropping request %s: its response could not be sent", job.request and job.request.request_id)
            if job in self.jobs:
                self._drop(job)
            return False

    def _drop(self, job: Job) -> None:
        """Abort a running job (its blocks return to the pool) and close its response stream."""
        self.engine.abort(job.request)
        self.jobs.remove(job)
        try:
            job.close()
        except Exception:  # noqa: BLE001 - the stream may be closed already
            log.warning("request %s: its response stream could not be closed", job.request.request_id)

    def _fail_all(self, message: str) -> None:
        """Fail every running job with a server fault (INTERNAL_ERROR)."""
        for job in list(self.jobs):
            self._emit(job, Event("", True, error=message, error_code=INTERNAL_ERROR))
            self.engine.abort(job.request)
        self.jobs.clear()

    def _update_metrics(self) -> None:
        e, cache = self.engine, self.engine.cache
        ratios = [cache.stats(r.slot)["compression_ratio"] for r in e.running]
        m = self.metrics
        m.queue_length = len(e.waiting) + self.inbox.qsize()
        m.running = len(e.running)
        m.kv_blocks_free = cache.allocator.num_free
        m.kv_blocks_used = cache.allocator.num_used
        m.compression_ratio = sum(ratios) / len(ratios) if ratios else 0.0
        m.preemptions = sum(r.preemptions for r in e.running)
