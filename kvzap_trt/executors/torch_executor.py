"""The PyTorch executor: our compact forward (`models/transformer.py`) with an `attend` callback
that scores, attends and evicts through `ops.dispatch`'s implementation for the cache's device.

A step of one token per sequence (decode) evicts every layer in one op call after the forward: a
layer's eviction changes only its own cache, which its attention has read already. Its new
K/V/scores wait in `stash` ([L, N, ...]: small). Steps with prompts evict per layer.
"""

from __future__ import annotations

import torch

from kvzap_trt.cache.paged_cache import LayerCache, PagedKVCache
from kvzap_trt.executors import StepInputs
from kvzap_trt.models.transformer import Transformer
from kvzap_trt.ops.dispatch import ops
from kvzap_trt.ops.interface import StepPlan
from kvzap_trt.surrogate import Surrogate


class TorchExecutor:
    name = "torch"

    def __init__(self, model: Transformer, surrogate: Surrogate | None, threshold: float,
                 device: torch.device | str):
        self.model, self.surrogate, self.threshold = model, surrogate, threshold
        self.ops = ops(device)
        self.scale = model.cfg.head_dim**-0.5

    def _evict(self, cache: PagedKVCache, k, v, scores, plan: StepPlan, lc: LayerCache) -> None:
        """evict_append of packed rows into the cache views `lc` (one layer, or all folded)."""
        alloc = cache.allocator
        self.ops.evict_append(k, v, scores, plan.cu_seqlens, plan.seq_slots, plan.ctx_lens, lc.k_pool, lc.v_pool,
                              lc.pos_pool, lc.score_pool, lc.block_table, lc.kept_len, lc.ring_table, alloc.free_stack,
                              alloc.num_free_t, cache.spec.window, self.threshold, plan=plan)

    def forward(self, step: StepInputs, cache: PagedKVCache) -> torch.Tensor:
        dev, W = cache.k_pool.device, cache.spec.window  # indexed: the plan copies to it
        never = step.never_evict
        # One plan for every layer's ops (ops/interface.py): routing, device copies, attention split.
        plan = StepPlan.make(step.cu_seqlens, step.seq_slots, step.ctx_lens, W, dev, step.max_kept)
        stash: dict[str, torch.Tensor] = {}
        one_evict = all(n == 1 for n in plan.lens)

        def attend(layer: int, h_norm, q, k, v):
            lc = cache.layer(layer)
            if step.never_all:
                scores = torch.full(never.shape + (k.shape[1],), float("inf"), device=dev)
            else:
                scores = self.surrogate.score(layer, h_norm).masked_fill(never[:, None], float("inf"))
            out = self.ops.paged_attention(
                q, k, v, plan.cu_seqlens, plan.seq_slots, plan.ctx_lens, lc.k_pool, lc.v_pool, lc.block_table,
                lc.kept_len, lc.ring_table, W, self.scale, plan=plan,
            )
            if one_evict:
                for name, t in (("k", k), ("v", v), ("scores", scores)):
                    if name not in stash:
                        stash[name] = t.new_empty((cache.spec.num_layers, *t.shape))
                    stash[name][layer] = t
            else:
                self._evict(cache, k, v, scores, plan, lc)
            return out

        with self.ops.deferred_errors(dev):  # kernels: one error check per step, not per layer
            logits = self.model(step.tokens, step.positions, attend, logits_at=step.logits_at)
            if one_evict:
                L, S, N = cache.spec.num_layers, cache.spec.max_seqs, len(plan.lens)
                folded = (torch.arange(L, dtype=torch.int32)[:, None] * S + step.seq_slots[None, :]).reshape(-1)  # [L*N]
                every_layer = StepPlan.make(torch.arange(L * N + 1, dtype=torch.int32), folded, step.ctx_lens.repeat(L),
                                            W, dev)
                self._evict(cache, *(stash[n].flatten(0, 1) for n in ("k", "v", "scores")), every_layer,
                            cache.all_layers())
        return logits
