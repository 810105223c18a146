"""Evaluation metrics as pure functions on plain Python lists (no torch), unit-tested by hand.

Written here rather than imported: each is a few lines, and scipy/sklearn would be a heavy
dependency for a rank correlation and a win rate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of paired items where `a` beats `b`; ties count one half. (N,), (N,) -> scalar.

    This is how a judge (here the reward model) compares two policies answering the same prompts.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores, got {len(a)} and {len(b)}")
    if not a:
        return float("nan")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of token sequences.

    1.0 means no n-gram repeats anywhere; a policy that collapses onto one phrase goes towards 0.
    Sequences shorter than n contribute nothing; with no n-grams at all the answer is 0.
    """
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of paired samples; nan when either side is constant or n < 2."""
    if len(x) != len(y):
        raise ValueError(f"pearson needs paired samples, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return float("nan")
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks with ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson on average ranks."""
    return pearson(ranks(x), ranks(y))


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median, min, max and standard deviation of response lengths (tokens)."""
    if not lengths:
        return {
            "mean": float("nan"),
            "median": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "std": float("nan"),
        }
    return {
        "mean": statistics.fmean(lengths),
        "median": float(statistics.median(lengths)),
        "min": float(min(lengths)),
        "max": float(max(lengths)),
        "std": statistics.pstdev(lengths) if len(lengths) > 1 else 0.0,
    }


def mean(x: Sequence[float]) -> float:
    return statistics.fmean(x) if x else float("nan")
