"""Continuous batching over the KVzap cache, one executor running the forward (PyTorch by default).

Every `step()` runs one packed forward pass over the running sequences (one new token each) and
the sequences admitted in this step (their prompt), then samples one token per sequence.
With `max_num_tokens` = C, prompts are prefilled in chunks of C tokens (positions [0, C), [C, 2C),
..., the same whatever else runs) and a step packs every running decode plus whole chunks of at
most C prompt tokens in all: a long prompt no longer stalls every other sequence for its whole
prefill, a step stays within a TensorRT engine's prefill profile, and a prompt whose
uncompressed cache exceeds the pool can still be served when eviction keeps its cache small. A
prompt's later chunks attend to the compressed cache of its earlier ones, as decoding does; a
prompt of at most C tokens, and every prompt without a limit (the default), is prefilled whole
and its decisions are kvpress's exactly. Sequences join as slots and free blocks allow and leave
as soon as they finish, returning their blocks. Admission counts exact worst cases from the
cache's own state (a head can only need a block when its last one is full and a token leaves
its window), so what KVzap evicts is room
for more sequences; when the running set outgrows the pool, the youngest are restarted later.
Per layer the forward (an executor: `kvzap_trt/executors/`) scores the new tokens with the
surrogate and attends over kept pages + window + new tokens; eviction follows the layer's
attention (kvpress order). Device data is read on the host only through `device_reads.to_host`,
a fixed few times per step and never per layer or per sequence (tests/test_device_reads.py
counts them).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import KV_POOL_EXHAUSTED, CacheFullError, KvzapError
from kvzap_trt.executors import Executor, StepInputs
from kvzap_trt.executors.torch_executor import TorchExecutor
from kvzap_trt.kvcoe.coe import SCORE, check_layers, kv_coe
from kvzap_trt.kvcoe.embedding import KVEmbedding
from kvzap_trt.kvcoe.reasoning import Reasoning
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.runtime.sampler import SamplingParams, sample
from kvzap_trt.surrogate import Surrogate


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
class EvictionPolicy:
    """surrogate None: nothing is ever evicted (the dense baseline)."""

    surrogate: Surrogate | None
    threshold: float
    compress_decoding: bool = True


class Engine:
    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        policy: EvictionPolicy,
        max_seq_len: int,
        record_positions: bool = False,
        executor: Executor | None = None,
        record_embedding: bool | KVEmbedding = False,
        record_kv_coe: bool = False,
        max_num_tokens: int | None = None,
    ):
        """max_num_tokens: prompt chunk size and the most prompt tokens one step packs (None:
        prompts prefilled whole); an executor with its own limit (a TensorRT engine's) lowers it."""
        self.model, self.cache, self.policy = model, cache, policy
        self.max_seq_len = max_seq_len
        self.record_positions = record_positions
        # KV embedding of every request (True: the default KVEmbedding), or only of those submitted
        # with embed=True (False); computed after prefill and at finish, one device read each.
        self.record_embedding = bool(record_embedding)
        self.embedder = record_embedding if isinstance(record_embedding, KVEmbedding) else KVEmbedding()
        self.record_kv_coe = record_kv_coe  # KV-CoE score of every request at finish (else only kv_coe=True ones)
        if record_kv_coe:
            check_layers(cache.spec.num_layers)
        self.executor = executor or TorchExecutor(model, policy.surrogate, policy.threshold, cache.device)
        if max_num_tokens is not None and max_num_tokens < 1:
            raise KvzapError(f"max_num_tokens must be >= 1, got {max_num_tokens}")
        limits = [n for n in (max_num_tokens, getattr(self.executor, "max_num_tokens", None)) if n is not None]
        self.max_num_tokens: int | None = min(limits) if limits else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._max_kept: int | None = None  # set by each _schedule

    @property
    def ops(self):
        """The PyTorch executor's ops (tests wrap them to count calls)."""
        return self.executor.ops

    @ops.setter
    def ops(self, value) -> None:
        self.executor.ops = value

    # -- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams, embed: bool = False,
               kv_coe: bool = False, reasoning: Reasoning | None = None) -> Request:
        """Queue a request; errors that no amount of waiting would cure are raised here.
        embed: record its KV embedding (`prefill_embedding`, `embedding`); kv_coe: its KV-CoE score.
        reasoning: fast/slow (or the probe's choice), applied after its prefill (`Runtime.reasoning`)."""
        self.validate_prompt(prompt_ids)
        if kv_coe:
            check_layers(self.cache.spec.num_layers)
        req = Request(list(prompt_ids), sampling, next(self._ids), embed=embed, kv_coe=kv_coe, reasoning=reasoning)
        req.generator.manual_seed(sampling.seed)
        self.waiting.append(req)
        return req

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        """KvzapError if this prompt can never run here (reads only constant engine state)."""
        if not prompt_ids:
            raise KvzapError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len:
            raise KvzapError(f"prompt has {len(prompt_ids)} tokens, the context limit is {self.max_seq_len}")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise KvzapError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        first = self._first_step_tokens(len(prompt_ids))
        need = self.cache.spec.prefill_blocks(first)
        if need > self.cache.spec.num_blocks:
            what = f"a {len(prompt_ids)}-token prompt" if first == len(prompt_ids) else f"the first {first} tokens of the prompt"
            raise CacheFullError(f"{what} may need {need} KV blocks; the pool has {self.cache.spec.num_blocks}")

    def abort(self, r: Request) -> None:
        """Drop a waiting or running request (client gone); its blocks return to the pool."""
        if r in self.waiting:
            self.waiting.remove(r)
        elif r in self.running:
            self.cache.release(r.slot)
            self.running.remove(r)
            r.slot = None
        r.finished, r.finish_reason = True, r.finish_reason or "cancelled"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work():
            self.step()

    # -- one step ---------------------------------------------------------------------------
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

    def _first_step_tokens(self, prompt_tokens: int) -> int:
        """Prompt tokens whose worst case admitting a prompt must cover: its first chunk's with
        eviction (a prompt whose uncompressed cache exceeds the pool may still fit), the whole
        prompt's without (exact: nothing will make room)."""
        if self.max_num_tokens is None or self.policy.surrogate is None:
            return prompt_tokens
        return min(prompt_tokens, self.max_num_tokens)

    def _chunk(self, r: Request) -> int:
        """Tokens of `r`'s next prompt chunk: chunks are [0, C), [C, 2C), ... of the prompt
        (C = max_num_tokens, the whole prompt without it), whatever else runs, so a request's
        decisions never depend on the load (a preempted request restarts on the same chunks)."""
        left = len(r.prompt_ids) - r.prefilled
        return left if self.max_num_tokens is None else min(left, self.max_num_tokens)

    def _schedule(self) -> list[tuple[Request, int]]:
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
        """
        kept = self.cache.read_kept([r.slot for r in self.running])  # [L, B, H]
        # Kept tokens of the fullest head this step can see (admitted prompts have none): the bound
        # the attention kernel sizes its splits from, read here at no extra cost.
        self._max_kept = int(kept.max()) if kept.numel() else 0
        prompt_left = float("inf") if self.max_num_tokens is None else self.max_num_tokens
        new = {}  # request_id -> new tokens this step
        for r in sorted(self.running, key=lambda r: (r.prefilling, r.request_id)):
            n = self._chunk(r) if r.prefilling else 1
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
            self.finish(r, "error")
            self._failed.append(r)
            need.clear()
            new.clear()
            free = self.cache.allocator.num_free
        work = [(r, new[r.request_id]) for r in self.running if r.request_id in new]
        budget = free - sum(need.values())
        while self.waiting and self.cache.free_slots:
            req = self.waiting[0]
            n = self._chunk(req)
            # After a preemption, at least what it held then (capped at the pool).
            cost = self.cache.spec.prefill_blocks(self._first_step_tokens(len(req.prompt_ids)))
            cost = max(cost, min(req.restart_blocks, self.cache.spec.num_blocks))
            if n > prompt_left or cost > budget:
                break
            self.waiting.popleft()
            req.slot, req.restart_blocks = self.cache.add_sequence(), 0
            budget -= cost
            prompt_left -= n
            self.running.append(req)
            work.append((req, n))
        return work

    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it (finish_reason "error" too)."""
        self._failed: list[Request] = []
        work = self._schedule()
        if not work:
            return self._failed
        batch = [r for r, _ in work]
        feeds = [r.prompt_ids[r.prefilled:r.prefilled + n] if r.prefilling else [r.output_ids[-1]] for r, n in work]
        is_decode = [not r.prefilling for r in batch]
        logits = self._forward(batch, feeds, is_decode)
        for r, n in work:
            if r.prefilling:
                r.prefilled += n
                if not r.prefilling:
                    self._prefilled(r)
        # Rows that sample: decodes and prompts whose last chunk this was (a chunk's logits are unused).
        rows = [i for i, r in enumerate(batch) if not r.prefilling]
        sampled = [batch[i] for i in rows]
        tokens = self._sample(sampled, logits if len(rows) == len(batch) else logits[rows]) if rows else []
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
        for r in done:
            self.finish(r)
        return self._failed + done

    def _prefilled(self, r: Request) -> None:
        """What follows the last chunk of `r`'s prompt, before its first token is sampled."""
        if not self.policy.compress_decoding:
            # kvpress decoding=False: after prefill nothing more is ever evicted, the prompt's
            # window included: its tokens' scores become +inf (the window's pages are all held).
            cache = self.cache
            pages = cache.ring_table[:, r.slot, :, : cache.spec.window_pages(cache.ctx_len[r.slot])]
            cache.score_pool[pages.long()] = float("inf")
        if r.embed or self.record_embedding:
            r.prefill_embedding = to_host(self.embedder(self.cache, r.slot))
        if r.reasoning is not None:  # before its first token: forced ids and budget may change
            r.reasoning.decide(r, self.cache)

    def _sample(self, batch: list[Request], logits: torch.Tensor) -> list[int]:
        """logits: [B, V] on the cache's device -> one token id per request.

        The argmax of every row (what `sample` does at temperature 0) comes back in one read;
        the rows that draw (temperature > 0, tokens still wanted) come back in one more and draw
        on the host with their request's generator.
        """
        tokens = to_host(logits.argmax(-1)).tolist()  # [B]
        draw = [i for i, r in enumerate(batch) if r.sampling.temperature > 0 and r.sampling.max_new_tokens > 0]
        if draw:
            for i, row in zip(draw, to_host(logits[draw])):  # [len(draw), V]
                tokens[i] = sample(row, batch[i].sampling, batch[i].generator)
        return tokens

    def finish(self, r: Request, reason: str | None = None) -> None:
        """Record the request's cache statistics and return its slot and blocks."""
        r.finish_reason = reason or r.finish_reason
        r.kv = self.cache.stats(r.slot, positions=self.record_positions)
        if r.embed or self.record_embedding:
            # Nothing fed since prefill (the last sampled token is never fed): the same cache.
            same = r.prefill_embedding is not None and self.cache.ctx_len[r.slot] == len(r.prompt_ids)
            r.embedding = r.prefill_embedding if same else to_host(self.embedder(self.cache, r.slot))
        if r.kv_coe or self.record_kv_coe:
            if self.cache.ctx_len[r.slot] >= len(r.prompt_ids):  # not for a prompt that failed part-way
                r.kv_coe_features = kv_coe(self.cache, r.slot, len(r.prompt_ids))  # one device read
                r.kv_coe_score = r.kv_coe_features[SCORE]
        r.finished = True
        self.cache.release(r.slot)
        self.running.remove(r)
        r.slot = None

    def _forward(self, batch: list[Request], feeds: list[list[int]], is_decode: list[bool]) -> torch.Tensor:
        dev, cache, policy = self.cache.device, self.cache, self.policy
        lens = [len(f) for f in feeds]
        ctx = [cache.ctx_len[r.slot] for r in batch]
        # cu, slots, ctx_t: host tensors built from lists (the ops read them without a device read)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
        # Sequences whose tokens are never evicted: all without a surrogate; decoding ones when
        # decoding is not compressed (kvpress decoding=False). Known here, so no layer asks the device.
        never_seq = [policy.surrogate is None or (d and not policy.compress_decoding) for d in is_decode]
        step = StepInputs(
            tokens=torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=dev),
            positions=torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)]).to(dev),
            never_evict=torch.tensor([v for v, n in zip(never_seq, lens) for _ in range(n)], device=dev),  # [N]
            never_all=all(never_seq),
            cu_seqlens=cu,
            seq_slots=torch.tensor([r.slot for r in batch], dtype=torch.int32),
            ctx_lens=torch.tensor(ctx, dtype=torch.int32),
            logits_at=(cu[1:] - 1).to(dev),
            max_kept=self._max_kept,
        )
        logits = self.executor.forward(step, cache)
        for r, n in zip(batch, lens):
            cache.ctx_len[r.slot] += n
        return logits
