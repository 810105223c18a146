"""Seconds per GRPO step: ours vs TRL's GRPOTrainer (the installed TRL, 1.16), side by side.

    .venv/bin/python scripts/bench_grpo.py [--shape demo|smollm2] [--steps 6] [--rounds 2] [--out FILE]

One GRPO step = one generation batch: `rollout` responses (`rollout / k` prompts x k answers),
scored by the same reward model, then `epochs` passes of `rollout / micro` optimizer steps.
The *identical* row sets both sides the same way, written into the JSON with TRL's full config:
beta (k3 KL in the loss), loss type 'grpo' (per-response mean), group std scaling, clip 0.2,
fp32 weights and compute, gradient checkpointing off, the same k, mini-batches, updates,
learning rate, new tokens, temperature 1 with no top-k / top-p, LoRA (r 16, alpha 32, all linear
layers, no dropout) on the 135M shape and full fine-tuning on the demo shape. Our reward is the raw
reward-model score (no normalisation, eos penalty or clip: group scaling makes them moot anyway).
The *best* row lets ours use bf16 autocast (TRL's own default is bf16 too; its row is rerun with
bf16=True). Runs alternate (ours, TRL, ...) so machine noise hits both; the first step of each
run is dropped; medians of the rest are compared. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # the demo's tiny policy and reward model (built by scripts/demo.sh or the bench_ppo helper)
    "demo": {
        "sft": "runs/demo/sft",
        "reward": "runs/demo/reward",
        "prompts": "runs/demo/assets/data/prompts.jsonl",
        "rollout": 32,
        "k": 4,
        "micro": 16,
        "epochs": 1,
        "max_new_tokens": 24,
        "lr": 3e-4,
        "lora": False,
    },
    # SmolLM2-135M-Instruct after the real-model pipeline (bash scripts/real_model.sh)
    "smollm2": {
        "sft": "runs/smollm2/sft",
        "reward": "runs/smollm2/reward",
        "prompts": "runs/smollm2/data/prompts.jsonl",
        "rollout": 16,
        "k": 4,
        "micro": 8,
        "epochs": 1,
        "max_new_tokens": 32,
        "lr": 1e-4,
        "lora": True,
    },
}
BETA, SEED = 0.04, 42


def prompts_of(path: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in Path(REPO / path).read_text().splitlines()]
    return [r["prompt"] for r in rows][:n]


def run_ours(shape: dict, steps: int, bf16: bool, out: Path) -> dict:
    import shutil

    from rlhf.config import load_recipe
    from rlhf.config_rl import PPORecipe
    from rlhf.stages.ppo.trainer import run_ppo
    from rlhf.tracking import read_jsonl

    shutil.rmtree(out, ignore_errors=True)
    s = shape
    lora = ["peft.enabled=true", "peft.r=16", "peft.alpha=32", "peft.dropout=0.0", "peft.target_modules=all-linear"]
    recipe = load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        [
            f"sft_dir={REPO / s['sft']}",
            f"reward_dir={REPO / s['reward']}",
            f"prompts.sources.0.path={REPO / s['prompts']}",
            f"output_dir={out}",
            "demo_assets=null",
            "tracking.wandb=false",
            "sample_every=0",
            "prompts.max_length=512",
            f"train.max_steps={steps}",
            f"train.save_steps={steps}",
            f"train.learning_rate={s['lr']}",
            f"train.micro_batch_size={s['micro']}",
            "train.gradient_accumulation_steps=1",
            f"train.seed={SEED}",
            "ppo.advantage_estimator=grpo",
            f"ppo.rollouts_per_prompt={s['k']}",
            f"ppo.rollout_batch_size={s['rollout']}",
            f"ppo.ppo_epochs={s['epochs']}",
            f"ppo.kl_coef={BETA}",
            "ppo.reward_normalization=none",
            "ppo.missing_eos_penalty=null",
            "ppo.reward_clip=1e9",
            "ppo.clip_ratio=0.2",
            f"generation.max_new_tokens={s['max_new_tokens']}",
            "generation.temperature=1.0",
            f"model.autocast={'bf16' if bf16 else 'none'}",
            *(lora if s["lora"] else []),
        ],
    )
    run_ppo(recipe)
    rows = read_jsonl(out / "ppo/metrics.jsonl")
    return {
        "step_seconds": [r["time/step"] for r in rows],
        "phases": {k: [r[f"time/{k}"] for r in rows] for k in ("generation", "scoring", "training")},
        "response_length": [r["response_length"] for r in rows],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def trl_config(shape: dict, steps: int, bf16: bool, out: Path) -> dict:
    s = shape
    per_gen = s["rollout"] // s["micro"]
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=s["micro"],
        gradient_accumulation_steps=1,
        steps_per_generation=per_gen,
        num_generations=s["k"],
        num_iterations=s["epochs"],
        beta=BETA,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        max_completion_length=s["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=bf16,
        gradient_checkpointing=False,
        max_steps=steps * per_gen * s["epochs"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=True,
        disable_dropout=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


def run_trl(shape: dict, steps: int, bf16: bool, out: Path) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = shape
    per_step = (s["rollout"] // s["micro"]) * s["epochs"]  # optimizer steps per GRPO step
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **k):
            if state.global_step % per_step == 0:
                stamps.append(time.perf_counter())

    n_prompts = steps * s["rollout"] // s["k"]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts_of(s["prompts"], n_prompts)])
    cfg = trl_config(shape, steps, bf16, out)
    peft = None
    if s["lora"]:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(REPO / s["sft"])
    trainer = GRPOTrainer(
        model=str(REPO / s["sft"]),
        reward_funcs=str(REPO / s["reward"]),
        args=GRPOConfig(**cfg),
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft,
        callbacks=[Clock()],
    )
    trainer.train()
    return {
        "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": cfg,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


def child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="demo")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    work = REPO / "runs/bench/grpo" / args.shape
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        fn = run_ours if args.child == "ours" else run_trl
        print(json.dumps(fn(shape, args.steps, args.bf16, work / args.child)))
        return
    for key in ("sft", "reward"):
        if not (REPO / shape[key] / "rlhf_manifest.json").is_file():
            raise SystemExit(
                f"[bench] {shape[key]} is missing: run the {'demo' if args.shape == 'demo' else 'real-model'}"
                " pipeline first"
            )
    rows = {}
    for row, bf16 in (("identical", False), ("best", True)):
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for r in range(args.rounds):
            for name in ("ours", "trl"):
                print(f"[bench] {row} round {r + 1}/{args.rounds}: {name}", flush=True)
                runs[name].append(
                    child(
                        ["--shape", args.shape, "--steps", str(args.steps), "--child", name]
                        + (["--bf16"] if bf16 else [])
                    )
                )
        med = {k: statistics.median([x for run in v for x in run["step_seconds"][1:]]) for k, v in runs.items()}
        rows[row] = {
            "median_step_seconds": med,
            "ratio_ours_over_trl": med["ours"] / med["trl"],
            "peak_rss_mb": {k: max(run["peak_rss_mb"] for run in v) for k, v in runs.items()},
            "our_phases_median_seconds": {
                p: statistics.median([x for run in runs["ours"] for x in run["phases"][p][1:]])
                for p in ("generation", "scoring", "training")
            },
            "bf16": bf16,
            "trl_config": runs["trl"][0]["config"],
            "trl_versions": runs["trl"][0]["versions"],
            "runs": runs,
        }
    print(
        f"\nGRPO step, shape {args.shape} {shape}, beta {BETA}, {args.rounds} rounds x {args.steps} steps "
        "(first step of each run dropped)"
    )
    print(f"{'row':<12}{'ours s/step':>14}{'TRL s/step':>14}{'ratio':>8}{'ours RSS MB':>14}{'TRL RSS MB':>14}")
    for name, r in rows.items():
        m, p = r["median_step_seconds"], r["peak_rss_mb"]
        print(
            f"{name:<12}{m['ours']:>14.3f}{m['trl']:>14.3f}{r['ratio_ours_over_trl']:>8.2f}{p['ours']:>14.0f}"
            f"{p['trl']:>14.0f}"
        )
    print(
        "our phases (median s, identical row): "
        + ", ".join(f"{k} {v:.3f}" for k, v in rows["identical"]["our_phases_median_seconds"].items())
    )
    out = Path(args.out or REPO / f"runs/bench/grpo_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "shape": args.shape,
                "settings": shape,
                "beta": BETA,
                "steps": args.steps,
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
