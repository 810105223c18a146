"""Annotator agreement and vote aggregation as pure functions (no database, no web).

Labels are one of CHOICES per (pair, annotator). Written here rather than imported: sklearn's
cohen_kappa_score is two-rater only and statsmodels' fleiss_kappa needs a fixed number of raters
per item; both are a few lines, and neither library is otherwise a dependency.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations

CHOICES = ("a", "b", "tie", "both_bad")


def raw_agreement(items: Sequence[Sequence[str]]) -> float:
    """Share of agreeing rater pairs over all items with >= 2 labels; nan when there are none."""
    agree = total = 0
    for labels in items:
        for x, y in combinations(labels, 2):
            agree += x == y
            total += 1
    return agree / total if total else float("nan")


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float:
    """Cohen's kappa of two raters on the same items: (p_o - p_e) / (1 - p_e).

    nan for no items; 1.0 when both agree everywhere on a single category (p_e = 1)."""
    if len(x) != len(y):
        raise ValueError("cohen_kappa needs the two raters' labels on the same items")
    n = len(x)
    if n == 0:
        return float("nan")
    p_o = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    p_e = sum(cx[c] * cy[c] for c in set(cx) | set(cy)) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(items: Sequence[Sequence[str]]) -> float:
    """Fleiss' kappa over items with >= 2 labels each (any number of raters per item).

    P_i = sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)); P_bar = mean P_i; p_j = share of all labels in
    category j; P_e = sum_j p_j^2; kappa = (P_bar - P_e) / (1 - P_e)."""
    rated = [labels for labels in items if len(labels) >= 2]
    if not rated:
        return float("nan")
    p_i = []
    totals: Counter[str] = Counter()
    for labels in rated:
        counts = Counter(labels)
        n = len(labels)
        p_i.append(sum(c * (c - 1) for c in counts.values()) / (n * (n - 1)))
        totals.update(counts)
    all_labels = sum(totals.values())
    p_e = sum((c / all_labels) ** 2 for c in totals.values())
    p_bar = sum(p_i) / len(p_i)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def majority(votes: Sequence[str]) -> str | None:
    """The plurality choice; 'tie' when 'a' and 'b' are tied on top; None without votes.

    A split between a preference and 'tie' / 'both_bad' goes to the most votes; an exact draw
    between a side and a non-side is a 'tie' (no clear preference)."""
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    top = sorted(c for c, n in counts.items() if n == best)
    return top[0] if len(top) == 1 else "tie"


def export_vote(votes: Sequence[str]) -> str | None:
    """The vote the export uses: 'a', 'b', 'tie', 'both_bad' (leave the pair out), None without votes.

    'Both bad' says nothing about which side is better, so it never enters the side vote (it used
    to draw against a side and turn "A is better" + "both bad" into a tie). A pair is left out as
    both bad when more than half of its votes say so; otherwise `majority` of the other votes
    decides: ["a", "both_bad"] -> "a", ["a", "b", "both_bad"] -> "tie", ["both_bad", "both_bad", "a"]
    -> "both_bad"."""
    if not votes:
        return None
    bad = sum(v == "both_bad" for v in votes)
    if 2 * bad > len(votes):
        return "both_bad"
    return majority([v for v in votes if v != "both_bad"])


def mean_pairwise_cohen(by_rater: Mapping[str, Mapping[int, str]]) -> float:
    """Average Cohen's kappa over every two raters with at least 2 items in common."""
    kappas = []
    for r1, r2 in combinations(sorted(by_rater), 2):
        common = sorted(set(by_rater[r1]) & set(by_rater[r2]))
        if len(common) >= 2:
            kappas.append(cohen_kappa([by_rater[r1][i] for i in common], [by_rater[r2][i] for i in common]))
    return sum(kappas) / len(kappas) if kappas else float("nan")
