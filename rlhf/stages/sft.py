"""Stage 1: supervised fine-tuning on demonstrations, by composition around `trl.SFTTrainer`.

TRL does the loss masking (assistant / completion tokens only), packing and PEFT wrapping; we
own what it does not: data cleaning and splits with a report, the DeepSpeed config, resume
selection, export (LoRA merge) and the manifest the reward and PPO stages check.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf import autocast
from rlhf.config import SFTRecipe
from rlhf.data.formats import Messages, normalize_sft
from rlhf.data.io import DataError
from rlhf.data.prepare import Splits, prepare_splits
from rlhf.adapters import adapter_config, trainable_parameters
from rlhf.models import load_tokenizer, require_chat_template
from rlhf.sampling import render_conversation, render_for_loss
from rlhf.stages import common

log = logging.getLogger("rlhf")


def prepare_sft_data(recipe: SFTRecipe, tokenizer) -> Splits:
    """Normalise every source to chat messages; lengths are those of the one rendering every stage uses."""

    def length_of(messages: Messages) -> int:
        return len(render_conversation(tokenizer, messages))

    splits = prepare_splits(recipe.data, normalize_sft, length_of)
    splits.train_tokens = sum(map(length_of, splits.train))
    for src in splits.sources:
        log.info("data %s", src.summary())
        for example in src.bad_examples[:3]:
            log.warning("dropped bad row %s", example)
    return splits


def row_packed_collator(pad_token_id: int):
    """Collate packed rows as separate batch rows, for attention kernels without varlen support.

    TRL's "bfd" packing turns on padding-free mode: the whole batch becomes ONE row. That is what
    flash-attention's varlen kernels want, but sdpa/eager then attend over a (B*L)^2 mask, which
    measured 4x slower than no packing on CPU. Here each packed row stays a row of (B, L), with
    per-example position_ids and no 2D mask, so transformers builds a block-diagonal mask per
    row: examples still never see each other, at (B * L^2) cost.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=False, return_position_ids=True)

    def collate(examples: list[dict]) -> dict:
        batch = inner(examples)
        batch.pop("attention_mask")  # its absence is what makes transformers read position_ids as packing
        return batch

    return collate


def _to_dataset(rows: list[Messages], tokenizer, loss_on: str, split: str):
    """Rows tokenized by our own renderer (`rlhf.sampling`), so SFT sees exactly the token sequences
    the reward model and PPO see. With `loss_on: completion` an `assistant_masks` column marks the
    reply tokens; TRL turns it into labels. Our own masking, rather than TRL's `assistant_only_loss`,
    because that needs `{% generation %}` markers, which most real chat templates (SmolLM2's,
    Qwen's, Llama's) do not have."""
    from datasets import Dataset

    if not rows:
        return None
    out = []
    for i, messages in enumerate(rows):
        if loss_on == "all":
            out.append({"input_ids": render_conversation(tokenizer, messages)})
            continue
        try:
            ids, mask = render_for_loss(tokenizer, messages)
        except ValueError as e:
            raise DataError(f"{split} example {i} ({messages[0]['content'][:60]!r}...): {e}") from None
        out.append({"input_ids": ids, "assistant_masks": mask})
    return Dataset.from_list(out)


def _final_metrics(trainer, result, train_seconds: float, tokens_per_epoch: int) -> dict[str, Any]:
    history = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    # Our own count (TRL's `num_tokens` assumes its padding-free layout): real tokens per epoch of
    # the training split times the epochs run. Includes the steps before a resume.
    tokens = tokens_per_epoch * (trainer.state.epoch or 0.0)
    trainable, total = trainable_parameters(trainer.model)  # adapters included; the base's under PEFT
    return {
        "train_loss": result.training_loss,
        "first_logged_loss": history[0]["loss"] if history else None,
        "last_logged_loss": history[-1]["loss"] if history else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "best_eval_loss": min((e["eval_loss"] for e in evals), default=None),
        "global_step": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_epoch": tokens_per_epoch,
        "epochs": trainer.state.epoch,
        "tokens_seen": round(tokens),
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        **common.peak_memory(trainer.args.device),
        "bf16_autocast": autocast.is_wrapped(trainer.model),  # what model.autocast (auto: by the hardware) chose
        "attention": autocast.attention_of(trainer.model),  # what attn_implementation (auto: by dtype and device) chose
    }


def _test_metrics(trainer, test_ds) -> dict[str, Any]:
    """Loss on the test split, which neither training nor checkpoint selection ever saw."""
    out: dict[str, Any] = {
        "splits_used_for": {
            "eval_loss": "checkpoint selection and early stopping (optimistic)",
            "test_loss": "nothing: held out from training and selection",
        }
    }
    if test_ds is not None:
        out["test_loss"] = trainer.evaluate(test_ds, metric_key_prefix="test")["test_loss"]
    return out


def _trainer(recipe: SFTRecipe, tokenizer, tok_path: str, dirs, train_ds, eval_ds, extra_callbacks):
    """TRL's SFTTrainer on the stage's model, with our mask (any chat template) and row packing."""
    from trl import SFTConfig, SFTTrainer

    # The model is loaded before the TrainingArguments exist: with a ZeRO-3 config they register a
    # global DeepSpeed config that turns from_pretrained into partitioned loading (zero.Init),
    # which load_stage_model is not written for.
    model = common.load_stage_model(recipe, "causal-lm")
    args = SFTConfig(
        **common.training_arguments(
            train=recipe.train,
            ds=recipe.deepspeed,
            model=recipe.model,
            tracking=recipe.tracking,
            dirs=dirs,
            stage="sft",
            has_validation=eval_ds is not None,
            best_metric="eval_loss",
            greater_is_better=False,
        ),
        max_length=recipe.data.max_length,
        packing=recipe.packing,
        completion_only_loss=False,  # the mask comes with the data (`assistant_masks`), for any template
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=adapter_config(recipe.peft, "CAUSAL_LM", tokenizer_path=tok_path),
        callbacks=common.callbacks(recipe.train, dirs, eval_ds is not None) + list(extra_callbacks or []),
    )
    if recipe.packing and not (recipe.model.attn_implementation or "").startswith("flash"):
        trainer.data_collator = row_packed_collator(tokenizer.pad_token_id)
    return trainer


def run_sft(recipe: SFTRecipe, extra_callbacks: list | None = None) -> Path:
    """Train and export; returns `<output_dir>/sft`. `extra_callbacks` are HF TrainerCallbacks."""
    # 1. Directories, demo assets, tokenizer checks: everything that can fail cheaply, first.
    dirs = common.start_stage(recipe.output_dir, "sft", recipe.demo_assets)
    tok_path = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = load_tokenizer(tok_path)
    if common.sources_are_conversational(recipe.data.sources, ("messages", "prompt", "completion")):
        require_chat_template(tokenizer, tok_path)

    # 2. Data: cleaned, split, mixed and tokenized before any model is loaded.
    splits = prepare_sft_data(recipe, tokenizer)
    train_ds = _to_dataset(splits.train, tokenizer, recipe.loss_on, "train")
    eval_ds = _to_dataset(splits.validation, tokenizer, recipe.loss_on, "validation")
    test_ds = _to_dataset(splits.test, tokenizer, recipe.loss_on, "test")

    # 3. Model and trainer.
    trainer = _trainer(recipe, tokenizer, tok_path, dirs, train_ds, eval_ds, extra_callbacks)

    # 4. Train, resuming from the newest checkpoint when there is one.
    trained = common.train(trainer, recipe, dirs)
    if trained is None:
        return dirs.out
    result, seconds = trained
    metrics = {**_final_metrics(trainer, result, seconds, splits.train_tokens), **_test_metrics(trainer, test_ds)}

    # 5. Export the model, then the manifest last: its presence means "complete".
    common.finish_stage(
        trainer,
        tokenizer,
        recipe,
        dirs,
        stage="sft",
        kind="causal-lm",
        parents=[],
        datasets=splits.report(),
        metrics=metrics,
        base_model=recipe.model.name_or_path,
    )
    log.info(
        "SFT done in %.0fs: train loss %.4f, eval loss %s (selection), test loss %s (held out) -> %s",
        seconds,
        metrics["train_loss"],
        metrics["eval_loss"],
        metrics.get("test_loss"),
        dirs.out,
    )
    return dirs.out
