"""The distribution `sample` draws from, read exactly (not estimated from draws).

Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 are exact in float32, so top_p can sit exactly on a
cumulative mass. The rule (as in transformers' TopPLogitsWarper): a token is dropped once the
mass of the tokens ranked before it reaches top_p; the most likely token always stays.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvzap_trt.runtime.sampler import SamplingParams, sample

# token id -> probability; the ranking (3, 0, 4, then 1 and 2 tied) differs from the id order.
PROBS = {3: 1 / 2, 0: 1 / 4, 4: 1 / 8, 1: 1 / 16, 2: 1 / 16}
LOGITS = torch.tensor([math.log(PROBS[t]) for t in range(5)])


def drawn_from(monkeypatch, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, int]:
    """(the probabilities handed to torch.multinomial, the token sampled)."""
    seen = []
    real = torch.multinomial

    def spy(probs, *args, **kwargs):
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    token = sample(logits, params, torch.Generator().manual_seed(0))
    (probs,) = seen
    return probs, token


def test_probabilities_are_exact_in_float32():
    assert torch.equal(LOGITS.softmax(-1), torch.tensor([PROBS[t] for t in range(5)]))


# top_p, the probability of each token id after the cut (written by hand)
TOP_P_CASES = [
    (0.5, [0, 0, 0, 1, 0]),                      # token 0's mass-before is exactly 0.5: dropped
    (0.5 + 2**-20, [1 / 3, 0, 0, 2 / 3, 0]),     # just above the boundary: token 0 stays
    (0.75, [1 / 3, 0, 0, 2 / 3, 0]),             # token 4's mass-before is exactly 0.75: dropped
    (0.875, [2 / 7, 0, 0, 4 / 7, 1 / 7]),
    (0.3, [0, 0, 0, 1, 0]),                      # below the first token's mass: it alone stays
    (1.0, [1 / 4, 1 / 16, 1 / 16, 1 / 2, 1 / 8]),  # no cut
]


@pytest.mark.parametrize("top_p,want", TOP_P_CASES)
def test_top_p_nucleus_exactly_on_and_off_the_boundary(monkeypatch, top_p, want):
    probs, token = drawn_from(monkeypatch, LOGITS, SamplingParams(temperature=1.0, top_p=top_p))
    want = torch.tensor(want, dtype=torch.float32)
    assert torch.equal(probs == 0, want == 0)  # exactly the nucleus, no token more or less
    assert torch.allclose(probs, want, rtol=1e-6, atol=0)
    assert want[token] > 0


def test_top_k_then_top_p(monkeypatch):
    """top_k 2 leaves tokens 3 and 0 (2/3 and 1/3 of the rest); top_p 0.6 < 2/3 then drops token 0,
    which top_p 0.6 alone would keep (its mass-before is 1/2)."""
    probs, _ = drawn_from(monkeypatch, LOGITS, SamplingParams(temperature=1.0, top_k=2, top_p=0.6))
    assert torch.equal(probs, torch.tensor([0.0, 0, 0, 1, 0]))


def test_temperature_scales_logits_before_the_cut(monkeypatch):
    """Temperature 0.5 squares the probabilities: 1/4, 1/16, 1/64, 1/256, 1/256 before normalising."""
    probs, _ = drawn_from(monkeypatch, LOGITS, SamplingParams(temperature=0.5))
    raw = torch.tensor([1 / 16, 1 / 256, 1 / 256, 1 / 4, 1 / 64])
    assert torch.allclose(probs, raw / raw.sum(), rtol=1e-5, atol=0)
