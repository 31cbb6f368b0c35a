"""Choose tau for a target compression on a calibration corpus, and report its spread.

Compression is kvpress's, as a prefill of each prompt would give it: the positions older than
the window whose surrogate log-score is below tau are evicted, evicted / (kv_heads x tokens)
averaged over layers. The chosen tau makes the mean over prompts hit the target (bisection); the
paper notes about ±20% spread across prompts at a fixed tau, reported here as measured. The
compression counts the window's tokens, so it grows with the prompt's length at a fixed tau;
`evicted_past_window_mean` (the share of the tokens older than the window that go) does not.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_trt.atomic import atomic_write_text
from kvzap_trt.errors import KvzapError
from kvzap_trt.oracle.kvzip import context_ids, surrogate_scores


def prompt_compression(scores: torch.Tensor, tau: float, window: int) -> float:
    """scores: [L, Hkv, T] log-scores of one prompt -> its compression ratio at tau after prefill."""
    T = scores.shape[-1]
    old = scores[..., : max(0, T - window)]
    return float((old < tau).float().sum((1, 2)).div(scores.shape[1] * T).mean())


def past_window_eviction(scores: torch.Tensor, tau: float, window: int) -> float | None:
    """scores: [L, Hkv, T] -> the share of the positions older than the window evicted at tau
    (None when the prompt fits the window). Unlike the compression, it does not grow with the
    prompt's length: what a threshold does, whatever the window keeps."""
    old = scores[..., : max(0, scores.shape[-1] - window)]
    return float((old < tau).float().mean()) if old.numel() else None


def calibrate(model, tokenizer, surrogate, texts: list[str], target: float, window: int) -> dict:
    if not 0 < target < 1:
        raise KvzapError(f"target compression must be in (0, 1), got {target}")
    all_scores = [surrogate_scores(model, surrogate, context_ids(tokenizer, t)[0])
                  for t in tqdm(texts, desc="surrogate scores", unit="text")]
    mean_at = lambda tau: sum(prompt_compression(s, tau, window) for s in all_scores) / len(all_scores)  # noqa: E731
    lo = min(float(s.min()) for s in all_scores) - 1
    hi = max(float(s.max()) for s in all_scores) + 1
    if mean_at(hi) < target:
        raise KvzapError(f"the window of {window} tokens keeps more than {1 - target:.0%} of these prompts: "
                         f"at most {mean_at(hi):.0%} compression is reachable")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < target else (lo, mid)
    tau = (lo + hi) / 2
    per_prompt = torch.tensor([prompt_compression(s, tau, window) for s in all_scores])
    past = [e for e in (past_window_eviction(s, tau, window) for s in all_scores) if e is not None]
    return {"threshold": tau, "target": target, "window": window, "prompts": len(texts),
            "compression_mean": float(per_prompt.mean()), "compression_std": float(per_prompt.std()) if len(texts) > 1 else 0.0,
            "compression_min": float(per_prompt.min()), "compression_max": float(per_prompt.max()),
            "evicted_past_window_mean": sum(past) / len(past) if past else None}


def write_threshold(preset_path: Path, tau: float) -> None:
    """Replace the preset's `threshold:` line, keeping its comments (atomic rename)."""
    text = preset_path.read_text()
    new, n = re.subn(r"(?m)^threshold:.*$", f"threshold: {tau:.4f}", text)
    if n != 1:
        raise KvzapError(f"{preset_path} has no single `threshold:` line to update")
    atomic_write_text(preset_path, new)
