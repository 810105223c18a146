"""Reward-model quality metrics as pure functions of scores (no model, no trainer).

`r_chosen` / `r_rejected` are the scalar rewards of the two sides of N preference pairs, shape
(N,). Under the Bradley-Terry model the predicted probability that chosen beats rejected is
sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).
"""

from __future__ import annotations

import math

import torch


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly, (N,) x (N,) -> scalar; an exact tie counts as half."""
    if r_chosen.numel() == 0:
        return float("nan")
    d = r_chosen - r_rejected
    return ((d > 0).float() + 0.5 * (d == 0).float()).mean().item()


def mean_margin(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Mean of r_chosen - r_rejected over the pairs, (N,) x (N,) -> scalar."""
    return (r_chosen - r_rejected).mean().item() if r_chosen.numel() else float("nan")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None) -> float:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin), (N,) -> scalar (the training loss)."""
    d = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return (-torch.nn.functional.logsigmoid(d)).mean().item() if d.numel() else float("nan")


def calibration_table(r_chosen: torch.Tensor, r_rejected: torch.Tensor, bins: int = 5) -> dict:
    """Predicted confidence vs observed accuracy, in equal-width bins over [0.5, 1].

    For each pair the model's confidence in its own ranking is max(p, 1 - p) with
    p = sigmoid(r_chosen - r_rejected); it is right when p > 1/2. A calibrated model is right in
    a bin as often as its mean confidence there says. Also returns the expected calibration error
    (ECE: count-weighted mean |confidence - accuracy|).
    """
    p = torch.sigmoid((r_chosen - r_rejected).double())
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    rows, ece, n = [], 0.0, max(conf.numel(), 1)
    for i in range(bins):
        lo, hi = edges[i].item(), edges[i + 1].item()
        inside = (conf >= lo) & ((conf < hi) if i < bins - 1 else (conf <= hi))
        count = int(inside.sum())
        mean_conf = conf[inside].mean().item() if count else float("nan")
        accuracy = correct[inside].mean().item() if count else float("nan")
        if count:
            ece += count / n * abs(mean_conf - accuracy)
        rows.append({"bin": f"{lo:.2f}-{hi:.2f}", "count": count, "mean_confidence": mean_conf, "accuracy": accuracy})
    return {"bins": rows, "ece": ece if conf.numel() else float("nan")}


def precision_recall(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Treat score > threshold as "good": precision, recall and F1 against 0/1 labels, (N,) each."""
    pred = scores > threshold
    truth = labels.bool()
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1, "count": int(labels.numel())}


def format_calibration(table: dict) -> str:
    lines = ["confidence  count  mean conf  accuracy"]
    for row in table["bins"]:
        mc = "-" if math.isnan(row["mean_confidence"]) else f"{row['mean_confidence']:.3f}"
        acc = "-" if math.isnan(row["accuracy"]) else f"{row['accuracy']:.3f}"
        lines.append(f"{row['bin']:<10}  {row['count']:>5}  {mc:>9}  {acc:>8}")
    lines.append(f"ECE {table['ece']:.4f}")
    return "\n".join(lines)
