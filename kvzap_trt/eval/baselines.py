"""Baselines at the same compression as a KVzap run, as surrogate-like objects for the engine.

The engine evicts a KV pair leaving the window when its score is < tau; these objects only say
what the score is (`score(layer, hidden) -> [N, Hkv]`), so every baseline runs the same cache,
kernels and accounting as KVzap.

- window only (StreamingLLM-like, without attention sinks): every score is -inf, so everything
  that leaves the window is evicted. Its compression is 1 - W/T for T tokens, so it is matched
  to a KVzap run by its window: W = the KVzap run's mean kept tokens per head.
- random eviction at the same per-head rate: score = log(u) - log(q[l, h]) with u ~ U(0, 1) and
  tau = 0, so a pair leaving head (l, h)'s window is evicted with probability q[l, h]. q is the
  KVzap run's fraction of leaving pairs it evicted in that head (`leave_rates`), so each head
  keeps, in expectation, what KVzap kept there, and the window is KVzap's.
"""

from __future__ import annotations

import torch


class WindowOnly:
    """Scores -inf everywhere: with any finite tau, a pair leaving the window is evicted."""

    source = "window-only"

    def __init__(self, num_kv_heads: int):
        self.num_kv_heads = num_kv_heads

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, d] -> [N, Hkv] float32, all -inf."""
        return torch.full((hidden.shape[0], self.num_kv_heads), float("-inf"), device=hidden.device)

    def to(self, device) -> "WindowOnly":
        return self


class RandomEviction:
    """Random log-scores with P(score < 0) = rates[l, h] per layer and kv head; use tau = 0.

    rates: [L, Hkv] in [0, 1]; seed fixes the draws (one generator, drawn in call order).
    """

    source = "random"

    def __init__(self, rates: torch.Tensor, seed: int = 0):
        if rates.dim() != 2 or not bool(((rates >= 0) & (rates <= 1)).all()):
            raise ValueError(f"rates must be [layers, kv heads] in [0, 1], got shape {tuple(rates.shape)}")
        self.log_rates = rates.double().log().float()  # -inf where nothing is evicted: scores +inf
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, d] -> [N, Hkv] float32: log(u) - log(rate), negative with probability rate."""
        u = torch.rand((hidden.shape[0], self.log_rates.shape[1]), generator=self.generator)
        return (u.log() - self.log_rates[layer]).to(hidden.device)

    def to(self, device) -> "RandomEviction":
        return self


def leave_rates(kvs: list[dict], window: int) -> torch.Tensor:
    """[L, Hkv]: over the runs' `kv` reports, evicted pairs / pairs that left the window, per head.

    kv["kept"] is [L][Hkv] kept counts (window included) of kv["tokens"] tokens; a head evicts
    only what left its window, max(tokens - window, 0) pairs.
    """
    kept = torch.tensor([kv["kept"] for kv in kvs], dtype=torch.float64)  # [S, L, H]
    tokens = torch.tensor([kv["tokens"] for kv in kvs], dtype=torch.float64)[:, None, None]
    left = (tokens - window).clamp(min=0)
    evicted = tokens - kept
    total_left = left.expand_as(kept).sum(0)
    return torch.where(total_left > 0, evicted.sum(0) / total_left.clamp(min=1), 0.0).clamp(0, 1).float()


def matched_window(kvs: list[dict]) -> int:
    """The window whose window-only run keeps what these runs kept: mean kept tokens per head."""
    kept = [sum(map(sum, kv["kept"])) / (len(kv["kept"]) * len(kv["kept"][0])) for kv in kvs]
    return round(sum(kept) / len(kept))
