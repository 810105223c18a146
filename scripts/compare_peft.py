"""Fine-tuning methods side by side: full fine-tuning and every `peft.method`, each an SFT run of the
same recipe at the same step budget, then one evaluation on the same held-out prompts.

    .venv/bin/python scripts/compare_peft.py                      # SmolLM2-135M, the instruction task
    .venv/bin/python scripts/compare_peft.py --max-steps 30 --methods full,lora,ia3

Needs `bash scripts/real_model.sh`'s first two steps (the converted model and the task data):
    .venv/bin/rlhf models get smollm2-135m-instruct --out runs/smollm2/model
    .venv/bin/rlhf tasks build instruct --out runs/smollm2/data

For each method: trainable parameters, peak RSS and wall time of the SFT process (from its
manifest), held-out test loss, then the evaluation's ground truth (the task's checker on held-out
instructions) and the forgetting measure (perplexity of the base model's own answers to general
questions, relative to the base). Prints a table and writes JSON (default `<out>/peft_methods.json`).
Finished runs are reused (`rlhf sft` resumes or skips them); delete `<out>` to measure again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# Learning rates from each method's paper or peft's own examples, chosen before any run here (not
# tuned on this task): prompt-style methods train a few thousand parameters and need far larger
# steps than LoRA, full fine-tuning far smaller ones.
METHODS: dict[str, dict] = {
    "full": {"lr": 2e-5, "overrides": ["peft.enabled=false"]},
    "lora": {"lr": 2e-4, "overrides": []},
    "dora": {"lr": 2e-4, "overrides": []},
    "qlora": {"lr": 2e-4, "overrides": []},
    "loha": {"lr": 2e-4, "overrides": []},
    "lokr": {"lr": 2e-4, "overrides": []},
    "ia3": {"lr": 3e-3, "overrides": []},
    "prompt_tuning": {"lr": 3e-2, "overrides": ["peft.num_virtual_tokens=20"]},
    "prefix_tuning": {"lr": 1e-2, "overrides": ["peft.num_virtual_tokens=20"]},
}


def run(cmd: list[str]) -> None:
    print("[compare_peft] $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def train(method: str, args) -> Path:
    spec = METHODS[method]
    out = Path(args.out) / method
    peft = [] if method == "full" else ["peft.enabled=true", f"peft.method={method}"]
    run(
        [
            str(REPO / ".venv/bin/rlhf"),
            "sft",
            "--config",
            args.sft_recipe,
            f"output_dir={out}",
            f"model.name_or_path={args.model}",
            # The task's rows alone (no replay): the methods are compared on what each one forgets.
            f"data.sources=[{{path: {Path(args.data) / 'sft.jsonl'}}}]",
            f"train.max_steps={args.max_steps}",
            f"train.learning_rate={spec['lr']}",
            "train.eval_steps=0",
            f"train.save_steps={args.max_steps}",
            "tracking.wandb=false",
            *peft,
            *spec["overrides"],
        ]
    )
    return out / "sft"


def evaluate(runs: dict[str, Path], args) -> dict:
    """One evaluation of the base model and every SFT output on the same prompts and seed."""
    first, *rest = runs
    recipe = yaml.safe_load(Path(args.eval_recipe).read_text())
    recipe.update(
        output_dir=str(Path(args.out)),
        base_dir=args.model,
        sft_dir=str(runs[first]),
        ppo_dir=None,
        reward_dir=None,
        best_of_n=0,
        extra_policies=[{"name": m, "path": str(runs[m])} for m in rest],
        samples_per_prompt=args.samples,
        tracking={"wandb": False},
    )
    recipe["prompts"]["sources"] = [{"path": str(Path(args.data) / "heldout_prompts.jsonl")}]
    recipe["forgetting_prompts"] = {"path": str(Path(args.data) / "general_questions.jsonl")}
    path = Path(args.out) / "eval_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run([str(REPO / ".venv/bin/rlhf"), "eval", "--config", str(path)])
    summary = json.loads((Path(args.out) / "eval" / "report.json").read_text())["summary"]
    return {(first if name == "sft" else name): s for name, s in summary.items()}  # the eval calls it "sft"


def table(runs: dict[str, Path], summary: dict) -> dict:
    rows = {}
    for method, d in runs.items():
        m = json.loads((d / "rlhf_manifest.json").read_text())["metrics"]
        s = summary[method]
        rows[method] = {
            "trainable_parameters": m.get("trainable_parameters"),
            "trainable_percent": 100 * m["trainable_parameters"] / m["total_parameters"]
            if m.get("total_parameters")
            else None,
            "peak_memory_mb": m.get("peak_memory_mb"),
            "train_seconds": m.get("train_seconds"),
            "seconds_per_step": m["train_seconds"] / m["global_step"] if m.get("global_step") else None,
            "test_loss": m.get("test_loss"),
            "ground_truth": s.get("ground_truth"),
            "forgetting_ppl_rise": s.get("forgetting_ppl_rise"),
        }
    base = summary.get("base", {})
    return {"base": {"ground_truth": base.get("ground_truth")}, "methods": rows}


def show(result: dict) -> None:
    cols = [
        ("trainable_parameters", "{:,}"),
        ("trainable_percent", "{:.3f}"),
        ("peak_memory_mb", "{:.0f}"),
        ("train_seconds", "{:.0f}"),
        ("seconds_per_step", "{:.2f}"),
        ("test_loss", "{:.3f}"),
        ("ground_truth", "{:.1f}"),
        ("forgetting_ppl_rise", "{:+.1%}"),
    ]
    print(f"base model ground truth: {result['base']['ground_truth']}")
    print("method".ljust(14) + "".join(c.rjust(22) for c, _ in cols))
    for name, r in result["methods"].items():
        cells = [("-" if r[c] is None else f.format(r[c])).rjust(22) for c, f in cols]
        print(name.ljust(14) + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2/model")
    ap.add_argument("--data", default="runs/smollm2/data")
    ap.add_argument("--sft-recipe", default="recipes/smollm2-135m/sft.yaml")
    ap.add_argument("--eval-recipe", default="recipes/smollm2-135m/eval.yaml")
    ap.add_argument("--out", default="runs/peft")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated; the first is the KL reference")
    ap.add_argument("--max-steps", type=int, default=30, help="SFT steps per method (the same budget for all)")
    ap.add_argument("--samples", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    for need in (args.model, Path(args.data) / "sft.jsonl"):
        if not Path(need).exists():
            ap.error(f"{need} is missing: run `rlhf models get` and `rlhf tasks build instruct` first (see --help)")
    runs = {m: train(m, args) for m in methods}
    result = table(runs, evaluate(runs, args))
    result["settings"] = {
        "max_steps": args.max_steps,
        "learning_rates": {m: METHODS[m]["lr"] for m in methods},
        "sft_recipe": args.sft_recipe,
        "samples_per_prompt": args.samples,
    }
    show(result)
    path = Path(args.json or Path(args.out) / "peft_methods.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"[compare_peft] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
