"""The per-round view of an `rlhf rounds` run: report.md, report.json and rounds.png.

Read from what the rounds wrote (round manifests, each round's evaluation report), so it can be
rebuilt at any time and says only what was measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = {
    "labels": "labels",
    "preferences": "preferences (not ties)",
    "accuracy_before": "RM acc. before (all new pairs)",
    "accuracy_before_heldout": "RM acc. before (held out, pairs)",
    "accuracy_after_heldout": "RM acc. after (held out, pairs)",
    "ground_truth": "ground truth",
    "reward_mean": "reward",
    "kl_to_sft": "KL to SFT",
    "forgetting_ppl_rise": "forgetting",
    "hit_length_limit": "hit limit",
    "blind_spot": "blind spot",
    "length_mean": "length",
    "seconds": "wall s",
}


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def round_row(run: Path, k: int) -> dict[str, Any] | None:
    """One round's numbers, or None when it has not finished."""
    d = run / f"round-{k}"
    manifest = _json(d / "round.json")
    evaluation = _json(d / "eval" / "report.json")
    if manifest is None or evaluation is None:
        return None
    policy = evaluation["summary"].get("ppo" if k else "sft", {})
    row: dict[str, Any] = {"round": k}
    if k:
        acc = manifest["accuracy"]
        row |= {
            "labels": manifest["batch"]["labels"],
            "preferences": acc["before_all"]["pairs"],
            "accuracy_before": acc["before_all"]["accuracy"],
            "accuracy_before_heldout": acc["before_heldout"]["accuracy"],
            "accuracy_after_heldout": acc["after_heldout"]["accuracy"],
            "heldout_pairs": acc["after_heldout"]["pairs"],
            "seconds": manifest.get("seconds_this_invocation"),
        }
    for key in ("ground_truth", "reward_mean", "kl_to_sft", "forgetting_ppl_rise", "hit_length_limit", "length_mean"):
        if key in policy:
            row[key] = policy[key]
    spot = _blind_spot(d, evaluation, "ppo" if k else "sft")
    if spot is not None:
        row["blind_spot"] = spot
    return row


def _blind_spot(d: Path, evaluation: dict[str, Any], name: str) -> float | None:
    """Share of the policy's evaluation answers showing the grader's known blind-spot behaviour
    (rlhf.tasks.BLIND_SPOTS), or None when the grader has none."""
    from rlhf.tasks import BLIND_SPOTS

    from rlhf.checkpoint import MANIFEST

    manifest = _json(d / "eval" / MANIFEST) or {}
    grader = manifest.get("recipe", {}).get("ground_truth")
    if grader not in BLIND_SPOTS:
        return None
    shows = BLIND_SPOTS[grader][1]
    answers = [s["response"] for s in evaluation.get("samples", []) if s["policy"] == name]
    return sum(map(shows, answers)) / len(answers) if answers else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def _cell(r: dict[str, Any], c: str) -> str:
    if c.endswith("_heldout") and r.get("heldout_pairs") is not None:  # a held-out accuracy with its pair count
        return f"{_fmt(r.get(c))} ({r['heldout_pairs']})"
    return _fmt(r.get(c))


def table(rows: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    out = ["| round | " + " | ".join(COLUMNS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        out.append(f"| {r['round']} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    return out


def _plot(run: Path, rows: list[dict[str, Any]]) -> str | None:
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["round"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ks, [r.get("ground_truth", math.nan) for r in rows], "o-")
    ax[0].set(title="ground truth (held-out prompts)", xlabel="round")
    later = [r for r in rows if r["round"] > 0]
    ax[1].plot([r["round"] for r in later], [r["accuracy_before"] for r in later], "o-", label="before update (all)")
    ax[1].plot(
        [r["round"] for r in later], [r["accuracy_after_heldout"] for r in later], "s-", label="after (held out)"
    )
    ax[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    ax[1].set(title="reward model on the round's on-policy pairs", xlabel="round", ylim=(0, 1))
    ax[1].legend(fontsize=8)
    ax[2].plot(ks, [r.get("kl_to_sft", math.nan) for r in rows], "o-", label="KL to SFT")
    if any("forgetting_ppl_rise" in r for r in rows):
        ax[2].plot(ks, [r.get("forgetting_ppl_rise", math.nan) for r in rows], "s-", label="forgetting")
    ax[2].set(title="drift", xlabel="round")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(ks)
    fig.tight_layout()
    fig.savefig(run / "rounds.png", dpi=100)
    plt.close(fig)
    return "rounds.png"


def write(run: Path, last: int) -> Path:
    """Rebuild the report from rounds 0..last (those finished); returns report.md's path."""
    rows = [row for k in range(last + 1) if (row := round_row(run, k)) is not None]
    plot = _plot(run, rows)
    md = [
        f"# Rounds report: {run.name}",
        "",
        "Round 0 is the SFT policy with the initial reward model. In round k the reward model of round "
        "k-1 is measured on the round's new on-policy pairs before it trains on them (*before*: all of "
        "them; the held-out part alone), then again after its update on the held-out part it never "
        "trained on (*after*). Ground truth, reward, KL, forgetting, hit limit and length are the round's "
        "policy on the evaluation recipe's held-out prompts; *reward* is scored by that round's own reward "
        "model, so it does not compare across rounds (ground truth does). *Blind spot*: the share of its "
        "answers showing the behaviour the ground truth penalises and the initial preference data never "
        "shows (when the grader names one). *Preferences*: the labelled pairs that were not ties (the "
        "accuracies count only these). *Wall s*: the round's time in the invocation that finished it "
        "(sampling, labelling, reward update, RL and evaluation; less when it resumed).",
        "",
        *table(rows),
        "",
        *([f"![rounds]({plot})", ""] if plot else []),
    ]
    (run / "report.md").write_text("\n".join(md) + "\n")
    (run / "report.json").write_text(json.dumps({"rounds": rows}, indent=2))
    return run / "report.md"
