"""Do the demo recipes' defaults work on tasks they were not tuned on? Run the demo pipeline
(recipes/demo/pipeline.yaml: SFT -> reward -> PPO -> evaluation on the tiny model) on each task
with only its data paths changed, and print the held-out ground truth of base, SFT and PPO.

    .venv/bin/python scripts/cross_task.py [--tasks demo reverse pick] [--out runs/cross_task] \
        [--set sft:train.num_epochs=6 ...] [--json runs/cross_task/cross_task.json] \
        [--trl-peer [--trl-set learning_rate=3e-4 ...]]

Tasks: `demo` (the reviews the recipes were written for), `reverse` (write letters backwards,
900 demonstrations) and `pick` (pick the word of a category, 600), both from `rlhf tasks build`.
Each task's data, held-out prompts and ground-truth grader are its own; every recipe value is the
demo's, except what `--set stage:key=value` changes (for comparing a setting on every task).
With --trl-peer, TRL 1.0.0's PPOTrainer (scripts/trl_ppo_task_peer.py, at TRL's documented defaults
unless --trl-set changes a value) also trains from the same SFT and reward models on the same
prompts, and a second evaluation (`<run>/with_trl/eval`) scores it beside SFT and ours on the same
held-out prompts: whether a task's reward model carries enough signal for PPO is then not our
loop's word alone. The JSON keeps, per task, the ground truth of each row, the gain of PPO over SFT and of SFT over
base, the SFT stage's steps and epochs, and each stage's wall time; and, for the whole run, the
package versions and the git commit it ran from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("demo", "reverse", "pick")


def task_data(task: str, out: Path) -> Path:
    """The directory with the task's sft / preferences / prompts / heldout_prompts files."""
    if task == "demo":
        from rlhf.demo.assets import build_demo_assets

        return build_demo_assets(out / "assets") / "data"
    from rlhf.tasks import pick, reverse

    data = out / task / "data"
    if not (data / "heldout_prompts.jsonl").is_file():
        {"reverse": reverse, "pick": pick}[task].build_data(data)  # what `rlhf tasks build` writes
    return data


def pipeline_recipe(task: str, data: Path, run: Path, assets: Path, extra: dict[str, list[str]]) -> Path:
    """recipes/demo/pipeline.yaml with the task's data paths (and its grader) as stage overrides."""
    src = lambda name: f"data.sources=[{{path: {data / name}}}]"  # noqa: E731
    overrides = {
        "sft": [src("sft.jsonl"), f"demo_assets={assets}", f"model.name_or_path={assets}/base"],
        "reward": [src("preferences.jsonl"), f"demo_assets={assets}"],
        "ppo": [f"prompts.sources=[{{path: {data / 'prompts.jsonl'}}}]", f"demo_assets={assets}"],
        "eval": [
            f"prompts.sources=[{{path: {data / 'heldout_prompts.jsonl'}}}]",
            f"few_shot_data.path={data / 'sft.jsonl'}",
            f"base_dir={assets}/base",
            f"demo_assets={assets}",
            f"ground_truth={task}",
        ],
    }
    for stage, values in extra.items():
        overrides[stage] = overrides[stage] + values
    recipe = yaml.safe_load((ROOT / "recipes/demo/pipeline.yaml").read_text())
    for stage in ("sft", "reward", "ppo", "eval"):
        recipe[stage] = str(ROOT / recipe[stage])
    recipe.update(output_dir=str(run), overrides=overrides)
    path = run / "pipeline.yaml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def trl_peer(data: Path, run: Path, values: list[str]) -> Path:
    """TRL 1.0.0's PPOTrainer from this run's SFT and reward models; then the evaluation again, with it."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    from bench_ppo import ensure_peer_venv

    policy = run / "trl_ppo"
    cmd = [str(ensure_peer_venv()), str(ROOT / "scripts/trl_ppo_task_peer.py"), "--sft", str(run / "sft")]
    cmd += ["--reward", str(run / "reward"), "--prompts", str(data / "prompts.jsonl"), "--out", str(policy)]
    subprocess.run(cmd + [f"--set={v}" for v in values], check=True)
    recipe = yaml.safe_load((run / "pipeline.yaml").read_text())
    overrides = recipe["overrides"]["eval"] + [f"{k}_dir={run / k}" for k in ("sft", "ppo", "reward")]
    overrides += [f"output_dir={run / 'with_trl'}", f"extra_policies=[{{name: trl_ppo, path: '{policy}'}}]"]
    subprocess.run([sys.executable, "-m", "rlhf.cli", "eval", "--config", recipe["eval"], *overrides], check=True)
    return run / "with_trl" / "eval" / "report.json"


def summarise(task: str, run: Path, seconds: float, peer_report: Path | None = None) -> dict:
    report = json.loads((run / "eval" / "report.json").read_text())
    gt = {r["name"]: r["ground_truth"] for r in report["policies"]}
    peer = {}
    if peer_report is not None:  # its own evaluation samples SFT afresh on the same prompts: compare within it
        peer = {r["name"]: r["ground_truth"] for r in json.loads(peer_report.read_text())["policies"]}
        gt["trl_ppo"] = peer["trl_ppo"]
    manifests = {
        s: json.loads((run / s / "rlhf_manifest.json").read_text())["metrics"] for s in ("sft", "reward", "ppo")
    }
    sft = manifests["sft"]
    return {
        "task": task,
        "ground_truth": gt,
        "sft_gain_over_base": gt["sft"] - gt["base"],
        "ppo_gain_over_sft": gt["ppo"] - gt["sft"],
        **({"trl_ppo_gain_over_sft": peer["trl_ppo"] - peer["sft"], "sft_in_trl_eval": peer["sft"]} if peer else {}),
        "sft_steps": sft.get("global_step"),
        "sft_epochs": sft.get("epochs"),
        "sft_best_eval_loss": sft.get("best_eval_loss"),
        "train_seconds": {s: m.get("train_seconds") for s, m in manifests.items()},
        "pipeline_seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--out", default="runs/cross_task", help="one run directory per task under it")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE", help="a recipe override")
    ap.add_argument("--json", default=None, help="default: <out>/cross_task.json")
    ap.add_argument("--trl-peer", action="store_true", help="also train TRL 1.0.0's PPOTrainer and evaluate it")
    ap.add_argument("--trl-set", action="append", default=[], metavar="KEY=JSON", help="a PPOConfig value for TRL")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    extra: dict[str, list[str]] = {}
    for item in args.set:
        stage, _, value = item.partition(":")
        if stage not in ("sft", "reward", "ppo", "eval") or "=" not in value:
            ap.error(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of sft, reward, ppo, eval")
        extra.setdefault(stage, []).append(value)
    assets = task_data("demo", out).parent
    results = []
    for task in args.tasks:
        data, run = task_data(task, out), out / task / "run"
        recipe = pipeline_recipe(task, data, run, assets, extra)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "rlhf.cli", "pipeline", "--config", str(recipe)], check=True)
        seconds = time.monotonic() - start
        peer = trl_peer(data, run, args.trl_set) if args.trl_peer else None
        results.append(summarise(task, run, seconds, peer))
    print(f"\n{'task':10} {'base':>7} {'sft':>7} {'ppo':>7} {'sft-base':>9} {'ppo-sft':>8} {'sft steps':>10}")
    for r in results:
        g = r["ground_truth"]
        print(
            f"{r['task']:10} {g['base']:7.1f} {g['sft']:7.1f} {g['ppo']:7.1f} "
            f"{r['sft_gain_over_base']:+9.1f} {r['ppo_gain_over_sft']:+8.1f} {r['sft_steps']!s:>10}"
        )
        if "trl_ppo" in g:
            gain = r["trl_ppo_gain_over_sft"]
            print(
                f"{'':10} TRL 1.0.0 PPO: {g['trl_ppo']:.1f} ({gain:+.1f} over SFT's {r['sft_in_trl_eval']:.1f} there)"
            )
    path = Path(args.json) if args.json else out / "cross_task.json"
    # The versions and the commit go with the numbers: a rerun in a fresh environment moved SFT's
    # stopping point and its score, and without them the two runs could not be told apart.
    from rlhf.checkpoint import git_state, package_versions

    provenance = {"versions": package_versions(), "git": git_state(ROOT)}
    record = {"overrides": args.set, "trl_set": args.trl_set if args.trl_peer else None, **provenance}
    path.write_text(json.dumps({**record, "results": results}, indent=2))
    print(f"[cross_task] wrote {path}")


if __name__ == "__main__":
    main()
