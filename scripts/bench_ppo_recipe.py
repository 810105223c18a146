"""Seconds per step of one RL recipe under different settings, side by side in one run: each arm is
the recipe plus its overrides, run for a few steps in its own process (so peak memory is its own),
arms alternating round by round so machine noise hits all alike.

    .venv/bin/python scripts/bench_ppo_recipe.py --recipe recipes/smollm2-135m/ppo.yaml \
        --set sft_dir=runs/smollm2/sft --set reward_dir=runs/smollm2/reward \
        --arm before model.attn_implementation=sdpa model.frozen_bf16=false \
        --arm eager model.frozen_bf16=false --arm now --steps 4 --rounds 2 --out runs/bench/ppo_recipe.json

`--set` applies to every arm; `--arm LABEL KEY=VALUE...` names one arm and its own overrides (none:
the recipe as it is). The first step of each run is dropped (warm-up) and the median of the rest is
reported per phase (generation, scoring, training, step), with the peak RSS of the arm's process.
For ratios between code paths of ours; the comparison with TRL is scripts/bench_ppo.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generation", "scoring", "training", "step")


def child(recipe: str, overrides: list[str], out: str) -> None:
    """One run of the recipe in this process; writes its per-step phase times and peak RSS."""
    import resource

    from rlhf.config import load_recipe
    from rlhf.config_rl import PPORecipe
    from rlhf.stages.ppo.trainer import run_ppo

    steps: list[dict] = []

    def record(step: int, metrics: dict) -> bool:
        steps.append(metrics)
        return False  # never stop early

    r = load_recipe(PPORecipe, recipe, overrides)
    run_ppo(r, on_step_end=record)
    manifest = json.loads((Path(r.output_dir) / "ppo" / "rlhf_manifest.json").read_text())["metrics"]
    Path(out).write_text(
        json.dumps(
            {
                "steps": [{k: m[f"time/{k}"] for k in PHASES if f"time/{k}" in m} for m in steps],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "attention": manifest.get("attention"),
                "frozen_weights_bf16": manifest.get("frozen_weights_bf16"),
                "bf16_autocast": manifest.get("bf16_autocast"),
                "skipped_minibatches": sum(m.get("skipped_minibatches", 0) for m in steps),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every arm")
    ap.add_argument("--arm", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"), required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs/bench/ppo_recipe.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child_overrides, args.child[1])
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step of each run is dropped)")
    arms = {a[0]: a[1:] for a in args.arm}
    runs: dict[str, list[dict]] = {label: [] for label in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for label, own in arms.items():
                out = Path(tmp) / f"{label}-{rnd}.json"
                overrides = [
                    *args.set,
                    f"output_dir={Path(tmp) / f'{label}-{rnd}'}",
                    f"train.max_steps={args.steps}",
                    f"train.save_steps={args.steps}",
                    "sample_every=0",
                    "tracking.wandb=false",
                    *own,
                ]
                print(f"round {rnd + 1}/{args.rounds}: {label}", flush=True)
                cmd = [sys.executable, __file__, "--recipe", args.recipe, "--arm", label]
                cmd += ["--child", args.recipe, str(out), "--child-overrides", *overrides]
                subprocess.run(cmd, check=True, cwd=REPO)
                runs[label].append(json.loads(out.read_text()))
    rows = []
    for label, results in runs.items():
        kept = [s for r in results for s in r["steps"][1:]]  # each run's first step is warm-up
        row = {"arm": label, "overrides": arms[label], "steps_timed": len(kept)}
        row.update({f"{k}_s": statistics.median(s[k] for s in kept) for k in PHASES})
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
        for key in ("attention", "frozen_weights_bf16", "bf16_autocast"):
            row[key] = results[0][key]
        row["skipped_minibatches"] = sum(r["skipped_minibatches"] for r in results)
        rows.append(row)
    first = rows[0]["step_s"]
    print(f"\n{'arm':<12} {'step s':>7} {'ratio':>6} {'gen s':>6} {'score s':>7} {'train s':>7} {'RSS MB':>7}  kernel")
    for row in rows:
        print(
            f"{row['arm']:<12} {row['step_s']:7.2f} {row['step_s'] / first:6.2f} {row['generation_s']:6.2f} "
            f"{row['scoring_s']:7.2f} {row['training_s']:7.2f} {row['peak_rss_mb']:7.0f}  {row['attention']}"
            f"{', frozen bf16' if row['frozen_weights_bf16'] else ''}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": args.recipe, "set": args.set, "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
