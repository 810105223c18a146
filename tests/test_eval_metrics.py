"""Evaluation metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlhf.eval import metrics


def test_win_rate_counts_ties_as_half():
    assert metrics.win_rate([3, 1, 2, 5], [1, 1, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert metrics.win_rate([1.0], [2.0]) == 0.0
    assert math.isnan(metrics.win_rate([], []))
    with pytest.raises(ValueError, match="paired"):
        metrics.win_rate([1, 2], [1])


def test_distinct_n_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4]]
    # unigrams: 1,2,3,1,2,4 -> 4 unique of 6; bigrams: (1,2),(2,3),(1,2),(2,4) -> 3 of 4
    assert metrics.distinct_n(seqs, 1) == pytest.approx(4 / 6)
    assert metrics.distinct_n(seqs, 2) == pytest.approx(3 / 4)
    assert metrics.distinct_n([[7, 7, 7, 7]], 2) == pytest.approx(1 / 3)
    assert metrics.distinct_n([[1], []], 2) == 0.0  # no bigram at all


def test_pearson_and_spearman_by_hand():
    x, y = [1, 2, 3, 4], [2, 4, 6, 8]
    assert metrics.pearson(x, y) == pytest.approx(1.0)
    assert metrics.pearson(x, [8, 6, 4, 2]) == pytest.approx(-1.0)
    # x = 1,2,3 ; y = 1,3,2: means 2, 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = syy = 2 -> 0.5
    assert metrics.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))  # constant side
    assert math.isnan(metrics.pearson([1], [2]))
    # monotone but not linear: Spearman 1, Pearson below 1
    assert metrics.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3, 4], [1, 10, 100, 1000]) < 0.9


def test_ranks_average_ties():
    assert metrics.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]


def test_length_stats():
    s = metrics.length_stats([2, 4, 4, 10])
    assert s == {"mean": 5.0, "median": 4.0, "min": 2.0, "max": 10.0, "std": pytest.approx(3.0)}
    assert math.isnan(metrics.length_stats([])["mean"])
