"""Which requests run in a step and how many tokens each: host-side, over the cache's block
accounting (vLLM v1's split). `schedule()` returns a `SchedulerOutput`, data the engine runs;
`advance()` and `update()` apply what the step did. The model, the executor and sampling are the
engine's (engine.py).

Admission counts exact worst cases from the cache's own state (a head can only need a block when
its last one is full and a token leaves its window), so what KVzap evicts is room for more
sequences; when the running set outgrows the pool, the youngest are restarted later. With
`max_num_tokens` = C, prompts are fed in chunks [0, C), [C, 2C), ... whatever else runs, and a
step packs every running decode plus whole chunks of at most C prompt tokens in all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.errors import KV_POOL_EXHAUSTED
from kvzap_trt.kvcoe.reasoning import Reasoning
from kvzap_trt.runtime.sampler import SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    request_id: int
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    kv: dict[str, Any] | None = None  # cache statistics after the request's last forward pass
    preemptions: int = 0  # times the request was restarted to free blocks for others
    error: str | None = None  # set with finish_reason "error"
    error_code: str | None = None  # ... and its machine-readable reason: "kv_pool_exhausted"
    # Teacher forcing: the first outputs are these ids, fed one per step over the compressed cache
    # as if sampled (a question asked after its context was prefilled); stop tokens among them do
    # not end the request. They count toward max_new_tokens.
    forced_ids: list[int] = field(default_factory=list)
    # KVzap may evict this request's tokens; False keeps every one (its cache is dense: its rows go
    # to the kernels as never_evict, scores +inf), whatever the engine's surrogate.
    evict: bool = True
    embed: bool = False  # record the KV embedding (kvzap_trt/kvcoe) whatever the engine's setting
    prefill_embedding: torch.Tensor | None = None  # [E] host: the KV embedding right after prefill
    embedding: torch.Tensor | None = None  # [E] host: the KV embedding when it finished
    kv_coe: bool = False  # score the answer with KV-CoE (kvzap_trt/kvcoe/coe.py) whatever the engine's setting
    kv_coe_score: float | None = None  # its CoE-C when it finished (None: not asked, or undefined)
    kv_coe_features: dict[str, float | None] | None = None  # mag, ang, coe_r, coe_c
    # The `reasoning` option (kvzap_trt/kvcoe/reasoning.py), applied right after prefill; None: off.
    reasoning: Reasoning | None = None
    reasoning_choice: str | None = None  # "fast" | "slow" once decided
    reasoning_p_slow: float | None = None  # the probe's P(slow), with reasoning "auto"
    generator: torch.Generator = field(default_factory=torch.Generator)
    prefilled: int = 0  # prompt tokens in the cache; the prompt is done when it reaches len(prompt_ids)
    # Blocks it held plus those its next step needed when it was last preempted: it is admitted
    # again only when that many are free, so a prompt whose chunks outgrew the pool is not restarted
    # in the very step that preempted it (only to be preempted again, its work thrown away).
    restart_blocks: int = 0

    @property
    def prefilling(self) -> bool:
        """Part of the prompt is still to be fed (a request that has not started counts too)."""
        return self.prefilled < len(self.prompt_ids)


@dataclass
class SchedulerOutput:
    """One step's work, in batch order: running requests first, then those admitted now."""

    work: list[tuple[Request, int]]  # (request, new tokens this step)
    feeds: list[list[int]]  # the tokens each feeds: its next prompt chunk, or its last output
    is_decode: list[bool]  # a decode row (one generated token), else a prompt chunk
    failed: list[Request]  # requests this pool can never finish: already finished with "error"
    max_kept: int  # kept tokens of the fullest head the step can see (the attention's key bound)

    @property
    def batch(self) -> list[Request]:
        return [r for r, _ in self.work]


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_tokens: int | None, evicts: bool, max_seq_len: int):
        """max_num_tokens: the prompt chunk and the most prompt tokens a step packs (None: prompts
        whole); evicts: a surrogate evicts (admission may then count a first chunk only). All
        three are fixed for the scheduler's life."""
        self.cache, self.max_num_tokens, self.evicts, self.max_seq_len = cache, max_num_tokens, evicts, max_seq_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- the queues -------------------------------------------------------------------------
    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def abort(self, r: Request) -> None:
        """Drop a waiting or running request (client gone); its blocks return to the pool."""
        if r in self.waiting:
            self.waiting.remove(r)
        elif r in self.running:
            self.release(r)
        r.finished, r.finish_reason = True, r.finish_reason or "cancelled"

    def release(self, r: Request) -> None:
        """A running request leaves: its slot and blocks return to the cache."""
        self.cache.release(r.slot)
        self.running.remove(r)
        r.slot = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- what fits --------------------------------------------------------------------------
    def first_step_tokens(self, prompt_tokens: int, evict: bool = True) -> int:
        """Prompt tokens whose worst case admitting a prompt must cover: its first chunk's with
        eviction (a prompt whose uncompressed cache exceeds the pool may still fit), the whole
        prompt's without (exact: nothing will make room), as for a request that opts out (evict False)."""
        if self.max_num_tokens is None or not (self.evicts and evict):
            return prompt_tokens
        return min(prompt_tokens, self.max_num_tokens)

    def chunk(self, r: Request) -> int:
        """Tokens of `r`'s next prompt chunk: chunks are [0, C), [C, 2C), ... of the prompt
        (C = max_num_tokens, the whole prompt without it), whatever else runs, so a request's
        decisions never depend on the load (a preempted request restarts on the same chunks)."""
        left = len(r.prompt_ids) - r.prefilled
        return left if self.max_num_tokens is None else min(left, self.max_num_tokens)

    def _preempt(self, r: Request, need: int) -> None:
        """Restart `r` from its prompt later: release its blocks, forget its tokens. need: the
        blocks its next step would have taken.

        A restart recomputes exactly what an uninterrupted run computes (same prompt, same
        seed), so a preempted request's output is unchanged; `preemptions` lets a streaming
        front end skip the tokens it already sent.
        """
        r.restart_blocks = self.cache.release(r.slot) + need
        self.running.remove(r)
        r.slot, r.output_ids, r.prefilled = None, [], 0
        r.generator.manual_seed(r.sampling.seed)
        r.preemptions += 1
        self.waiting.appendleft(r)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self, finish: Callable[[Request, str], None]) -> SchedulerOutput:
        """Choose this step's work: (request, new tokens) pairs that fit the free blocks and the
        step's prompt-token budget (max_num_tokens; decodes come on top of it).

        Running sequences go first: every decode (one token), then the next chunk of each prompt
        still being prefilled (arrival order) while the budget holds it; when even their worst
        case does not fit the free blocks, the youngest running requests are preempted. Waiting
        requests are then admitted in arrival order while a slot, the budget and the free blocks
        allow (their first chunk's worst case; without eviction their whole prompt's; after a
        preemption at least what they held then). Without a budget every prompt is prefilled
        whole in the step that admits it. Two device reads (the running slots' kept lengths, the
        free count); a preemption or a failure adds a release's and a fresh free count.

        finish: how a request the pool can never hold ends, here, before the requests behind it
        are admitted (the engine's: it records the request's results, then calls `release`). Passed
        per call, not kept, so the engine and its scheduler hold no reference cycle (a dropped
        engine frees its KV pool at once, not at the next garbage collection).
        """
        failed: list[Request] = []
        kept = self.cache.read_kept([r.slot for r in self.running])  # [L, B, H]
        # Kept tokens of the fullest head this step can see (admitted prompts have none): the bound
        # the attention kernel sizes its splits from, read here at no extra cost.
        max_kept = int(kept.max()) if kept.numel() else 0
        prompt_left = float("inf") if self.max_num_tokens is None else self.max_num_tokens
        new = {}  # request_id -> new tokens this step
        for r in sorted(self.running, key=lambda r: (r.prefilling, r.request_id)):
            n = self.chunk(r) if r.prefilling else 1
            if r.prefilling and n > prompt_left:
                continue
            new[r.request_id] = n
            prompt_left -= n if r.prefilling else 0
        needs = self.cache.blocks_needed_many([r.slot for r in self.running],
                                              [new.get(r.request_id, 0) for r in self.running], kept)
        need = {r.request_id: n for r, n in zip(self.running, needs)}
        free = self.cache.allocator.num_free
        while len(self.running) > 1 and sum(need.values()) > free:
            victim = max(self.running, key=lambda r: r.request_id)
            prompt_left += new.pop(victim.request_id, 0) if victim.prefilling else 0
            self._preempt(victim, need.pop(victim.request_id))
            free = self.cache.allocator.num_free
        if self.running and sum(need.values()) > free:
            (r,) = self.running  # alone and still too big: this pool can never finish it
            past = f"{r.prefilled} prompt tokens" if r.prefilling else f"{len(r.output_ids)} tokens"
            r.error = f"the KV pool ({self.cache.spec.num_blocks} blocks) cannot hold this request past {past}"
            r.error_code = KV_POOL_EXHAUSTED
            prompt_left += new.get(r.request_id, 0) if r.prefilling else 0
            finish(r, "error")
            failed.append(r)
            need.clear()
            new.clear()
            free = self.cache.allocator.num_free
        work = [(r, new[r.request_id]) for r in self.running if r.request_id in new]
        budget = free - sum(need.values())
        while self.waiting and self.cache.free_slots:
            req = self.waiting[0]
            n = self.chunk(req)
            # After a preemption, at least what it held then (capped at the pool).
            cost = self.cache.spec.prefill_blocks(self.first_step_tokens(len(req.prompt_ids), req.evict))
            cost = max(cost, min(req.restart_blocks, self.cache.spec.num_blocks))
            if n > prompt_left or cost > budget:
                break
            self.waiting.popleft()
            req.slot, req.restart_blocks = self.cache.add_sequence(), 0
            budget -= cost
            prompt_left -= n
            self.running.append(req)
            work.append((req, n))
        feeds = [r.prompt_ids[r.prefilled:r.prefilled + n] if r.prefilling else [r.output_ids[-1]] for r, n in work]
        return SchedulerOutput(work, feeds, [not r.prefilling for r, _ in work], failed, max_kept)

    def advance(self, out: SchedulerOutput) -> list[Request]:
        """The step's prompt chunks are in the cache: move each prompt on; returns those whose
        last chunk this was (their first token is sampled in this step)."""
        done = []
        for r, n in out.work:
            if r.prefilling:
                r.prefilled += n
                if not r.prefilling:
                    done.append(r)
        return done

    def update(self, sampled: list[Request], tokens: list[int]) -> list[Request]:
        """Each sampling request's token (a forced id instead while it has some); returns the
        requests that are done (finish_reason "stop" or "length"), still running."""
        done = []
        for r, token in zip(sampled, tokens):
            forcing = len(r.output_ids) < len(r.forced_ids)
            if forcing:
                token = r.forced_ids[len(r.output_ids)]
            if r.sampling.max_new_tokens > 0:
                r.output_ids.append(token)
            total = len(r.prompt_ids) + len(r.output_ids)
            if not forcing and r.output_ids and r.output_ids[-1] in r.sampling.stop_token_ids:
                r.finish_reason = "stop"  # also on the last allowed token, as vLLM and OpenAI report it
            elif r.sampling.max_new_tokens == len(r.output_ids) or total >= self.max_seq_len:
                r.finish_reason = "length"
            if r.finish_reason:
                done.append(r)
        return done
