"""Stage 2: a scalar reward model on preference pairs, by composition around `trl.RewardTrainer`.

TRL does the Bradley-Terry loss (with margin and optional centring) and the PEFT wrapping. We
own the hand-off checks on the SFT output, preference cleaning with counts (ties, identical or
empty sides, over-long pairs), exact validation metrics and calibration on the full validation
split, the reward statistics PPO normalises with, export and the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rlhf import autocast, distributed, handoff
from rlhf.checkpoint import parent_ref
from rlhf.config import RewardRecipe
from rlhf.data.formats import Messages, RowError, normalize_labelled, normalize_preference
from rlhf.data.io import DataError, read_rows
from rlhf.data.prepare import Splits, prepare_splits
from rlhf.adapters import adapter_config
from rlhf.models import load_tokenizer, require_chat_template
from rlhf.reward_metrics import (
    bradley_terry_loss,
    calibration_table,
    format_calibration,
    mean_margin,
    pairwise_accuracy,
    precision_recall,
)
from rlhf.sampling import render_conversation, score_sequences
from rlhf.stages import common

log = logging.getLogger("rlhf")


def _side(pair: dict, name: str) -> Messages:
    return pair["prompt"] + pair[name]


def split_ties(pairs: list[dict], policy: str) -> tuple[list[dict], int]:
    """Apply the tie policy: drop ties, or keep each tie in both orders (BT with target 1/2)."""
    plain = [p for p in pairs if not p["tie"]]
    ties = [p for p in pairs if p["tie"]]
    if policy == "soft":
        for p in ties:
            plain += [{**p, "margin": 0.0}, {**p, "chosen": p["rejected"], "rejected": p["chosen"], "margin": 0.0}]
    return plain, len(ties)


def prepare_reward_data(recipe: RewardRecipe, tokenizer) -> tuple[Splits, dict[str, Any]]:
    def length_of(pair: dict) -> int:
        return max(
            len(render_conversation(tokenizer, _side(pair, "chosen"))),
            len(render_conversation(tokenizer, _side(pair, "rejected"))),
        )

    splits = prepare_splits(recipe.data, normalize_preference, length_of)
    splits.train, ties_train = split_ties(splits.train, recipe.ties)
    splits.validation, ties_val = split_ties(splits.validation, "drop")  # a tie has no right answer
    splits.test, ties_test = split_ties(splits.test, "drop")
    ties = {"policy": recipe.ties, "train": ties_train, "validation_dropped": ties_val, "test_dropped": ties_test}
    for src in splits.sources:
        log.info("data %s", src.summary())
        for example in src.bad_examples[:3]:
            log.warning("dropped bad pair %s", example)
    log.info("ties: %d in training (%s), %d dropped from validation", ties_train, recipe.ties, ties_val)
    if not splits.train:
        raise DataError("no training pairs left after the tie policy")
    return splits, ties


def _to_dataset(pairs: list[dict], tokenizer, use_margin: bool):
    """TRL rows already tokenized by our one renderer (`chosen_ids` / `rejected_ids`), so the reward
    model trains on exactly the token sequences that PPO, evaluation and labelling score."""
    from datasets import Dataset

    if not pairs:
        return None
    rows = []
    for p in pairs:
        row: dict[str, Any] = {
            "chosen_ids": render_conversation(tokenizer, _side(p, "chosen")),
            "rejected_ids": render_conversation(tokenizer, _side(p, "rejected")),
        }
        if use_margin:
            row["margin"] = p["margin"]
        rows.append(row)
    return Dataset.from_list(rows)


def load_reward_model(recipe: RewardRecipe, tokenizer):
    """AutoModelForSequenceClassification with one label: the SFT body plus a fresh scalar head (or,
    starting from a reward model, its body and trained head)."""
    from transformers import set_seed

    set_seed(recipe.train.seed)  # the new head is randomly initialised: same seed, same head, same run
    # The head reads the last token that is not this pad id; it must be the tokenizer's pad.
    return common.load_stage_model(recipe, "scorer", pad_token_id=tokenizer.pad_token_id)


def check_sft_parent(recipe: RewardRecipe) -> dict:
    """Hand-off: the starting directory must be a finished SFT output with full (merged) weights,
    or a finished reward model to continue training (`rlhf rounds`: its trained head is kept)."""
    manifest = handoff.parent_stage(recipe.model.name_or_path, ("sft", "reward"), needed_by="the reward stage")
    handoff.merged_adapter(recipe.model.name_or_path, manifest, needed_by="the reward stage")
    return manifest


def _scores(model, tokenizer, conversations: list[Messages], device, batch_size: int) -> torch.Tensor:
    return score_sequences(
        model, [render_conversation(tokenizer, c) for c in conversations], tokenizer.pad_token_id, device, batch_size
    )


SPLIT_USE = {
    "validation": "checkpoint selection and early stopping (optimistic)",
    "test": "nothing: held out from training and selection",
}


def _pair_metrics(model, tokenizer, recipe: RewardRecipe, pairs: list[dict], device, bs: int) -> tuple[dict, list]:
    """Exact pairwise metrics and the calibration table over every pair of one split."""
    rc = _scores(model, tokenizer, [_side(p, "chosen") for p in pairs], device, bs)
    rr = _scores(model, tokenizer, [_side(p, "rejected") for p in pairs], device, bs)
    margins = torch.tensor([p["margin"] for p in pairs]) if recipe.use_margin else None
    metrics = {
        "pairs": len(pairs),
        "accuracy": pairwise_accuracy(rc, rr),
        "mean_margin": mean_margin(rc, rr),
        "loss": bradley_terry_loss(rc, rr, margins),
        "mean_chosen": rc.mean().item(),
        "mean_rejected": rr.mean().item(),
    }
    return metrics, calibration_table(rc, rr, recipe.calibration_bins)


def evaluate_reward_model(model, tokenizer, recipe: RewardRecipe, splits: Splits, device) -> dict[str, Any]:
    """Exact metrics over whole splits with the final model. Every rank computes the same numbers
    (under ZeRO-3 every rank must take part in each forward)."""
    bs = recipe.train.micro_batch_size * 2
    out: dict[str, Any] = {}
    for name, pairs in (("validation", splits.validation), ("test", splits.test)):
        if pairs:
            out[name], table = _pair_metrics(model, tokenizer, recipe, pairs, device, bs)
            out[name]["used_for"] = SPLIT_USE[name]
            out["calibration" if name == "validation" else "test_calibration"] = table
    # Reward statistics over the training prompts' chosen responses: PPO normalises with them.
    chosen = [_side(p, "chosen") for p in splits.train[: recipe.stats_max_samples]]
    r = _scores(model, tokenizer, chosen, device, bs)
    out["reward_stats"] = {"mean": r.mean().item(), "std": r.std().item() if r.numel() > 1 else 0.0, "n": r.numel()}
    if recipe.labelled is not None:
        out["labelled"] = _labelled_metrics(model, tokenizer, recipe, out, device, bs)
    return out


def _labelled_metrics(model, tokenizer, recipe: RewardRecipe, out: dict, device, bs: int) -> dict[str, Any]:
    rows, bad = [], 0
    for row in read_rows(recipe.labelled.path, recipe.labelled.split, recipe.labelled.config):
        try:
            if row.data is None:
                raise RowError(row.error or "unreadable")
            rows.append(normalize_labelled(row.data))
        except (RowError, ValueError):
            bad += 1
    if not rows:
        raise DataError(f"{recipe.labelled.path}: no usable labelled responses ({bad} bad)")
    scores = _scores(model, tokenizer, [r["prompt"] + r["response"] for r in rows], device, bs)
    labels = torch.tensor([r["label"] for r in rows])
    # Threshold halfway between the mean chosen and mean rejected reward on validation: the
    # natural "good vs bad" boundary the model learned from pairs (its raw scale is arbitrary).
    v = out.get("validation")
    threshold = (v["mean_chosen"] + v["mean_rejected"]) / 2 if v else out["reward_stats"]["mean"]
    return {**precision_recall(scores, labels, threshold), "bad_rows": bad}


def _log_result(evaluation: dict[str, Any], seconds: float, out: Path) -> None:
    v, t = evaluation.get("validation", {}), evaluation.get("test", {})
    log.info(
        "reward model done in %.0fs: validation accuracy %s (selection), test accuracy %s (held out) -> %s",
        seconds,
        v.get("accuracy"),
        t.get("accuracy"),
        out,
    )
    if "calibration" in evaluation:
        log.info("calibration on the validation split:\n%s", format_calibration(evaluation["calibration"]))


def _trainer(recipe: RewardRecipe, tokenizer, dirs, train_ds, eval_ds, extra_callbacks):
    """TRL's RewardTrainer on the scorer, selecting checkpoints by validation accuracy or loss."""
    from trl import RewardConfig, RewardTrainer

    model = load_reward_model(recipe, tokenizer)  # before the config, as in the SFT stage's _trainer
    accuracy = recipe.best_metric == "accuracy"
    args = RewardConfig(
        **common.training_arguments(
            train=recipe.train,
            ds=recipe.deepspeed,
            model=recipe.model,
            tracking=recipe.tracking,
            dirs=dirs,
            stage="reward",
            has_validation=eval_ds is not None,
            best_metric="eval_accuracy" if accuracy else "eval_loss",
            greater_is_better=accuracy,
        ),
        max_length=recipe.data.max_length,
        center_rewards_coefficient=recipe.center_rewards_coefficient,
    )
    return RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=adapter_config(recipe.peft, "SEQ_CLS"),  # SEQ_CLS trains and saves the head in full
        callbacks=common.callbacks(recipe.train, dirs, eval_ds is not None) + list(extra_callbacks or []),
    )


def run_reward(recipe: RewardRecipe, extra_callbacks: list | None = None) -> Path:
    """Train the reward model and export it; returns `<output_dir>/reward`."""
    # 1. Hand-off checks and data, before any model is loaded.
    dirs = common.start_stage(recipe.output_dir, "reward", recipe.demo_assets)
    check_sft_parent(recipe)
    tok_path = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = load_tokenizer(tok_path)
    if common.sources_are_conversational(recipe.data.sources, ("prompt", "chosen", "rejected")):
        require_chat_template(tokenizer, tok_path)
    splits, ties = prepare_reward_data(recipe, tokenizer)
    train_ds = _to_dataset(splits.train, tokenizer, recipe.use_margin)
    eval_ds = _to_dataset(splits.validation, tokenizer, recipe.use_margin)

    # 2. Model and trainer.
    trainer = _trainer(recipe, tokenizer, dirs, train_ds, eval_ds, extra_callbacks)

    # 3. Train (resuming when a checkpoint exists).
    trained = common.train(trainer, recipe, dirs)
    if trained is None:
        return dirs.out
    result, seconds = trained

    # 4. Exact metrics with the final (or best) weights, on every rank.
    evaluation = evaluate_reward_model(trainer.model, tokenizer, recipe, splits, trainer.args.device)
    metrics = {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        **common.peak_memory(trainer.args.device),
        "bf16_autocast": autocast.is_wrapped(trainer.model),  # what model.autocast (auto: by the hardware) chose
        "attention": autocast.attention_of(trainer.model),  # what attn_implementation (auto: by dtype and device) chose
        **evaluation,
    }

    # 5. Export, then the manifest last.
    common.finish_stage(
        trainer,
        tokenizer,
        recipe,
        dirs,
        stage="reward",
        kind="scorer",
        parents=[parent_ref(recipe.model.name_or_path)],
        datasets={**splits.report(), "ties": ties},
        metrics=metrics,
        reward_stats=evaluation["reward_stats"],
    )
    if distributed.is_main():
        _log_result(evaluation, seconds, dirs.out)
    return dirs.out
