"""Continuous batching over the KVzap cache, one executor running the forward (PyTorch by default).

Every `step()` is schedule -> execute -> update: the scheduler (scheduler.py, host-side) says
which requests run and how many tokens each feeds (every running decode, whole prompt chunks of
at most `max_num_tokens` tokens, admissions and preemptions by the free KV blocks); the engine
runs one packed forward pass over them, samples one token per sequence whose prompt is done, and
hands the tokens back to the scheduler. With `max_num_tokens` = C, prompts are prefilled in
chunks of C tokens (positions [0, C), [C, 2C), ..., the same whatever else runs): a long prompt
no longer stalls every other sequence for its whole prefill, a step stays within a TensorRT
engine's prefill profile, and a prompt whose uncompressed cache exceeds the pool can still be
served when eviction keeps its cache small. A prompt's later chunks attend to the compressed
cache of its earlier ones, as decoding does; a prompt of at most C tokens, and every prompt
without a limit (the default), is prefilled whole and its decisions are kvpress's exactly.
Per layer the forward (an executor: `kvzap_trt/executors/`) scores the new tokens with the
surrogate and attends over kept pages + window + new tokens; eviction follows the layer's
attention (kvpress order). Device data is read on the host only through `device_reads.to_host`,
a fixed few times per step and never per layer or per sequence (tests/test_device_reads.py
counts them).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.executors import Executor, StepInputs
from kvzap_trt.executors.torch_executor import TorchExecutor
from kvzap_trt.kvcoe.coe import SCORE, check_layers, kv_coe
from kvzap_trt.kvcoe.embedding import KVEmbedding
from kvzap_trt.kvcoe.reasoning import Reasoning
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.runtime.sampler import SamplingParams, sample
from kvzap_trt.runtime.scheduler import Request, Scheduler, SchedulerOutput
from kvzap_trt.surrogate import Surrogate


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
        # max_seq_len, the policy's surrogate and the step limit are fixed from here on
        self.scheduler = Scheduler(cache, min(limits) if limits else None, policy.surrogate is not None, max_seq_len)
        self._ids = itertools.count()

    @property
    def max_num_tokens(self) -> int | None:
        """The prompt chunk and the most prompt tokens a step packs (None: prompts whole)."""
        return self.scheduler.max_num_tokens

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def ops(self):
        """The PyTorch executor's ops (tests wrap them to count calls)."""
        return self.executor.ops

    @ops.setter
    def ops(self, value) -> None:
        self.executor.ops = value

    # -- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams, embed: bool = False,
               kv_coe: bool = False, reasoning: Reasoning | None = None, evict: bool = True) -> Request:
        """Queue a request; errors that no amount of waiting would cure are raised here.
        embed: record its KV embedding (`prefill_embedding`, `embedding`); kv_coe: its KV-CoE score.
        reasoning: fast/slow (or the probe's choice), applied after its prefill (`Runtime.reasoning`).
        evict: False keeps every token of this request (a dense cache; `Request.evict`)."""
        self.validate_prompt(prompt_ids, evict)
        if kv_coe:
            check_layers(self.cache.spec.num_layers)
        req = Request(list(prompt_ids), sampling, next(self._ids), embed=embed, kv_coe=kv_coe, reasoning=reasoning,
                      evict=evict)
        req.generator.manual_seed(sampling.seed)
        self.scheduler.add(req)
        return req

    def validate_prompt(self, prompt_ids: list[int], evict: bool = True) -> None:
        """KvzapError if this prompt can never run here (reads only constant engine state); evict
        False: as a request that keeps every token."""
        if not prompt_ids:
            raise KvzapError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len:
            raise KvzapError(f"prompt has {len(prompt_ids)} tokens, the context limit is {self.max_seq_len}")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise KvzapError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        first = self.scheduler.first_step_tokens(len(prompt_ids), evict)
        need = self.cache.spec.prefill_blocks(first)
        if need > self.cache.spec.num_blocks:
            what = f"a {len(prompt_ids)}-token prompt" if first == len(prompt_ids) else f"the first {first} tokens of the prompt"
            raise CacheFullError(f"{what} may need {need} KV blocks; the pool has {self.cache.spec.num_blocks}")

    def abort(self, r: Request) -> None:
        """Drop a waiting or running request (client gone); its blocks return to the pool."""
        self.scheduler.abort(r)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def run(self) -> None:
        while self.has_work():
            self.step()

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it (finish_reason "error" too)."""
        out = self.scheduler.schedule(self.finish)
        if not out.work:
            return out.failed
        logits = self._forward(out)
        for r in self.scheduler.advance(out):  # prompts whose last chunk this was
            self._prefilled(r)
        # Rows that sample: decodes and prompts whose last chunk this was (a chunk's logits are unused).
        batch = out.batch
        rows = [i for i, r in enumerate(batch) if not r.prefilling]
        sampled = [batch[i] for i in rows]
        tokens = self._sample(sampled, logits if len(rows) == len(batch) else logits[rows]) if rows else []
        done = self.scheduler.update(sampled, tokens)
        for r in done:
            self.finish(r)
        return out.failed + done

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
        self.scheduler.release(r)

    def _forward(self, out: SchedulerOutput) -> torch.Tensor:
        """The step's packed forward -> logits [B, V] at each sequence's last fed token."""
        dev, cache, policy = self.cache.device, self.cache, self.policy
        batch, feeds, is_decode = out.batch, out.feeds, out.is_decode
        lens = [len(f) for f in feeds]
        ctx = [cache.ctx_len[r.slot] for r in batch]
        # cu, slots, ctx_t: host tensors built from lists (the ops read them without a device read)
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
        # Sequences whose tokens are never evicted: all without a surrogate; those that opted out
        # (evict False); decoding ones when decoding is not compressed (kvpress decoding=False).
        # Known here, so no layer asks the device.
        never_seq = [policy.surrogate is None or not r.evict or (d and not policy.compress_decoding)
                     for r, d in zip(batch, is_decode)]
        step = StepInputs(
            tokens=torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=dev),
            positions=torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)]).to(dev),
            never_evict=torch.tensor([v for v, n in zip(never_seq, lens) for _ in range(n)], device=dev),  # [N]
            never_all=all(never_seq),
            cu_seqlens=cu,
            seq_slots=torch.tensor([r.slot for r in batch], dtype=torch.int32),
            ctx_lens=torch.tensor(ctx, dtype=torch.int32),
            logits_at=(cu[1:] - 1).to(dev),
            max_kept=out.max_kept,
        )
        logits = self.executor.forward(step, cache)
        for r, n in zip(batch, lens):
            cache.ctx_len[r.slot] += n
        return logits
