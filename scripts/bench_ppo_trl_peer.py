"""The peer side of scripts/bench_ppo.py: TRL 1.0.0's experimental PPOTrainer on the same models.

Runs inside TRL's own virtual environment (made by bench_ppo.py), so it imports nothing from
rlhf. Prints one JSON line: per-step wall times (from a step-end callback) and peak RSS.

    python scripts/bench_ppo_trl_peer.py --sft DIR --reward DIR --prompts FILE --steps N [...]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time


def prompt_dataset(tok, path: str):
    """TRL's PPO input: each {'prompt': ...} row of `path` as a chat-templated user turn, tokenized."""
    from datasets import Dataset

    prompts = [json.loads(line)["prompt"] for line in open(path) if line.strip()]
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for p in prompts
    ]
    return Dataset.from_dict({"input_ids": ids})


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--sft", "--reward", "--prompts"):
        ap.add_argument(name, required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rollout-batch", type=int, default=32)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.sft, padding_side="left")
    dataset = prompt_dataset(tok, args.prompts)
    policy = AutoModelForCausalLM.from_pretrained(args.sft)
    ref = AutoModelForCausalLM.from_pretrained(args.sft)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    # Matched to our demo PPO step: `rollout-batch` rollouts per step in `mini-batches` optimizer
    # steps per PPO epoch (per_device_train_batch_size = rollout batch, no accumulation).
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.rollout_batch,
        gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.steps * args.rollout_batch,
        local_rollout_forward_batch_size=args.rollout_batch,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=1.0,
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        num_sample_generations=0,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
    )
    marks: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        callbacks=[StepTimes()],
    )
    trainer.train()
    steps = [b - a for a, b in zip(marks, marks[1:])]
    print(
        json.dumps(
            {
                "step_seconds": steps,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "trl": __import__("trl").__version__,
                "transformers": __import__("transformers").__version__,
                "torch": torch.__version__,
                "config": {
                    k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))
                },
            }
        )
    )


if __name__ == "__main__":
    main()
