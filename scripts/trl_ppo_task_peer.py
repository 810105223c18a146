"""The peer side of scripts/cross_task.py: TRL 1.0.0's experimental PPOTrainer on a task's SFT and
reward models, at TRL's documented defaults (`PPOConfig()`) except that rollouts stop at eos, as ours do, with
the trained policy saved.

Runs inside TRL's own virtual environment (made by scripts/bench_ppo.py), so it imports nothing
from rlhf. Only the run's plumbing is set (output directory, CPU, no hub, no logging services) and
`stop_token="eos"`; every training value is TRL's default unless `--set KEY=JSON` changes it, and
the config it ran with is written beside the policy (trl_config.json).

    python scripts/trl_ppo_task_peer.py --sft DIR --reward DIR --prompts FILE --out DIR [--set learning_rate=3e-4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--sft", "--reward", "--prompts", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=JSON", help="a PPOConfig value, e.g. kl_coef=0.5"
    )
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    import torch
    from bench_ppo_trl_peer import prompt_dataset  # this script's directory is on the path
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    values = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=JSON")
        values[key] = json.loads(raw)
    plumbing = dict(
        output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], save_strategy="no", num_sample_generations=0
    )
    # Not plumbing, but a match: TRL's default stop_token=None never cuts a rollout at eos, so its
    # reward model would score text past the end that neither our loop nor the evaluation sees.
    plumbing["stop_token"] = "eos"
    config = PPOConfig(**{**plumbing, "seed": args.seed, **values})  # --set wins, stop_token included
    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(args.sft),
        ref_model=AutoModelForCausalLM.from_pretrained(args.sft),
        # TRL's examples start the value model from the reward model, as our ppo.critic_init: reward does.
        reward_model=AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1),
        train_dataset=prompt_dataset(tok, args.prompts),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    out = Path(args.out)
    policy = trainer.model.policy
    # TRL rewrites the policy's generation config for its rollouts (eos cleared when stop_token is
    # unset); restore eos and pad, so the saved directory generates like any model.
    policy.generation_config.eos_token_id = tok.eos_token_id
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.save_pretrained(out)
    tok.save_pretrained(out)
    kept = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    kept.pop("output_dir")
    record = {"trl": __import__("trl").__version__, "set": values, "train_seconds": round(seconds, 1), "config": kept}
    (out / "trl_config.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({"out": str(out), "train_seconds": record["train_seconds"]}))


if __name__ == "__main__":
    main()
