"""Methods side by side (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, DPO, IPO, robust DPO, KTO): one
table of ground-truth gain over SFT, reward, KL, forgetting, wall time and peak memory, from one
pipeline run.

    .venv/bin/python scripts/compare_methods.py --recipe recipes/demo/pipeline_methods.yaml
    .venv/bin/python scripts/compare_methods.py --recipe recipes/smollm2-135m/pipeline_dpo_methods.yaml

Runs `rlhf pipeline` on the recipe (its `rl_variants` train beside the PPO stage, its `dpo` stage
and `dpo_variants` from the same SFT output and preference data; finished stages are reused),
then prints the table and writes it as JSON
(default `<output_dir>/methods.json`). Every number comes from the evaluation on held-out prompts
(`<output_dir>/eval/report.json`) and from each RL run's manifest and metrics log.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def seconds_per_step(run: Path) -> float | None:
    rows = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").is_file()
        else []
    )
    times = [r["time/step"] for r in rows if "time/step" in r]
    if times:
        return statistics.median(times)
    # an HF-trainer stage (DPO, KTO) logs no per-step time: its training time over its steps
    manifest = json.loads((run / "rlhf_manifest.json").read_text())["metrics"]
    steps = manifest.get("global_step")
    return manifest["train_seconds"] / steps if steps else None


def table(recipe: dict) -> dict:
    out = Path(recipe["output_dir"])
    summary = json.loads((out / "eval" / "report.json").read_text())["summary"]
    runs = {
        "ppo": out / "ppo",
        **{v["name"]: out / "variants" / v["name"] / "ppo" for v in recipe.get("rl_variants", [])},
    }
    if recipe.get("dpo"):
        runs["dpo"] = out / "dpo"
        runs.update({v["name"]: out / "variants" / v["name"] / "dpo" for v in recipe.get("dpo_variants", [])})
    sft = summary["sft"]
    rows = {}
    for name, run in runs.items():
        s = summary[name]
        manifest = json.loads((run / "rlhf_manifest.json").read_text())
        rows[name] = {
            "estimator": (
                manifest["recipe"]["ppo"].get("advantage_estimator", "gae")
                if manifest["stage"] == "ppo"
                else f"{manifest['recipe']['method']}:{manifest['recipe']['loss_type']}"
            ),
            "ground_truth": s.get("ground_truth"),
            "gain_over_sft": s["ground_truth"] - sft["ground_truth"] if "ground_truth" in s else None,
            "reward_mean": s.get("reward_mean"),
            "kl_to_sft": s.get("kl_to_sft"),
            "forgetting_ppl_rise": s.get("forgetting_ppl_rise"),
            "train_seconds": s.get("train_seconds"),
            "seconds_per_step": seconds_per_step(run),
            "peak_memory_mb": s.get("peak_memory_mb"),
        }
    return {"sft": {k: sft.get(k) for k in ("ground_truth", "reward_mean", "forgetting_ppl_rise")}, "methods": rows}


def show(result: dict) -> None:
    cols = [
        ("estimator", "{}"),
        ("ground_truth", "{:.1f}"),
        ("gain_over_sft", "{:+.1f}"),
        ("reward_mean", "{:.3f}"),
        ("kl_to_sft", "{:.3f}"),
        ("forgetting_ppl_rise", "{:+.1%}"),
        ("train_seconds", "{:.0f}"),
        ("seconds_per_step", "{:.2f}"),
        ("peak_memory_mb", "{:.0f}"),
    ]
    print(f"SFT ground truth: {result['sft']['ground_truth']}")
    print(f"{'method':<14}" + "".join(f"{c:>20}" for c, _ in cols))
    for name, row in result["methods"].items():
        cells = [(fmt.format(row[c]) if row[c] is not None else "-") for c, fmt in cols]
        print(f"{name:<14}" + "".join(f"{v:>20}" for v in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--recipe", default="recipes/demo/pipeline_methods.yaml", help="a pipeline recipe with rl_variants / dpo"
    )
    ap.add_argument("--out", help="JSON file (default <output_dir>/methods.json)")
    ap.add_argument("--no-run", action="store_true", help="only read an existing run")
    args = ap.parse_args()
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if not args.no_run:
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", "--config", args.recipe], cwd=REPO)
        if proc.returncode:
            sys.exit(proc.returncode)
    result = {"recipe": args.recipe, **table(recipe)}
    show(result)
    out = Path(args.out or Path(recipe["output_dir"]) / "methods.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
