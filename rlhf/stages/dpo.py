"""Offline preference optimisation (DPO and its variants, KTO), by composition around
`trl.DPOTrainer` / `trl.KTOTrainer`.

TRL owns the losses, the reference log-probabilities (a frozen copy of the SFT model, or the
same weights with the LoRA adapter switched off) and the implicit-reward metrics. We own what
TRL lacks: the hand-off checks on the SFT output, reading the same preference files and labelling
exports as the reward stage (cleaned, split and counted the same way), a check that TRL tokenized
every example exactly as our one renderer does (so the policy is trained on the token sequences
evaluation and the reward model see), test-split metrics, DeepSpeed under the launcher, export
and the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf import autocast, handoff
from rlhf.checkpoint import parent_ref
from rlhf.config_dpo import DPORecipe
from rlhf.data.formats import normalize_preference, normalize_unpaired, unpair
from rlhf.data.io import DataError
from rlhf.data.prepare import Splits, prepare_splits
from rlhf.adapters import adapter_config
from rlhf.models import load_tokenizer, require_chat_template
from rlhf.sampling import render_conversation
from rlhf.stages import common

log = logging.getLogger("rlhf")

CHECKED_ROWS = 64  # examples per split whose TRL tokens are compared with our renderer's


def check_parent(recipe: DPORecipe, tokenizer) -> dict:
    """Hand-off: a finished SFT output (or converted chat model) with merged weights, whose
    tokenizer is the one this stage trains with."""
    where = recipe.model.name_or_path
    manifest = handoff.parent_stage(where, handoff.POLICY_STAGES, needed_by="the DPO stage")
    handoff.merged_adapter(where, manifest, needed_by="the DPO stage")
    if recipe.model.tokenizer:
        handoff.same_tokenizer(
            tokenizer, f"model.tokenizer ({recipe.model.tokenizer})", load_tokenizer(where), f"the SFT output ({where})"
        )
    return manifest


def _texts(example: dict) -> list:
    return [example["prompt"], *(example.get(k) for k in ("chosen", "rejected", "completion") if k in example)]


def prepare_data(recipe: DPORecipe, tokenizer) -> tuple[Splits, dict[str, int]]:
    """Pairs (DPO) or single judged responses (KTO), split before pairs are unpaired so that the
    two halves of a pair never land in different splits. Ties carry no preference: dropped, counted."""

    def length_of(ex: dict) -> int:
        sides = [ex[k] for k in ("chosen", "rejected", "completion") if k in ex]
        return max(len(render_conversation(tokenizer, ex["prompt"] + side)) for side in sides)

    def no_prompt(ex: dict) -> str | None:
        # TRL renders the prompt alone with the generation prompt; an empty one has no rendering.
        return "no prompt" if not ex["prompt"] else None

    normalize = normalize_preference if recipe.method == "dpo" else normalize_unpaired
    splits = prepare_splits(recipe.data, normalize, length_of, no_prompt)
    ties: dict[str, int] = {}
    for name in ("train", "validation", "test"):
        rows = getattr(splits, name)
        if recipe.method == "kto":
            kept, ties[name] = unpair(rows)
        else:
            kept = [r for r in rows if not r["tie"]]
            ties[name] = len(rows) - len(kept)
        setattr(splits, name, kept)
    for src in splits.sources:
        log.info("data %s", src.summary())
        for example in src.bad_examples[:3]:
            log.warning("dropped bad row %s", example)
    if sum(ties.values()):
        log.info("ties dropped (no preference to learn): %s", ties)
    if not splits.train:
        raise DataError("no training examples left after dropping ties")
    if recipe.method == "kto" and len({r["label"] for r in splits.train}) < 2:
        raise DataError(
            "KTO needs both desirable and undesirable responses in the training split; "
            f"all {len(splits.train)} have label={splits.train[0]['label']}"
        )
    return splits, ties


def _to_dataset(rows: list[dict]):
    """Conversational rows for TRL, which renders them with the chat template (checked against ours)."""
    from datasets import Dataset

    if not rows:
        return None
    keys = ("prompt", "chosen", "rejected") if "chosen" in rows[0] else ("prompt", "completion", "label")
    return Dataset.from_list([{k: r[k] for k in keys} for r in rows])


def check_tokenization(tokenizer, rows: list[dict], tokenized, split: str) -> None:
    """TRL tokenized `rows` itself; its prompt + answer ids must equal our renderer's, or DPO would
    train on token sequences that no other stage produces (a silent mismatch of contexts)."""
    if tokenized is None:
        return
    answers = ("chosen", "rejected") if "chosen" in rows[0] else ("completion",)
    for i in range(min(CHECKED_ROWS, len(rows))):
        got = tokenized[i]
        for side in answers:
            ours = render_conversation(tokenizer, rows[i]["prompt"] + rows[i][side])
            theirs = list(got["prompt_ids"]) + list(got[f"{side}_ids"])
            if ours != theirs:
                at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise DataError(
                    f"{split} example {i} ({side}): TRL's tokens differ from the renderer every other stage uses "
                    f"(first difference at token {at} of {len(ours)}); the chat template does not render the "
                    "prompt as a prefix of the conversation"
                )


def _trainer(recipe: DPORecipe, model, ref, tokenizer, dirs, train_ds, eval_ds, extra_callbacks):
    """The TRL trainer for the recipe's method, with our shared training arguments."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    accuracy = recipe.best_metric == "accuracy"
    shared = common.training_arguments(
        train=recipe.train,
        ds=recipe.deepspeed,
        model=recipe.model,
        tracking=recipe.tracking,
        dirs=dirs,
        stage="dpo",
        has_validation=eval_ds is not None,
        best_metric="eval_rewards/accuracies" if accuracy else "eval_loss",
        greater_is_better=accuracy,
    )
    common_args = dict(
        max_length=recipe.data.max_length, beta=recipe.beta, precompute_ref_log_probs=recipe.precompute_ref_log_probs
    )
    if recipe.method == "dpo":
        args = DPOConfig(**shared, **common_args, loss_type=[recipe.loss_type], label_smoothing=recipe.label_smoothing)
        cls = DPOTrainer
    else:
        args = KTOConfig(
            **shared,
            **common_args,
            loss_type=recipe.loss_type,
            desirable_weight=recipe.desirable_weight,
            undesirable_weight=recipe.undesirable_weight,
        )
        cls = KTOTrainer
    return cls(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=adapter_config(recipe.peft, "CAUSAL_LM"),
        callbacks=common.callbacks(recipe.train, dirs, eval_ds is not None) + list(extra_callbacks or []),
    )


SPLIT_USE = {
    "eval": "checkpoint selection and early stopping (optimistic)",
    "test": "nothing: held out from training and selection",
}


def _split_metrics(trainer, test_ds) -> dict[str, Any]:
    """The implicit-reward metrics (preference accuracy, margins) on the validation split and on the
    test split, which neither training nor checkpoint selection saw (TRL tokenizes the test split
    inside `evaluate` with the function checked above). TRL averages them per batch."""
    out: dict[str, Any] = {}
    for prefix, ds in (("eval", trainer.eval_dataset), ("test", test_ds)):
        if ds is not None:
            got = trainer.evaluate(None if prefix == "eval" else ds, metric_key_prefix=prefix)
            # TRL's `log` adds its own metrics (rewards/accuracies, margins, ...) as eval_* whatever
            # the prefix; the Trainer's own (loss, runtime) carry the prefix.
            out[prefix] = {
                k.split("_", 1)[1]: v
                for k, v in got.items()
                if k.startswith(("eval_", prefix + "_")) and isinstance(v, (int, float))
            }
            out[prefix]["used_for"] = SPLIT_USE[prefix]
    return out


def run_dpo(recipe: DPORecipe, extra_callbacks: list | None = None) -> Path:
    """Train and export; returns `<output_dir>/dpo`."""
    dirs, tokenizer, splits, ties = _checked_inputs(recipe)
    train_ds, eval_ds, test_ds = (_to_dataset(s) for s in (splits.train, splits.validation, splits.test))
    trainer = _built_trainer(recipe, tokenizer, dirs, splits, train_ds, eval_ds, extra_callbacks)
    trained = common.train(trainer, recipe, dirs)  # resumes from the newest checkpoint when there is one
    if trained is None:
        return dirs.out
    result, seconds = trained
    metrics = {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        **common.peak_memory(trainer.args.device),
        "bf16_autocast": autocast.is_wrapped(trainer.model),  # what model.autocast (auto: by the hardware) chose
        "attention": autocast.attention_of(trainer.model),  # what attn_implementation (auto: by dtype and device) chose
        "best_checkpoint": trainer.state.best_model_checkpoint,
        **_split_metrics(trainer, test_ds),
    }
    # Export, then the manifest last: its presence means "complete".
    common.finish_stage(
        trainer,
        tokenizer,
        recipe,
        dirs,
        stage="dpo",
        kind="causal-lm",
        parents=[parent_ref(recipe.model.name_or_path)],
        datasets={**splits.report(), "ties_dropped": ties},
        metrics=metrics,
    )
    test = metrics.get("test", {})
    log.info(
        "%s (%s) done in %.0fs: test preference accuracy %s, margin %s (held out) -> %s",
        recipe.method,
        recipe.loss_type,
        seconds,
        test.get("rewards/accuracies"),
        test.get("rewards/margins"),
        dirs.out,
    )
    return dirs.out


def _checked_inputs(recipe: DPORecipe):
    """Hand-off checks and data, before any model is loaded: (dirs, tokenizer, splits, ties dropped)."""
    dirs = common.start_stage(recipe.output_dir, "dpo", recipe.demo_assets)
    tok_path = recipe.model.tokenizer or recipe.model.name_or_path
    tokenizer = load_tokenizer(tok_path)
    check_parent(recipe, tokenizer)
    keys = ("prompt", "chosen", "rejected", "completion", "response")
    if common.sources_are_conversational(recipe.data.sources, keys):
        require_chat_template(tokenizer, tok_path)
    splits, ties = prepare_data(recipe, tokenizer)
    return dirs, tokenizer, splits, ties


def _built_trainer(recipe: DPORecipe, tokenizer, dirs, splits: Splits, train_ds, eval_ds, extra_callbacks):
    """The policy, the reference when one is needed, and TRL's trainer, with its tokenisation checked
    against ours.

    The reference is a second copy only for full fine-tuning without precomputed log-probs; under
    LoRA TRL disables the adapter instead. We load it here, like the policy and before the DeepSpeed
    arguments exist: TRL's own loading would run under ZeRO-3's `zero.Init` before DeepSpeed's
    communicator is up and fail on the batch-size check."""
    model = common.load_stage_model(recipe, "causal-lm")
    ref = (
        common.load_stage_model(recipe, "causal-lm")
        if not (recipe.peft.enabled or recipe.precompute_ref_log_probs)
        else None
    )
    trainer = _trainer(recipe, model, ref, tokenizer, dirs, train_ds, eval_ds, extra_callbacks)
    check_tokenization(tokenizer, splits.train, trainer.train_dataset, "train")
    check_tokenization(tokenizer, splits.validation, trainer.eval_dataset, "validation")
    return trainer
