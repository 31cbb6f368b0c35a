"""The KV embedding of one sequence slot, read from the paged cache itself.

The paper (Xing et al., ICLR 2026, arXiv 2601.20326; its MTEB code, cmd2001/ICLR2026_KV-Embedding
`mteb/custom_model.py`, with the settings it evaluates: `kv_part="kv_cat", pos_agg="mean",
head_agg="mean", layer_agg="mean", normalize_embeddings=True`, the last 4 layers) computes, from
HF's `past_key_values` (K after RoPE, V):

    per layer l, kv head h:  m[l, h] = [mean_t K[l, h, t] ; mean_t V[l, h, t]]   (token-centric)  [2D]
    per layer:               e[l]    = mean_h m[l, h]                                              [2D]
    embedding:               e       = normalize(mean_l e[l])                       (layer-wise)   [2D]

Here the tokens of a head are what our cache holds for it: its kept pages (kept_len[l, s, h]
tokens) and the window (the last min(ctx, W) positions, every head). With eviction off that is
every token, and the formula is the paper's. With KVzap each head holds its own subset, so:
- the token mean of a head runs over that head's held tokens only (its own count, not T);
- heads are averaged uniformly (each head's mean counts once, however many tokens it kept), as
  the paper's head mean does in the dense case; a head holding nothing (possible only with
  window 0) is left out of the mean rather than counted as zeros.
Nothing evicted can be recovered, so eviction changes the embedding only through the kept set.

Cost: gathers of the selected layers' kept and window pages (`[Ls, H, pages, bs, D]`, the kept
columns bounded by what has left the window, known on the host), no second forward pass, and the
result stays on the device (the caller reads it once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvzap_trt.cache.paged_cache import PagedKVCache
from kvzap_trt.errors import KvzapError

HEAD_AGGS = ("mean", "flatten")


def head_means(cache: PagedKVCache, slot: int, layers: list[int], since: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (layer, kv head) means of the K and V the cache holds for `slot` (kept pages + window),
    over the held tokens at positions >= `since` (0: all; kvcoe/coe.py takes the answer's).

    Returns means [Ls, H, 2, D] float32 (index 0: K, 1: V; zeros for a head holding nothing) and
    counts [Ls, H] int64 (tokens each head holds), both on the cache's device.
    """
    spec = cache.spec
    bs, W, ctx = spec.block_size, spec.window, cache.ctx_len[slot]
    if ctx == 0:
        raise KvzapError(f"sequence slot {slot} holds no tokens: nothing to embed")
    li = torch.tensor(layers, dtype=torch.long, device=cache.device)
    sums = torch.zeros(len(layers), spec.num_kv_heads, 2, spec.head_dim, dtype=torch.float32, device=cache.device)
    kept = cache.kept_len[li, slot].long()  # [Ls, H]
    # Kept pages: kept_len <= tokens that have left the window, so these columns cover every head.
    cols = -(-max(0, ctx - W) // bs)
    if cols:
        blocks = cache.block_table[li, slot, :, :cols].clamp(min=0).long()  # [Ls, H, cols] (-1 read as 0, masked)
        held = torch.arange(cols * bs, device=cache.device) < kept[..., None]  # [Ls, H, cols*bs]
        if since > 0:  # kept entries carry their position in pos_pool
            held &= cache.pos_pool[blocks].flatten(2, 3) >= since
            kept = held.sum(2)
        held = held.float()[..., None]  # [Ls, H, cols*bs, 1]
        for i, pool in enumerate((cache.k_pool, cache.v_pool)):
            pages = pool[blocks].flatten(2, 3).float()  # [Ls, H, cols*bs, D]
            sums[:, :, i] += (pages * held).sum(2)
    # Window: slots [0, min(ctx, W)) of each head's window pages, all valid; slot j holds the one
    # position p of the last min(ctx, W) with p % W == j (known on the host).
    in_window = min(ctx, W)
    if in_window:
        ring = cache.ring_table[li, slot, :, : -(-in_window // bs)].long()  # [Ls, H, R']
        rows: slice | torch.Tensor = slice(0, in_window)
        if since > 0:
            pick = sorted(p % W for p in range(max(since, ctx - in_window), ctx))
            rows, in_window = torch.tensor(pick, dtype=torch.long, device=cache.device), len(pick)
        for i, pool in enumerate((cache.k_pool, cache.v_pool)):
            sums[:, :, i] += pool[ring].flatten(2, 3)[:, :, rows].float().sum(2)
    counts = kept + in_window
    return sums / counts.clamp(min=1)[..., None, None].float(), counts


@dataclass(frozen=True)
class KVEmbedding:
    """last_layers: how many of the last layers to use (0: all; the paper's MTEB runs use 4).
    head_agg: "mean" (the paper's, [2D]) or "flatten" (heads side by side, [H * 2D]).
    normalize: L2-normalise the result (the paper does)."""

    last_layers: int = 4
    head_agg: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.last_layers < 0:
            raise KvzapError(f"last_layers must be >= 0 (0: all layers), got {self.last_layers}")
        if self.head_agg not in HEAD_AGGS:
            raise KvzapError(f"head_agg must be one of {', '.join(HEAD_AGGS)}, got {self.head_agg!r}")

    def layers(self, num_layers: int) -> list[int]:
        n = num_layers if self.last_layers == 0 else min(self.last_layers, num_layers)
        return list(range(num_layers - n, num_layers))

    def dim(self, num_kv_heads: int, head_dim: int) -> int:
        return 2 * head_dim * (num_kv_heads if self.head_agg == "flatten" else 1)

    def __call__(self, cache: PagedKVCache, slot: int) -> torch.Tensor:
        """The embedding of `slot` as the cache holds it now: [dim] float32 on the cache's device."""
        means, counts = head_means(cache, slot, self.layers(cache.spec.num_layers))  # [Ls, H, 2, D], [Ls, H]
        if self.head_agg == "flatten":
            per_layer = means.flatten(1)  # [Ls, H * 2D]
        else:
            present = (counts > 0).float()[..., None]  # [Ls, H, 1]
            per_layer = (means.flatten(2) * present).sum(1) / present.sum(1).clamp(min=1)  # [Ls, 2D]
        e = per_layer.mean(0)
        return torch.nn.functional.normalize(e, dim=0) if self.normalize else e
