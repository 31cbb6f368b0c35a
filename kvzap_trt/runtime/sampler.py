"""Next-token choice: greedy, or seeded sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] float32 -> token id."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
