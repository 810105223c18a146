"""Agreement and vote aggregation against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlhf.label import agreement


def test_raw_agreement():
    # item 1: (a,a) agree; item 2: (a,b),(a,a),(b,a) -> 1 of 3; single-label items do not count
    assert agreement.raw_agreement([["a", "a"], ["a", "b", "a"], ["tie"]]) == pytest.approx(2 / 4)
    assert math.isnan(agreement.raw_agreement([["a"]]))


def test_cohen_kappa_by_hand():
    x = ["a", "a", "b", "b"]
    y = ["a", "b", "b", "b"]
    # p_o = 3/4; p_e = (2*1 + 2*3) / 16 = 1/2 -> kappa = (0.75 - 0.5) / 0.5 = 0.5
    assert agreement.cohen_kappa(x, y) == pytest.approx(0.5)
    assert agreement.cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert agreement.cohen_kappa(["a", "a"], ["a", "a"]) == 1.0  # p_e = 1
    assert agreement.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        agreement.cohen_kappa(["a"], [])


def test_fleiss_kappa_by_hand():
    items = [["a", "a", "a"], ["a", "b", "b"], ["b", "b", "b"], ["a", "a", "b"]]
    # P_i: 1, 1/3, 1, 1/3 -> P_bar = 2/3; p_a = p_b = 6/12 -> P_e = 1/2; kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert agreement.fleiss_kappa(items) == pytest.approx(1 / 3)
    assert agreement.fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert math.isnan(agreement.fleiss_kappa([["a"]]))


def test_majority_vote():
    assert agreement.majority(["a", "a", "b"]) == "a"
    assert agreement.majority(["a", "b"]) == "tie"
    assert agreement.majority(["both_bad", "both_bad", "a"]) == "both_bad"
    assert agreement.majority(["b", "tie"]) == "tie"  # no clear preference
    assert agreement.majority([]) is None


def test_export_vote_rule():
    assert agreement.export_vote(["a", "both_bad"]) == "a"  # was a tie: both bad is no side vote
    assert agreement.export_vote(["b", "both_bad", "both_bad"]) == "both_bad"  # most say both bad: left out
    assert agreement.export_vote(["a", "b", "both_bad"]) == "tie"
    assert agreement.export_vote(["a", "tie"]) == "tie"
    assert agreement.export_vote(["a", "a", "b"]) == "a"
    assert agreement.export_vote(["both_bad"]) == "both_bad"
    assert agreement.export_vote([]) is None


def test_mean_pairwise_cohen():
    by = {"x": {1: "a", 2: "a", 3: "b", 4: "b"}, "y": {1: "a", 2: "b", 3: "b", 4: "b"}, "z": {9: "a"}}
    assert agreement.mean_pairwise_cohen(by) == pytest.approx(0.5)  # z shares no items
