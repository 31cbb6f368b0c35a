"""Scores exactly on tau are kept (kvpress keeps `score >= threshold`).

Random float scores never land on tau; real surrogate scores do: a bf16 score near the paper's
tau of -4.0 or -7.0 is a multiple of 1/32, so many tokens tie. Here scores sit on a coarse grid
that contains tau, and the reference op, the CPU fast path (what CPU runs use) and, where a GPU
is, the CUDA kernel are compared with a hand-written expectation and with the naive model of tests/cache_sim.py, every stored
tensor read back (tests/cache_check.py).
"""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.ops.dispatch import CPU, CUDA, REFERENCE
from tests.cache_check import check_cache
from tests.cache_sim import SimSeq, make_cache, write_chunk


def grid_seq(cache, scores: torch.Tensor, seed: int) -> SimSeq:
    """A sequence with the given scores [T, H] and random K/V in the cache's dtype."""
    g = torch.Generator().manual_seed(seed)
    T, (H, D) = scores.shape[0], (cache.spec.num_kv_heads, cache.spec.head_dim)
    k, v = (torch.randn(T, H, D, generator=g).to(cache.spec.dtype) for _ in range(2))
    return SimSeq(k, v, scores, cache.add_sequence())


OPS = pytest.mark.parametrize("ops,device", [
    pytest.param(REFERENCE, "cpu", id="reference"),
    pytest.param(CPU, "cpu", id="cpu-fast"),
    pytest.param(CUDA, "cuda", id="cuda", marks=pytest.mark.gpu),
])


@OPS
@pytest.mark.parametrize("chunks", [[8], [1] * 8, [3, 1, 4]])
def test_scores_equal_to_tau_are_kept_by_hand(chunks, ops, device):
    tau = 0.5
    cache = make_cache(H=2, D=4, W=2, bs=2, device=device)
    scores = torch.tensor([[0.5, 0.25, 0.75, 0.5, 0.5, 0.0, 0.5, 1.0],   # head 0
                           [0.5] * 8]).T                                  # head 1: every score is tau
    seq = grid_seq(cache, scores, seed=1)
    for n in chunks:
        write_chunk(cache, [seq], [n], tau, ops)
    # Positions 0..5 left the window of 2: kept iff score >= 0.5; 6 and 7 are in the window.
    assert cache.kept_positions(seq.slot)[0] == [[0, 2, 3, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    check_cache(cache, [seq], tau)


# window, block size, chunk sizes per sequence (prefill, decode, chunked prefill, a batch)
SCHEDULES = [
    (4, 4, [[40, 1, 1, 1]]),
    (0, 2, [[30, 1, 1]]),
    (8, 16, [[1] * 30]),
    (6, 4, [[20, 20, 1], [3, 1, 1], [50, 1, 0]]),
]


@OPS
@pytest.mark.parametrize("window,block_size,chunks", SCHEDULES)
def test_grid_scores_with_tau_on_the_grid_match_the_naive_model(window, block_size, chunks, ops, device):
    tau = 0.25
    cache = make_cache(H=3, D=4, W=window, bs=block_size, seed=window, device=device)
    g = torch.Generator().manual_seed(window + block_size)
    seqs = [grid_seq(cache, torch.randint(-3, 4, (sum(c), 3), generator=g) * 0.25, seed=i)
            for i, c in enumerate(chunks)]
    assert sum(int((s.scores == tau).sum()) for s in seqs) >= 10  # ties really occur
    for step in range(max(len(c) for c in chunks)):
        active = [(s, c[step]) for s, c in zip(seqs, chunks) if step < len(c)]
        write_chunk(cache, [s for s, _ in active], [n for _, n in active], tau, ops)
        check_cache(cache, seqs, tau)


@OPS
@pytest.mark.parametrize("tau", [-4.0, -7.0])
def test_bf16_scores_at_the_papers_tau(tau, ops, device):
    """bf16 cache and bf16 scores (the surrogate scores in the model's dtype) one step of 1/32
    around tau: tau itself is kept, tau - 1/32 is not."""
    cache = make_cache(H=2, D=8, W=4, bs=4, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(int(-tau))
    scores = (tau + torch.randint(-2, 3, (60, 2), generator=g) / 32).to(torch.bfloat16)
    assert torch.unique(scores).numel() == 5  # five distinct bf16 values, tau among them
    seq = grid_seq(cache, scores, seed=3)
    for n in [30, 1, 1, 20, 1]:
        write_chunk(cache, [seq], [n], tau, ops)
        check_cache(cache, [seq], tau)
    left = scores[: seq.written - 4].float()  # [n, H] positions that left the window
    assert int((left == tau).sum()) > 5
    kept = torch.tensor([len(p) - 4 for p in cache.kept_positions(seq.slot)[0]])
    assert torch.equal(kept, (left >= tau).sum(0))
    below = (left == tau - 1 / 32).nonzero().tolist()  # [[position, head], ...]
    assert below and all(p not in cache.kept_positions(seq.slot)[0][h] for p, h in below)

