"""The cache ops' contract, and the per-step plan every implementation shares.

Three implementations (`dispatch.ops` picks one per device: the PyTorch references, the CPU fast
path, the CUDA kernels) provide `CacheOps`: the references' signatures (evict_append.py,
paged_attention.py, surrogate_score.py), the two cache ops with a keyword `plan` as well.

Plan once per step, run per layer (flashinfer's `wrapper.plan()` / `run()`). What the ops derive
from a step's batch description is the same for every layer: the host lists and their
validation, the routing of rows by kind (fresh prompts, chunks over a cache, decode rows), the
attention's key bound, and for the kernels the description's device copies and the attention's
split and workspace. The executor makes one `StepPlan` per step (and one for a decode step's
all-layers eviction) and every layer's calls take it; an implementation keeps what it derives in
the plan (`memo`), never in a module-level cache. Without a plan an op plans for itself, so a
single call (a test, a benchmark) needs none. A plan belongs to one batch: an op given another
batch's tensors with it refuses it. The references take `plan` and ignore it: the oracle derives
everything per call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from kvzap_trt.errors import KvzapError

T = TypeVar("T")


def check_batch(cu: tuple[int, ...], slots: tuple[int, ...], ctx: tuple[int, ...], num_slots: int | None,
                num_rows: int | None) -> None:
    """KvzapError naming the argument if the batch description could make a kernel index out of
    its tensors: cu_seqlens [B+1] from 0, non-decreasing, ending at N; seq_slots [B] distinct, in
    [0, S); ctx_lens [B] >= 0."""
    if len(cu) != len(slots) + 1 or len(ctx) != len(slots):
        raise KvzapError(f"cu_seqlens has {len(cu)} entries and ctx_lens {len(ctx)} for {len(slots)} seq_slots")
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or (num_rows is not None and cu[-1] != num_rows):
        raise KvzapError(f"cu_seqlens {list(cu)} must rise from 0 to the {num_rows} packed rows")
    if len(set(slots)) != len(slots) or (num_slots is not None and not all(0 <= s < num_slots for s in slots)):
        raise KvzapError(f"seq_slots {list(slots)} must be distinct slots in [0, {num_slots})")
    if any(c < 0 for c in ctx):
        raise KvzapError(f"ctx_lens {list(ctx)} must be >= 0")


def key_bound(host_cu: tuple[int, ...], host_ctx: tuple[int, ...], window: int, max_kept: int | None) -> int:
    """An upper bound of the keys any row of a batch sees: kept + min(ctx, W) + its new tokens up
    to itself, at most the longest context plus the longest chunk. With max_kept (no head of the
    batch holds more kept tokens) the bound follows the compressed cache, not the context."""
    chunk = max((b - a for a, b in zip(host_cu, host_cu[1:])), default=0)
    ctx = max(host_ctx, default=0)
    cached = ctx if max_kept is None else min(ctx, max_kept + min(ctx, window))
    return cached + chunk


def indexed(device: torch.device | str) -> torch.device:
    """`device` with its index ("cuda" -> the current CUDA device): what a plan's copies go to."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class Routing:
    """A step's sequences by kind (fresh_prompts.py routes the rows with it).

    fresh: (start, end) rows of each fresh prompt (ctx 0, several new tokens)
    chunks: (start, end, slot, ctx) of each chunk over a cache (ctx > 0, several new tokens),
      when the implementation routes them (else they stay in `rest`)
    rest: the other sequences as one batch (decode rows, one-token prompts; None: there are none)
    rest_rows: [n] long on the plan's device: the rest's rows in the step's packing (None: the
      rest is the whole step, in order); copied on the stream of the step's first layer, so a
      plan serves one stream (the torch executor's forward runs on one)
    """

    fresh: tuple[tuple[int, int], ...]
    chunks: tuple[tuple[int, int, int, int], ...]
    rest: "StepPlan | None"
    rest_rows: torch.Tensor | None


@dataclass(eq=False)
class StepPlan:
    """One step's batch description as every layer's ops use it.

    cu_seqlens: [B+1]  seq_slots: [B]  ctx_lens: [B]  int32 host tensors (the ops' arguments);
    cu, slots, ctx: the same as Python ints.  window: W.  device: where the cache lives (indexed).
    max_kept: no head of the batch holds more kept tokens when the step starts (None: unknown);
    the attention sizes its splits from it (`key_bound`).
    """

    cu_seqlens: torch.Tensor
    seq_slots: torch.Tensor
    ctx_lens: torch.Tensor
    cu: tuple[int, ...]
    slots: tuple[int, ...]
    ctx: tuple[int, ...]
    window: int
    device: torch.device
    max_kept: int | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, cu_seqlens: torch.Tensor, seq_slots: torch.Tensor, ctx_lens: torch.Tensor, window: int,
             device: torch.device | str, max_kept: int | None = None) -> "StepPlan":
        """The plan of one batch (host tensors: .tolist() reads no device)."""
        cu, slots, ctx = (tuple(t.tolist()) for t in (cu_seqlens, seq_slots, ctx_lens))
        return cls(cu_seqlens, seq_slots, ctx_lens, cu, slots, ctx, int(window), indexed(device), max_kept)

    @classmethod
    def of(cls, plan: "StepPlan | None", cu_seqlens: torch.Tensor, seq_slots: torch.Tensor, ctx_lens: torch.Tensor,
           window: int, device: torch.device | str, max_kept: int | None = None) -> "StepPlan":
        """An op's plan: the caller's, checked to be of these very tensors and bounds, or a new one."""
        if plan is None:
            return cls.make(cu_seqlens, seq_slots, ctx_lens, window, device, max_kept)
        if plan.cu_seqlens is not cu_seqlens or plan.seq_slots is not seq_slots or plan.ctx_lens is not ctx_lens:
            raise KvzapError("the plan was made for another batch (cu_seqlens, seq_slots, ctx_lens are not its tensors)")
        if plan.window != window or (max_kept is not None and max_kept != plan.max_kept):
            raise KvzapError(f"the plan has window {plan.window} and max_kept {plan.max_kept}; the call passes "
                             f"{window} and {max_kept}")
        if indexed(device) != plan.device:
            raise KvzapError(f"the plan was made for {plan.device}; the call's tensors are on {device}")
        return plan

    @property
    def lens(self) -> tuple[int, ...]:
        """[B] new tokens of each sequence."""
        return self.memo("lens", lambda: tuple(b - a for a, b in zip(self.cu, self.cu[1:])))

    @property
    def max_chunk(self) -> int:
        """Most new tokens of any sequence."""
        return max(self.lens, default=0)

    @property
    def key_bound(self) -> int:
        """`key_bound` of this batch: the most keys any of its rows sees."""
        return self.memo("key_bound", lambda: key_bound(self.cu, self.ctx, self.window, self.max_kept))

    def validate(self, num_slots: int, num_rows: int) -> None:
        """`check_batch` against a cache of num_slots slots and num_rows packed rows, once per plan."""
        self.memo(("valid", num_slots, num_rows), lambda: check_batch(self.cu, self.slots, self.ctx, num_slots, num_rows))

    def memo(self, key: Any, make: Callable[[], T]) -> T:
        """make() the first time `key` is asked for, the same object afterwards (this step only)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def routing(self, chunks: bool) -> Routing:
        """The step's sequences by kind; chunks over a cache routed apart only if `chunks`."""
        return self.memo(("routing", chunks), lambda: self._route(chunks))

    def _route(self, chunks: bool) -> Routing:
        fresh, chunk, rest = [], [], []
        for b, (start, end, c) in enumerate(zip(self.cu, self.cu[1:], self.ctx)):
            if end - start > 1 and c == 0:
                fresh.append((start, end))
            elif end - start > 1 and chunks:
                chunk.append((start, end, self.slots[b], c))
            else:
                rest.append(b)
        if rest and len(rest) == len(self.slots):
            return Routing((), (), self, None)
        if not rest:
            return Routing(tuple(fresh), tuple(chunk), None, None)
        lens = [self.lens[b] for b in rest]
        sub_cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        idx = torch.tensor(rest)
        sub = StepPlan.make(sub_cu, self.seq_slots[idx], self.ctx_lens[idx], self.window, self.device, self.max_kept)
        rows = torch.cat([torch.arange(self.cu[b], self.cu[b + 1]) for b in rest]).to(self.device)
        return Routing(tuple(fresh), tuple(chunk), sub, rows)


class CacheOps(Protocol):
    """What `dispatch.ops(device)` returns (argument lists as the references')."""

    name: str

    def surrogate_score(self, hidden: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor | None,
                        b2: torch.Tensor | None) -> torch.Tensor: ...

    def evict_append(self, k_new, v_new, scores, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, pos_pool, score_pool,
                     block_table, kept_len, ring_table, free_stack, num_free, window: int, threshold: float, *,
                     plan: StepPlan | None = None) -> None: ...

    def paged_attention(self, q, k_new, v_new, cu_seqlens, seq_slots, ctx_lens, k_pool, v_pool, block_table, kept_len,
                        ring_table, window: int, scale: float, max_kept: int | None = None, *,
                        plan: StepPlan | None = None) -> torch.Tensor: ...

    def deferred_errors(self, device: torch.device | str) -> AbstractContextManager[None]: ...
