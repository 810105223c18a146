"""The evaluation report: report.md (read it at a glance), report.json, PNG plots, wandb.

Plots use matplotlib's Agg backend (files only, no display), imported here and nowhere else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhf.config_run import EvalRecipe
from rlhf.data.formats import Messages
from rlhf.tracking import METRICS_FILE, read_jsonl

HEADLINE = [
    "reward_mean",
    "win_rate_vs_sft",
    "ground_truth",
    "heldout_reward_mean",
    "kl_to_sft",
    "forgetting_ppl_rise",
    "length_mean",
    "distinct_2",
    "hit_length_limit",
    "shorter_than_half_sft",
    "reward_length_correlation",
    "train_seconds",
    "peak_memory_mb",
]
LABELS = {
    "reward_mean": "reward",
    "win_rate_vs_sft": "win vs SFT",
    "ground_truth": "ground truth",
    "heldout_reward_mean": "held-out RM",
    "kl_to_sft": "KL to SFT",
    "length_mean": "length",
    "distinct_2": "distinct-2",
    "hit_length_limit": "hit limit",
    "shorter_than_half_sft": "short",
    "reward_length_correlation": "corr(reward, len)",
    "forgetting_ppl_rise": "forgetting",
    "train_seconds": "train s",
    "peak_memory_mb": "peak MB",
}


def headline(results: list[dict]) -> dict[str, dict[str, float]]:
    """Per policy, the numbers of the report's table (absent ones omitted)."""
    out = {}
    for r in results:
        row = {k: r[k] for k in HEADLINE if k in r}
        row["length_mean"] = r["length"]["mean"]
        out[r["name"]] = {k: row[k] for k in HEADLINE if k in row}
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _table(summary: dict[str, dict[str, float]]) -> list[str]:
    cols = [k for k in HEADLINE if any(k in row for row in summary.values())]
    lines = ["| model | " + " | ".join(LABELS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c, float("nan"))) for c in cols) + " |")
    return lines


def _forgetting(summary: dict[str, dict[str, float]], limit: float) -> list[str]:
    """One line: every policy's forgetting measure, and which ones rose past the limit."""
    rises = {n: r["forgetting_ppl_rise"] for n, r in summary.items() if "forgetting_ppl_rise" in r and n != "base"}
    if not rises:
        return []
    over = [n for n, v in rises.items() if v > limit]
    listed = ", ".join(f"{n} {100 * v:+.1f}%" for n, v in rises.items())
    verdict = f"over the {100 * limit:g}% limit: {', '.join(over)}" if over else f"all within {100 * limit:g}%"
    return [
        f"- Forgetting (perplexity of the base model's answers to general questions, vs base): {listed}; {verdict}."
    ]


def _verdict(summary: dict[str, dict[str, float]], limit: float = 0.05) -> list[str]:
    """Plain sentences: did PPO beat SFT, and are there signs of reward hacking?"""
    if "ppo" not in summary:
        return []
    ppo, sft = summary["ppo"], summary["sft"]
    judged = (
        f"reward {_fmt(sft['reward_mean'])} -> {_fmt(ppo['reward_mean'])}, judged better on "
        f"{100 * ppo['win_rate_vs_sft']:.0f}% of answers, "
        if "win_rate_vs_sft" in ppo
        else ""
    )
    lines = [f"- PPO vs SFT: {judged}KL to SFT {_fmt(ppo['kl_to_sft'])} nats."]
    if "ground_truth" in ppo:
        lines.append(
            f"- Ground truth (never seen in training): {_fmt(sft['ground_truth'])} -> "
            f"{_fmt(ppo['ground_truth'])} ({ppo['ground_truth'] - sft['ground_truth']:+.1f})."
        )
    best = next((k for k in summary if k.startswith("sft_best_of_")), None)
    if best and "ground_truth" in ppo:
        beat = ppo["ground_truth"] > summary[best]["ground_truth"]
        lines.append(
            f"- {best.replace('sft_', '').replace('_', '-')} of SFT samples (reward-model reranking): ground "
            f"truth {_fmt(summary[best]['ground_truth'])}; PPO {'beats' if beat else 'does not beat'} it."
        )
    warn = []
    if ppo.get("forgetting_ppl_rise", 0.0) > limit:
        warn.append(f"PPO forgot: perplexity on general answers rose {100 * ppo['forgetting_ppl_rise']:.0f}% over base")
    if (
        "heldout_reward_mean" in ppo
        and ppo["heldout_reward_mean"] < sft["heldout_reward_mean"] < sft["reward_mean"] < ppo["reward_mean"]
    ):
        warn.append("the held-out reward model scores PPO below SFT while the training reward rose")
    if ppo["hit_length_limit"] > max(0.2, 2 * sft["hit_length_limit"]):
        warn.append(f"{100 * ppo['hit_length_limit']:.0f}% of PPO answers run into the length limit")
    if ppo["shorter_than_half_sft"] > max(0.02, 2 * sft["shorter_than_half_sft"]):
        warn.append(f"{100 * ppo['shorter_than_half_sft']:.0f}% of PPO answers are under half SFT's median length")
    if abs(ppo.get("reward_length_correlation", 0.0) or 0.0) > 0.5:
        warn.append(f"reward correlates with length ({ppo['reward_length_correlation']:.2f})")
    if ppo["distinct_2"] < 0.5 * sft["distinct_2"]:
        warn.append("distinct-2 fell by more than half: the answers collapsed onto few phrasings")
    lines.append("- Reward-hacking monitors: " + ("; ".join(warn) if warn else "no warning signs."))
    return lines


def _methods(summary: dict[str, dict[str, float]], recipe: EvalRecipe) -> list[str]:
    """One line per method run (PPO and the recipe's rl_variants: RL and DPO-family runs)."""
    names = [n for n in ["ppo", *(v.name for v in recipe.rl_variants)] if n in summary]
    if len(names) < 2:
        return []
    sft = summary["sft"]
    lines = ["## Methods side by side", ""]
    for n in names:
        row = summary[n]
        gt = (
            f"ground truth {_fmt(row['ground_truth'])} ({row['ground_truth'] - sft['ground_truth']:+.1f} vs SFT), "
            if "ground_truth" in row
            else ""
        )
        forgot = f"forgetting {100 * row['forgetting_ppl_rise']:+.1f}%, " if "forgetting_ppl_rise" in row else ""
        lines.append(
            f"- {n}: {gt}reward {_fmt(row['reward_mean'])}, KL to SFT {_fmt(row['kl_to_sft'])}, {forgot}"
            f"{_fmt(row.get('train_seconds', float('nan')))} s, peak {_fmt(row.get('peak_memory_mb', float('nan')))} MB"
        )
    return [*lines, ""]


def _plots(out: Path, results: list[dict], ppo_dir: str | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = read_jsonl(Path(ppo_dir) / METRICS_FILE) if ppo_dir and (Path(ppo_dir) / METRICS_FILE).is_file() else []
    rows = [r for r in rows if isinstance(r.get("reward_mean"), float)]
    if rows:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        a.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows])
        a.set(title="reward during PPO", xlabel="PPO step", ylabel="mean reward-model score")
        b.plot([r["step"] for r in rows], [r["kl"] for r in rows], color="tab:red")
        b.set(title="KL to reference during PPO", xlabel="PPO step", ylabel="KL per response (nats)")
        fig.tight_layout(), fig.savefig(out / "ppo_curves.png", dpi=100), plt.close(fig)
        made.append("ppo_curves.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(max(r["lengths"], default=1) for r in results)
    for r in results:
        ax.hist(r["lengths"], bins=range(0, top + 2), alpha=0.5, label=r["name"])
    ax.set(title="response length per model", xlabel="tokens", ylabel="responses"), ax.legend()
    fig.tight_layout(), fig.savefig(out / "lengths.png", dpi=100), plt.close(fig)
    made.append("lengths.png")
    keys = ["reward_mean"] + (["ground_truth"] if "ground_truth" in results[0] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.bar([r["name"] for r in results], [r[key] for r in results], color="tab:green")
        ax.set(title=LABELS[key] + " per model")
    fig.tight_layout(), fig.savefig(out / "scores.png", dpi=100), plt.close(fig)
    made.append("scores.png")
    return made


def _side_by_side(results: list[dict], prompts: list[Messages], k: int) -> list[str]:
    lines = []
    for i in range(min(k, len(prompts))):
        lines.append(f"**{prompts[i][-1]['content']}**\n")
        for r in results:
            j = r["prompt_index"].index(i)  # the first sample of prompt i
            lines.append(f"- *{r['name']}* (reward {r['rewards'][j]:.2f}): {r['texts'][j] or '(empty)'}")
        lines.append("")
    return lines


def _setup_line(prompts: int, recipe: EvalRecipe) -> str:
    """The report's first sentence: how the answers were drawn and who judges them."""
    if recipe.greedy:
        drawn = f"{prompts} held-out prompts, one greedy answer per model (KL to SFT not estimated), "
    else:
        drawn = (
            f"{prompts} held-out prompts x {recipe.samples_per_prompt} samples per model, "
            f"temperature {recipe.generation.temperature}, "
        )
    judge = (
        f"The reward model ({recipe.reward_dir}) scores every answer and judges win rates against SFT on the "
        "same prompt and sample."
        if recipe.reward_dir
        else "No reward model: the task's ground-truth grader is the measure."
    )
    return drawn + f"at most {recipe.generation.max_new_tokens} new tokens. " + judge


def write_report(out: Path, results: list[dict], prompts: list[Messages], recipe: EvalRecipe) -> dict:
    """Write report.md, report.json and the plots into `out`; returns the headline table."""
    summary = headline(results)
    plots = _plots(out, results, recipe.ppo_dir)
    md = [
        f"# Evaluation report: {Path(recipe.output_dir).name}",
        "",
        _setup_line(len(prompts), recipe),
        "",
        *_table(summary),
        "",
        "## Verdict",
        "",
        *_verdict(summary, recipe.forgetting_limit),
        *_forgetting(summary, recipe.forgetting_limit),
        "",
        *_methods(summary, recipe),
        "Columns: *reward* mean reward-model score; *win vs SFT* share of answers the reward model prefers to "
        "SFT's; *KL to SFT* mean log p(answer) - log p_SFT(answer) in nats; *length* tokens; *distinct-2* unique "
        "bigrams / all bigrams; *hit limit* share of answers cut at the length limit; *short* share of answers "
        "under half the SFT median length; *corr(reward, len)* Pearson "
        "correlation of reward with length (a length-gaming monitor); *train s* and *peak MB* the RL stage's "
        "wall time and peak memory (GPU memory allocated, or peak RSS on CPU), from its manifest.",
        "",
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        "## Side by side",
        "",
        *_side_by_side(results, prompts, recipe.side_by_side),
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    full = {
        "summary": summary,
        "prompts": len(prompts),
        "samples_per_prompt": recipe.samples_per_prompt,
        "greedy": recipe.greedy,
        "plots": plots,
        "policies": [
            {k: v for k, v in r.items() if k not in ("rewards", "lengths", "texts", "prompt_index")} for r in results
        ],
        "samples": [
            {"policy": r["name"], "prompt": prompts[i][-1]["content"], "response": t, "reward": w}
            for r in results
            for i, t, w in zip(r["prompt_index"], r["texts"], r["rewards"])
        ],
    }
    (out / "report.json").write_text(json.dumps(full, indent=2, default=str))
    return summary


def log_to_wandb(out: Path, recipe: EvalRecipe, summary: dict) -> None:
    """The headline table and the plots, in the pipeline's wandb group (offline by default)."""
    from rlhf.config import to_dict
    from rlhf.tracking import setup_wandb_env

    if not setup_wandb_env(recipe.tracking, Path(recipe.output_dir), "eval"):
        return
    import wandb

    run = wandb.init(config=to_dict(recipe), reinit="finish_previous")
    cols = sorted({k for row in summary.values() for k in row})
    run.log(
        {
            "report": wandb.Table(
                columns=["model", *cols], data=[[n, *(row.get(c) for c in cols)] for n, row in summary.items()]
            ),
            **{f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))},
        }
    )
    run.finish()
