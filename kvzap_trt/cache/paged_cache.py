"""The KVzap cache: per-(layer, seq, kv_head) pages in one block pool, plus a window ring.

Layout (DESIGN.md section 3):
  k_pool, v_pool  [num_blocks, block_size, D]   one block = block_size tokens of one (layer, seq, kv_head)
  pos_pool        [num_blocks, block_size] int32 absolute position of each stored token
  block_table     [L, S, Hkv, M] int32           block ids of each head's kept pages (-1: none)
  kept_len        [L, S, Hkv] int32              tokens in each head's kept pages
  ring_k, ring_v  [L, S, Hkv, W, D]              the window: position p lives in slot p % W
  ring_score      [L, S, Hkv, W] float32         log-scores of the window's tokens
  ctx_len         [S] (host)                     tokens written so far per sequence slot

Kept pages are append-only and nothing is ever moved. Blocks come from `BlockAllocator`, whose
free count drives admission. The ring is allocated per sequence slot up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvzap_trt.cache.allocator import BlockAllocator
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import CacheFullError


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
        """K + V + positions of one block."""
        return self.block_size * (2 * self.head_dim * self.elem_bytes + 4)

    @property
    def ring_bytes(self) -> int:
        """K + V + scores of one sequence's window, all layers and heads."""
        return self.num_layers * self.num_kv_heads * self.window * (2 * self.head_dim * self.elem_bytes + 4)

    def dense_bytes(self, tokens: int) -> int:
        """K + V of `tokens` tokens in an uncompressed cache."""
        return tokens * self.num_layers * self.num_kv_heads * 2 * self.head_dim * self.elem_bytes

    def prefill_blocks(self, prompt_tokens: int) -> int:
        """Blocks a fresh sequence may take in its prefill: every token leaving the window kept."""
        leaving = max(0, prompt_tokens - self.window)
        return self.num_layers * self.num_kv_heads * math.ceil(leaving / self.block_size)


@dataclass
class LayerCache:
    """Views of one layer: what the ops take."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    pos_pool: torch.Tensor
    block_table: torch.Tensor  # [S, Hkv, M]
    kept_len: torch.Tensor  # [S, Hkv]
    ring_k: torch.Tensor  # [S, Hkv, W, D]
    ring_v: torch.Tensor
    ring_score: torch.Tensor  # [S, Hkv, W]


class PagedKVCache:
    def __init__(self, spec: CacheSpec, device: torch.device | str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        L, S, H, W, D = spec.num_layers, spec.max_seqs, spec.num_kv_heads, spec.window, spec.head_dim
        nb, bs = spec.num_blocks, spec.block_size
        kw = dict(device=self.device)
        self.k_pool = torch.zeros(nb, bs, D, dtype=spec.dtype, **kw)
        self.v_pool = torch.zeros(nb, bs, D, dtype=spec.dtype, **kw)
        self.pos_pool = torch.full((nb, bs), -1, dtype=torch.int32, **kw)
        self.block_table = torch.full((L, S, H, spec.max_blocks_per_head), -1, dtype=torch.int32, **kw)
        self.kept_len = torch.zeros(L, S, H, dtype=torch.int32, **kw)
        self.ring_k = torch.zeros(L, S, H, W, D, dtype=spec.dtype, **kw)
        self.ring_v = torch.zeros(L, S, H, W, D, dtype=spec.dtype, **kw)
        self.ring_score = torch.zeros(L, S, H, W, dtype=torch.float32, **kw)
        self.ctx_len = [0] * S
        self.allocator = BlockAllocator(nb, self.device)
        self.free_slots = list(range(S - 1, -1, -1))

    def layer(self, i: int) -> LayerCache:
        return LayerCache(
            self.k_pool, self.v_pool, self.pos_pool, self.block_table[i], self.kept_len[i],
            self.ring_k[i], self.ring_v[i], self.ring_score[i],
        )

    def all_layers(self) -> LayerCache:
        """Every layer's views with the layer folded into the slot dimension: slot l * S + s here is
        slot s of layer l (block_table [L*S, Hkv, M], ring_k [L*S, Hkv, W, D], ...). A layer's
        eviction touches only its own tables, so one op call over these can evict all layers."""
        L, S = self.spec.num_layers, self.spec.max_seqs

        def fold(t: torch.Tensor) -> torch.Tensor:
            return t.view(L * S, *t.shape[2:])

        return LayerCache(self.k_pool, self.v_pool, self.pos_pool, fold(self.block_table), fold(self.kept_len),
                          fold(self.ring_k), fold(self.ring_v), fold(self.ring_score))

    def add_sequence(self) -> int:
        if not self.free_slots:
            raise CacheFullError(f"all {self.spec.max_seqs} sequence slots are in use")
        slot = self.free_slots.pop()
        self.ctx_len[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Return every block of `slot` to the pool and free the slot."""
        table = self.block_table[:, slot]  # [L, H, M]
        held = to_host(table)  # a mask on the device would sync anyway (its count sizes the result)
        self.allocator.push(held[held >= 0])
        table.fill_(-1)
        self.kept_len[:, slot] = 0
        self.ctx_len[slot] = 0
        self.free_slots.append(slot)

    def blocks_needed(self, slot: int, new_tokens: int) -> int:
        """Most blocks `slot` can take when it next writes `new_tokens` tokens (all leavers kept)."""
        return self.blocks_needed_many([slot], new_tokens)[0]

    def blocks_needed_many(self, slots: list[int], new_tokens: int) -> list[int]:
        """Most blocks each of `slots` can take when each next writes `new_tokens` tokens.

        Every token leaving a window is counted as kept: a head takes a block exactly when its
        kept length crosses a block boundary. One device read (kept_len of all `slots`), none
        when `slots` is empty.
        """
        if not slots:
            return []
        W, bs = self.spec.window, self.spec.block_size
        ctx = [self.ctx_len[s] for s in slots]
        leaving = torch.tensor([max(0, c + new_tokens - W) - max(0, c - W) for c in ctx])  # [B]
        kept = to_host(self.kept_len[:, slots]).long()  # [L, B, H]
        grown = kept + leaving[None, :, None]
        return (-(-grown // bs) - (-(-kept // bs))).sum((0, 2)).tolist()  # ceil(grown/bs) - ceil(kept/bs)

    def blocks_held(self, slot: int) -> int:
        return int((to_host(self.block_table[:, slot]) >= 0).sum())

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
            "bytes_allocated": self.blocks_held(slot) * spec.block_bytes + spec.ring_bytes,
            "bytes_dense": spec.dense_bytes(tokens),
        }
        if positions:
            out["positions"] = self.kept_positions(slot)
        return out
