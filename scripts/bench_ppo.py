"""Seconds per PPO step: ours vs TRL 1.0.0's trl.experimental.ppo.PPOTrainer, side by side.

    .venv/bin/python scripts/bench_ppo.py [--steps 10] [--rounds 2] [--out runs/bench/ppo.json]
    .venv/bin/python scripts/bench_ppo.py --sft runs/smollm2/sft --reward runs/smollm2/reward \
        --prompts runs/smollm2/data/prompts.jsonl --lr 1e-5 --steps 3 --rounds 1   # any model pair
    .venv/bin/python scripts/bench_ppo.py --shape mid --variant shared ppo.critic_trunk=shared   # + a row

Both run the same models (by default the demo SFT policy and reward model, built first if missing;
or any SFT / reward pair given with --sft --reward --prompts) at matched settings: by default
rollout batch 32, 2 mini-batches of 16 (one optimizer step each) per PPO epoch, 2 PPO epochs, 24 new
tokens (each an option), temperature 1, k1 KL with coefficient 0.05, full fine-tuning of a separate
actor and critic, fp32 on the CPU, 2 threads. Ours runs with its defaults otherwise, guards included
(a step the KL guard stops does fewer updates than TRL's: the JSON counts them, so pick a learning
rate at which the guard does not trip). TRL runs in its own virtual environment
(runs/bench/trl-1.0.0-venv, made here on first use) with the versions it was released against. The
runs alternate (ours, TRL, ours, TRL, ...) so machine noise hits both alike; the first step of each
run (warm-up) is dropped and the median of the rest is compared. Prints a table (ratio, our phase
breakdown, peak memory) and writes JSON. `--variant LABEL KEY=VALUE...` adds runs of ours with other
settings to every round (best-settings rows, kept apart from the matched one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_VENV = REPO / "runs/bench/trl-1.0.0-venv"
PEER_PACKAGES = ["trl==1.0.0", "transformers==5.22.2", "accelerate", "datasets"]
MATCHED = {"rollout_batch": 32, "mini_batches": 2, "ppo_epochs": 2, "max_new_tokens": 24, "lr": 3e-4, "seed": 42}
"""The defaults of the matched settings; each is an option (--rollout-batch, --lr, ...)."""


SHAPES = {
    # The mid-size shape: a Llama of hidden 512 and 6 layers on the demo tokenizer (~21M
    # parameters), random-init and passed through one SFT step and one reward step, so that the
    # stages' hand-off checks accept it. Speed is measured here, not quality: an untrained policy
    # rarely says eos, so its answers run to the 64 new tokens the shape asks for on both sides
    # (a trained one answers in ~15 and PPO at a high rate shortens that, which would time lengths).
    "mid": {
        "model": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8),
        "matched": {"rollout_batch": 16, "mini_batches": 1, "ppo_epochs": 1, "max_new_tokens": 64},
    },
}
"""Named model shapes (--shape): the model's dimensions and the matched settings they default to."""


def ensure_models(run: Path, shape: str | None = None) -> tuple[Path, Path, Path]:
    """The SFT and reward model: the demo's (reuse runs/demo if complete, else train them into `run`),
    or, for a named shape, a model of that shape on the demo's tokenizer trained briefly into `run`."""
    demo = REPO / "runs/demo"
    if shape is None and (demo / "sft/rlhf_manifest.json").is_file() and (demo / "reward/rlhf_manifest.json").is_file():
        return demo / "sft", demo / "reward", demo / "assets/data/prompts.jsonl"
    if (run / "sft/rlhf_manifest.json").is_file() and (run / "reward/rlhf_manifest.json").is_file():
        return run / "sft", run / "reward", run / "assets/data/prompts.jsonl"
    from rlhf.demo.assets import build_demo_assets

    assets = build_demo_assets(run / "assets")
    base, brief = assets / "base", []
    if shape is not None:
        base, brief = run / "base", ["train.max_steps=1", "train.save_steps=1", "train.eval_steps=1"]
        shaped_base(assets / "base", base, SHAPES[shape]["model"])
    rlhf = str(Path(sys.executable).parent / "rlhf")
    common = [f"output_dir={run}", f"demo_assets={assets}", "tracking.wandb=false", *brief]
    for stage, model, data in (("sft", base, "sft"), ("reward", run / "sft", "preferences")):
        cmd = [rlhf, stage, "--config", str(REPO / f"recipes/demo/{stage}.yaml"), *common]
        subprocess.run(
            [*cmd, f"model.name_or_path={model}", f"data.sources.0.path={assets}/data/{data}.jsonl"], check=True
        )
    return run / "sft", run / "reward", assets / "data/prompts.jsonl"


def shaped_base(demo_base: Path, out: Path, dims: dict) -> None:
    """A random-init model of `dims` with the demo base model's tokenizer, config otherwise."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(demo_base)
    for key, value in {**dims, "num_key_value_heads": dims["num_attention_heads"]}.items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(demo_base).save_pretrained(out)


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin/python"
    ok = (
        python.exists()
        and subprocess.run(
            [str(python), "-c", "import trl; assert trl.__version__ == '1.0.0'"], capture_output=True
        ).returncode
        == 0
    )
    if not ok:
        print(f"[bench] creating {PEER_VENV} with {' '.join(PEER_PACKAGES)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        index = ["--index-url", os.environ["TORCH_INDEX_URL"]] if os.environ.get("TORCH_INDEX_URL") else []
        import torch  # the same torch build as ours (the CPU one on a CPU machine)

        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *index, f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([*pip, *PEER_PACKAGES], check=True)
    return python


def run_ours(sft: Path, reward: Path, prompts: Path, steps: int, out: Path, m: dict, extra: list[str]) -> dict:
    """In this process: our PPO at the matched settings; step times from its own metrics log."""
    import shutil

    from rlhf.config import load_recipe
    from rlhf.config_rl import PPORecipe
    from rlhf.stages.ppo.trainer import run_ppo
    from rlhf.tracking import read_jsonl

    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        [
            f"sft_dir={sft}",
            f"reward_dir={reward}",
            f"prompts.sources.0.path={prompts}",
            "prompts.max_length=256",  # a chat template's system prompt makes real prompts long
            f"output_dir={out}",
            "demo_assets=null",
            "tracking.wandb=false",
            "sample_every=0",
            f"train.max_steps={steps}",
            f"train.save_steps={steps}",
            f"ppo.rollout_batch_size={m['rollout_batch']}",
            f"train.micro_batch_size={m['rollout_batch'] // m['mini_batches']}",
            "train.gradient_accumulation_steps=1",
            f"ppo.ppo_epochs={m['ppo_epochs']}",
            f"generation.max_new_tokens={m['max_new_tokens']}",
            "generation.temperature=1.0",
            "ppo.kl_coef=0.05",
            "ppo.kl_estimator=k1",
            f"train.learning_rate={m['lr']}",
            f"train.seed={m['seed']}",
            *extra,
        ],
    )
    run_ppo(recipe)
    rows = read_jsonl(out / "ppo/metrics.jsonl")
    return {
        "step_seconds": [r["time/step"] for r in rows],
        "phases": {k: [r[f"time/{k}"] for r in rows] for k in ("generation", "scoring", "training")},
        "response_length": [r["response_length"] for r in rows],
        "updates": [m["ppo_epochs"] * m["mini_batches"] - r["skipped_minibatches"] for r in rows],
        "kl_rollback": [r["kl_rollback"] for r in rows],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs/bench/ppo.json"))
    ap.add_argument("--sft", type=Path, help="an SFT output (default: the demo's)")
    ap.add_argument("--reward", type=Path, help="a reward output (with --sft)")
    ap.add_argument("--prompts", type=Path, help="a JSONL file of {'prompt': ...} rows (with --sft)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a model of this shape (made once) and its settings")
    for key, kind in (("rollout_batch", int), ("mini_batches", int), ("ppo_epochs", int), ("max_new_tokens", int)):
        ap.add_argument("--" + key.replace("_", "-"), type=kind, help=f"default {MATCHED[key]}, or the shape's")
    ap.add_argument("--lr", type=float, default=MATCHED["lr"])
    ap.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for our side only, e.g. ppo.kl_rollback=never (a best-settings row, not matched)",
    )
    ap.add_argument(
        "--variant",
        action="append",
        nargs="+",
        default=[],
        metavar="LABEL KEY=VALUE",
        help="one more run of ours in every round, side by side, with these overrides on top of --ours-set, "
        "e.g. --variant shared ppo.critic_trunk=shared (not matched: a best-settings row)",
    )
    ap.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    given_settings = {
        k: getattr(args, k)
        for k in ("rollout_batch", "mini_batches", "ppo_epochs", "max_new_tokens")
        if getattr(args, k) is not None
    }
    m = {**MATCHED, **(SHAPES[args.shape]["matched"] if args.shape else {}), **given_settings, "lr": args.lr}
    if m["rollout_batch"] % m["mini_batches"]:
        ap.error(f"--rollout-batch ({m['rollout_batch']}) must be a multiple of --mini-batches ({m['mini_batches']})")
    given = [args.sft, args.reward, args.prompts]
    if any(given) and not all(given):
        ap.error("--sft, --reward and --prompts go together")
    if args.shape and any(given):
        ap.error("--shape makes its own models: give it or --sft/--reward/--prompts, not both")
    for path in filter(None, given):
        if not path.exists():
            ap.error(f"{path} does not exist")
    work = REPO / "runs/bench/ppo"
    if args.ours_only:  # child mode: one run of ours, JSON on the last line
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_ours(args.sft, args.reward, args.prompts, args.steps, work / "ours", m, args.ours_set)))
        return
    models = work / (f"models-{args.shape}" if args.shape else "models")
    sft, reward, prompts = given if all(given) else ensure_models(models, args.shape)
    peer = ensure_peer_venv()
    options = [
        f"--{k.replace('_', '-')}={m[k]}" for k in ("rollout_batch", "mini_batches", "ppo_epochs", "max_new_tokens")
    ]
    ours_cmd = [
        sys.executable,
        __file__,
        "--steps",
        str(args.steps),
        "--ours-only",
        f"--sft={sft}",
        f"--reward={reward}",
        f"--prompts={prompts}",
        f"--lr={m['lr']}",
        *options,
        *[f"--ours-set={x}" for x in args.ours_set],
    ]
    trl_cmd = [
        str(peer),
        str(REPO / "scripts/bench_ppo_trl_peer.py"),
        "--sft",
        str(sft),
        "--reward",
        str(reward),
        "--prompts",
        str(prompts),
        "--steps",
        str(args.steps),
        "--rollout-batch",
        str(m["rollout_batch"]),
        "--mini-batches",
        str(m["mini_batches"]),
        "--ppo-epochs",
        str(m["ppo_epochs"]),
        "--max-new-tokens",
        str(m["max_new_tokens"]),
        "--lr",
        str(m["lr"]),
        "--seed",
        str(m["seed"]),
    ]
    variants = {label: [*ours_cmd, *[f"--ours-set={x}" for x in sets]] for label, *sets in args.variant}
    labels = [label for label, *_ in args.variant]
    if {"ours", "trl"} & set(labels) or len(set(labels)) < len(labels):
        ap.error("--variant: each label once, and not 'ours' or 'trl' (the matched runs)")
    if any(len(v) < 2 for v in args.variant):
        ap.error("--variant LABEL KEY=VALUE...: give at least one override (without one it repeats the matched run)")
    runs: dict[str, list[dict]] = {"ours": [], **{k: [] for k in variants}, "trl": []}
    for r in range(args.rounds):  # alternating, so that the machine's drift hits every row alike
        for name, cmd in (("ours", ours_cmd), *variants.items(), ("trl", trl_cmd)):
            print(f"[bench] round {r + 1}/{args.rounds}: {name}", flush=True)
            runs[name].append(child(cmd))
    steady = {k: [s for run in v for s in run["step_seconds"][1:]] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in steady.items()}
    ours_rows = [k for k in runs if k != "trl"]
    phases_of = {
        k: {
            p: statistics.median([s for run in runs[k] for s in run["phases"][p][1:]])
            for p in ("generation", "scoring", "training")
        }
        for k in ours_rows
    }
    phases = phases_of["ours"]
    peak = {k: max(run["peak_rss_mb"] for run in v) for k, v in runs.items()}
    ratio = med["ours"] / med["trl"]
    print(
        f"\nPPO step, matched settings {m}, {args.rounds} rounds x {args.steps} steps (first step of each run dropped)"
    )
    print(f"{'run':<16}{'s / step (med)':>16}{'/ TRL':>8}{'peak RSS MB':>13}  phases gen / score / train s, updates")
    for k in [*ours_rows, "trl"]:
        line = f"{k:<16}{med[k]:>16.3f}{med[k] / med['trl']:>8.2f}{peak[k]:>13.0f}"
        if k != "trl":
            updates = sorted({u for run in runs[k] for u in run["updates"]})
            line += "  " + " / ".join(f"{v:.2f}" for v in phases_of[k].values()) + f", {updates}"
        print(line)
    print(
        f"ratio ours (matched) / TRL: {ratio:.2f} (goal: <= 0.50); "
        f"TRL's updates per step: {m['ppo_epochs'] * m['mini_batches']}"
    )
    for label, *sets in args.variant:
        print(f"variant {label}: {' '.join(sets)} (ratio {med[label] / med['trl']:.2f}; not matched)")
    result = {
        "models": {"sft": str(sft), "reward": str(reward), "prompts": str(prompts), "shape": args.shape},
        "matched": m,
        "ours_overrides": args.ours_set,
        "variants": {label: sets for label, *sets in args.variant},
        "trl_config": runs["trl"][0].get("config"),
        "steps": args.steps,
        "rounds": args.rounds,
        "median_step_seconds": med,
        "ratio_ours_over_trl": ratio,
        "ratios_over_trl": {k: med[k] / med["trl"] for k in ours_rows},
        "our_phases_median_seconds": phases,
        "phases_median_seconds": phases_of,
        "peak_rss_mb": peak,
        "peer_versions": {k: runs["trl"][0][k] for k in ("trl", "transformers", "torch")},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
