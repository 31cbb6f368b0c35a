"""Continuous batching over the KVzap cache with the PyTorch executor.

Every `step()` runs one packed forward pass over the running sequences (one new token each) and
the sequences admitted in this step (their whole prompt), then samples one token per sequence.
Sequences join as slots and free blocks allow and leave as soon as they finish, returning their
blocks. Per layer the forward scores the new tokens with the surrogate, attends over kept pages
+ window + new tokens, then evicts (kvpress order: eviction after attention).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.errors import CacheFullError, KvzapError
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.ops.dispatch import ops
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
    finish_reason: str | None = None  # "stop" | "length"
    kv: dict[str, Any] | None = None  # cache statistics after the request's last forward pass
    generator: torch.Generator = field(default_factory=torch.Generator)


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
    ):
        self.model, self.cache, self.policy = model, cache, policy
        self.max_seq_len = max_seq_len
        self.record_positions = record_positions
        self.ops = ops(cache.device)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.scale = model.cfg.head_dim**-0.5

    # -- requests ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Request:
        if not prompt_ids:
            raise KvzapError("the prompt is empty")
        if len(prompt_ids) > self.max_seq_len:
            raise KvzapError(f"prompt has {len(prompt_ids)} tokens, the context limit is {self.max_seq_len}")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise KvzapError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        need = self.cache.spec.worst_case_blocks(len(prompt_ids))
        if need > self.cache.spec.num_blocks:
            raise CacheFullError(
                f"a {len(prompt_ids)}-token prompt may need {need} KV blocks; the pool has {self.cache.spec.num_blocks}"
            )
        req = Request(list(prompt_ids), sampling, next(self._ids))
        req.generator.manual_seed(sampling.seed)
        self.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> None:
        while self.has_work():
            self.step()

    # -- one step ---------------------------------------------------------------------------
    def _admit(self) -> list[Request]:
        """Waiting requests that fit now, in arrival order; the rest keep waiting."""
        spec = self.cache.spec
        budget = self.cache.allocator.num_free - len(self.running) * spec.worst_case_blocks(1)
        admitted = []
        while self.waiting and self.cache.free_slots:
            need = spec.worst_case_blocks(len(self.waiting[0].prompt_ids))
            if need > budget:
                break
            req = self.waiting.popleft()
            req.slot = self.cache.add_sequence()
            budget -= need
            admitted.append(req)
        return admitted

    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it."""
        if self.running and self.cache.allocator.num_free < len(self.running) * self.cache.spec.worst_case_blocks(1):
            raise CacheFullError(
                f"KV block pool too small to continue: {self.cache.allocator.num_free} blocks free "
                f"for {len(self.running)} running sequences"
            )
        prefills = self._admit()
        if not self.running and not prefills:
            if self.waiting:
                raise CacheFullError("no sequence slot or KV blocks free to admit the next request")
            return []
        batch = self.running + prefills
        feeds = [[r.output_ids[-1]] for r in self.running] + [r.prompt_ids for r in prefills]
        is_decode = [True] * len(self.running) + [False] * len(prefills)
        logits = self._forward(batch, feeds, is_decode)
        self.running = batch
        done = []
        for r, row in zip(batch, logits):
            if r.sampling.max_new_tokens > 0:
                r.output_ids.append(sample(row, r.sampling, r.generator))
            total = len(r.prompt_ids) + len(r.output_ids)
            if r.sampling.max_new_tokens == len(r.output_ids) or total >= self.max_seq_len:
                r.finish_reason = "length"
            elif r.output_ids and r.output_ids[-1] in r.sampling.stop_token_ids:
                r.finish_reason = "stop"
            if r.finish_reason:
                done.append(r)
        for r in done:
            self.finish(r)
        return done

    def finish(self, r: Request) -> None:
        """Record the request's cache statistics and return its slot and blocks."""
        r.kv = self.cache.stats(r.slot, positions=self.record_positions)
        r.finished = True
        self.cache.release(r.slot)
        self.running.remove(r)

    def _forward(self, batch: list[Request], feeds: list[list[int]], is_decode: list[bool]) -> torch.Tensor:
        dev, cache, policy = self.cache.device, self.cache, self.policy
        lens = [len(f) for f in feeds]
        ctx = [cache.ctx_len[r.slot] for r in batch]
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
        slots = torch.tensor([r.slot for r in batch], dtype=torch.int32)
        ctx_t = torch.tensor(ctx, dtype=torch.int32)
        tokens = torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, lens)]).to(dev)
        # Rows whose tokens are never evicted: every row without a surrogate; decode rows when
        # decoding is not compressed (kvpress decoding=False).
        never = torch.tensor(
            [policy.surrogate is None or (d and not policy.compress_decoding) for d, n in zip(is_decode, lens) for _ in range(n)],
            device=dev,
        )
        alloc = cache.allocator

        def attend(layer: int, h_norm, q, k, v):
            lc = cache.layer(layer)
            if policy.surrogate is None or bool(never.all()):
                scores = torch.full(never.shape + (k.shape[1],), float("inf"), device=dev)
            else:
                scores = policy.surrogate.score(layer, h_norm).masked_fill(never[:, None], float("inf"))
            out = self.ops.paged_attention(
                q, k, v, cu, slots, ctx_t, lc.k_pool, lc.v_pool, lc.block_table, lc.kept_len, lc.ring_k, lc.ring_v, self.scale
            )
            self.ops.evict_append(
                k, v, scores, cu, slots, ctx_t, lc.k_pool, lc.v_pool, lc.pos_pool, lc.block_table, lc.kept_len,
                lc.ring_k, lc.ring_v, lc.ring_score, alloc.free_stack, alloc.num_free_t, policy.threshold,
            )
            return out

        last_rows = (cu[1:] - 1).to(dev)
        logits = self.model(tokens, positions, attend, logits_at=last_rows)
        for r, n, d in zip(batch, lens, is_decode):
            cache.ctx_len[r.slot] += n
            if not d and not policy.compress_decoding:
                # kvpress decoding=False: after prefill nothing more is ever evicted, the prompt's
                # window included.
                cache.ring_score[:, r.slot] = float("inf")
        return logits
