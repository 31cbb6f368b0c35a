"""kvzap_trt/eval/paired.py: the paired interval's coverage and edge cases, the exact sign test."""

from __future__ import annotations

import pytest
import torch

from kvzap_trt.eval.paired import paired_difference


def test_paired_difference_counts_the_split_and_its_sign_test():
    d = paired_difference([1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0])
    assert (d["delta"], d["lower"], d["higher"]) == (0.5, 0, 3)
    assert d["p"] == 0.25  # 3 of 3 differing samples one way: 2 * (1/2)^3
    assert paired_difference([0] * 6 + [1] * 3, [1] * 6 + [1] * 3)["p"] == 2 / 64
    assert paired_difference([1, 0], [1, 0])["p"] == 1.0  # nothing differs
    frac = paired_difference([0.5, 1.0], [0.25, 1.0])  # fractional scores: no interval, the test still
    assert (frac["delta"], frac["low"], frac["high"], frac["higher"]) == (0.125, None, None, 1)
    for a, b in (([1, 0], [1]), ([], [])):
        with pytest.raises(ValueError, match="equally long, non-empty"):
            paired_difference(a, b)


def test_paired_interval_where_every_pair_agrees_is_what_the_sample_size_allows():
    # 6 samples all right under both: no difference seen, but with 6 samples the rate of either
    # could be as low as Wilson's lower bound for 6/6, n / (n + z^2): the interval is +-(1 - that).
    d = paired_difference([1] * 6, [1] * 6)
    z2 = 1.959963984540054 ** 2
    assert d["delta"] == 0 and d["high"] == pytest.approx(1 - 6 / (6 + z2)) and d["low"] == pytest.approx(-d["high"])
    more = paired_difference([1] * 60, [1] * 60)
    assert 0 < more["high"] < d["high"] / 4  # narrows with the samples


@pytest.mark.parametrize("n", [12, 60])
def test_paired_interval_covers_the_true_difference_about_95_percent_of_the_time(n):
    # Method A right with p 0.8, B with p 0.6, through a shared difficulty (B's right answers are a
    # subset of A's: the most correlated pairs); the true difference is 0.2.
    rng = torch.Generator().manual_seed(n)
    covered, trials = 0, 400
    for _ in range(trials):
        u = torch.rand(n, generator=rng)
        d = paired_difference((u < 0.8).int().tolist(), (u < 0.6).int().tolist())
        covered += d["low"] - 1e-9 <= 0.2 <= d["high"] + 1e-9
    assert 0.9 <= covered / trials <= 0.995
