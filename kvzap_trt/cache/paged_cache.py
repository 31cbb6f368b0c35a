"""The KVzap cache: per-(layer, seq, kv_head) pages in one block pool, the window's pages included.

Layout (DESIGN.md section 3):
  k_pool, v_pool  [num_blocks, block_size, D]   one block = block_size tokens of one (layer, seq, kv_head)
  pos_pool        [num_blocks, block_size] int32 absolute position of each stored token
  score_pool      [num_blocks, block_size] f32   its log-score (the window's are read when it leaves)
  block_table     [L, S, Hkv, M] int32           block ids of each head's kept pages (-1: none)
  kept_len        [L, S, Hkv] int32              tokens in each head's kept pages
  ring_table      [L, S, Hkv, R] int32           block ids of each head's window pages, R = ceil(W / bs):
                                                 position p lives in window slot p % W, column (p % W) // bs
  ctx_len         [S] (host)                     tokens written so far per sequence slot

Kept pages are append-only and nothing is ever moved. Every block, kept or window, comes from
`BlockAllocator`, whose free count drives admission: one number is the whole KV budget, and a
sequence of c tokens holds ceil(min(c, W) / bs) window pages per head, so a short request costs
about its dense size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvzap_trt.cache.allocator import BlockAllocator
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import CacheFullError


def window_pages(tokens: int, window: int, block_size: int) -> int:
    """Window pages one head holds with `tokens` tokens written: ceil(min(tokens, W) / bs)."""
    return -(-min(tokens, window) // block_size)


@dataclass(frozen=True)
class CacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    window: int
    block_size: int
    num_blocks: int
    max_seqs: int
    max_seq_len: int
    dtype: torch.dtype = torch.float32

    @property
    def max_blocks_per_head(self) -> int:
        return math.ceil(self.max_seq_len / self.block_size)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """K + V + position + score of one block."""
        return self.block_size * (2 * self.head_dim * self.elem_bytes + 8)

    @property
    def ring_pages(self) -> int:
        """R: window pages of one head when the window is full."""
        return window_pages(self.window, self.window, self.block_size)

    def window_pages(self, tokens: int) -> int:
        """Window pages one head holds with `tokens` tokens written."""
        return window_pages(tokens, self.window, self.block_size)

    def dense_bytes(self, tokens: int) -> int:
        """K + V of `tokens` tokens in an uncompressed cache."""
        return tokens * self.num_layers * self.num_kv_heads * 2 * self.head_dim * self.elem_bytes

    def prefill_blocks(self, prompt_tokens: int) -> int:
        """Blocks a fresh sequence may take in its prefill: its window pages, and every token
        leaving the window kept."""
        leaving = max(0, prompt_tokens - self.window)
        per_head = math.ceil(leaving / self.block_size) + self.window_pages(prompt_tokens)
        return self.num_layers * self.num_kv_heads * per_head


@dataclass
class LayerCache:
    """Views of one layer: what the ops take."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    pos_pool: torch.Tensor
    score_pool: torch.Tensor
    block_table: torch.Tensor  # [S, Hkv, M]
    kept_len: torch.Tensor  # [S, Hkv]
    ring_table: torch.Tensor  # [S, Hkv, R]


class PagedKVCache:
    def __init__(self, spec: CacheSpec, device: torch.device | str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        if spec.window < 0 or spec.block_size < 1:
            raise ValueError(f"window {spec.window} must be >= 0 and block_size {spec.block_size} >= 1")
        L, S, H, D = spec.num_layers, spec.max_seqs, spec.num_kv_heads, spec.head_dim
        nb, bs = spec.num_blocks, spec.block_size
        kw = dict(device=self.device)
        self.k_pool = torch.zeros(nb, bs, D, dtype=spec.dtype, **kw)
        self.v_pool = torch.zeros(nb, bs, D, dtype=spec.dtype, **kw)
        self.pos_pool = torch.full((nb, bs), -1, dtype=torch.int32, **kw)
        self.score_pool = torch.zeros(nb, bs, dtype=torch.float32, **kw)
        self.block_table = torch.full((L, S, H, spec.max_blocks_per_head), -1, dtype=torch.int32, **kw)
        self.kept_len = torch.zeros(L, S, H, dtype=torch.int32, **kw)
        self.ring_table = torch.full((L, S, H, spec.ring_pages), -1, dtype=torch.int32, **kw)
        self.ctx_len = [0] * S
        self.allocator = BlockAllocator(nb, self.device)
        self.free_slots = list(range(S - 1, -1, -1))

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k_pool, self.v_pool, self.pos_pool, self.score_pool, self.block_table[i],
                          self.kept_len[i], self.ring_table[i])

    def all_layers(self) -> LayerCache:
        """Every layer's views with the layer folded into the slot dimension: slot l * S + s here is
        slot s of layer l (block_table [L*S, Hkv, M], ring_table [L*S, Hkv, R], ...). A layer's
        eviction touches only its own tables, so one op call over these can evict all layers."""
        L, S = self.spec.num_layers, self.spec.max_seqs

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.view(L * S, *t.shape[2:])

        return LayerCache(self.k_pool, self.v_pool, self.pos_pool, self.score_pool, fold(self.block_table),
                          fold(self.kept_len), fold(self.ring_table))

    def add_sequence(self) -> int:
        if not self.free_slots:
            raise CacheFullError(f"all {self.spec.max_seqs} sequence slots are in use")
        slot = self.free_slots.pop()
        self.ctx_len[slot] = 0
        return slot

    def release(self, slot: int) -> int:
        """Return every block of `slot` (kept and window pages) to the pool and free the slot;
        returns how many blocks it held."""
        tables = (self.block_table[:, slot], self.ring_table[:, slot])  # [L, H, M], [L, H, R]
        held = to_host(torch.cat([t.flatten() for t in tables]))  # a device mask would sync anyway
        held = held[held >= 0]
        self.allocator.push(held)
        for t in tables:
            t.fill_(-1)
        self.kept_len[:, slot] = 0
        self.ctx_len[slot] = 0
        self.free_slots.append(slot)
        return held.numel()

    def blocks_needed(self, slot: int, new_tokens: int) -> int:
        """Most blocks `slot` can take when it next writes `new_tokens` tokens (all leavers kept)."""
        return self.blocks_needed_many([slot], new_tokens)[0]

    def read_kept(self, slots: list[int]) -> torch.Tensor:
        """kept_len of `slots` on the host: [L, B, H] int64. One device read, none for no slots."""
        if not slots:
            return torch.zeros(self.spec.num_layers, 0, self.spec.num_kv_heads, dtype=torch.long)
        return to_host(self.kept_len[:, slots]).long()

    def blocks_needed_many(self, slots: list[int], new_tokens: int | list[int],
                           kept: torch.Tensor | None = None) -> list[int]:
        """Most blocks each of `slots` can take when it next writes `new_tokens` tokens (one count
        for all, or one per slot).

        Every token leaving a window is counted as kept: a head takes a block exactly when its
        kept length crosses a block boundary, or when its window reaches a new page (known from
        the context length alone). kept: `read_kept(slots)` if the caller has it; else one device
        read here (none when `slots` is empty).
        """
        if not slots:
            return []
        spec, W, bs = self.spec, self.spec.window, self.spec.block_size
        ctx = [self.ctx_len[s] for s in slots]
        new = [new_tokens] * len(slots) if isinstance(new_tokens, int) else list(new_tokens)
        if len(new) != len(slots):
            raise ValueError(f"{len(new)} token counts for {len(slots)} slots")
        leaving = torch.tensor([max(0, c + n - W) - max(0, c - W) for c, n in zip(ctx, new)])  # [B]
        kept = self.read_kept(slots) if kept is None else kept  # [L, B, H]
        grown = kept + leaving[None, :, None]
        paged = (-(-grown // bs) - (-(-kept // bs))).sum((0, 2))  # ceil(grown/bs) - ceil(kept/bs), summed
        heads = spec.num_layers * spec.num_kv_heads
        window = torch.tensor([heads * (spec.window_pages(c + n) - spec.window_pages(c)) for c, n in zip(ctx, new)])
        return (paged + window).tolist()

    def blocks_held(self, slot: int) -> int:
        """Kept and window pages of `slot`, all layers and heads."""
        held = torch.cat([self.block_table[:, slot].flatten(), self.ring_table[:, slot].flatten()])
        return int((to_host(held) >= 0).sum())

    def kept_positions(self, slot: int) -> list[list[list[int]]]:
        """[layer][kv_head] -> sorted absolute positions held (kept pages + window)."""
        c, W = self.ctx_len[slot], self.spec.window
        ring = list(range(max(0, c - W), c))
        kept = to_host(self.kept_len[:, slot])  # [L, H]
        used = math.ceil(int(kept.max()) / self.spec.block_size)  # table columns in use by the fullest head
        blocks = self.block_table[:, slot, :, :used].clamp(min=0).long()  # [L, H, used] (-1: unused, read as 0)
        pages = to_host(self.pos_pool[blocks]).flatten(2)  # [L, H, used * block_size]
        return [[sorted(pages[layer, h, :n].tolist() + ring) for h, n in enumerate(heads)]
                for layer, heads in enumerate(kept.tolist())]

    def stats(self, slot: int, positions: bool = False) -> dict[str, Any]:
        """The `kv` object of `kvzap-trt generate --json` for one sequence."""
        spec, tokens = self.spec, self.ctx_len[slot]
        in_window = min(tokens, spec.window)
        kept = (to_host(self.kept_len[:, slot]) + in_window).tolist()  # [L][H]
        per_layer = [1 - sum(k) / (spec.num_kv_heads * tokens) if tokens else 0.0 for k in kept]
        out: dict[str, Any] = {
            "tokens": tokens,
            "kept": kept,
            "compression_ratio": sum(per_layer) / len(per_layer),
            "bytes_allocated": self.blocks_held(slot) * spec.block_bytes,
            "bytes_dense": spec.dense_bytes(tokens),
        }
        if positions:
            out["positions"] = self.kept_positions(slot)
        return out
