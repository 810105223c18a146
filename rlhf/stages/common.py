"""What every HF-trainer stage (SFT, reward, DPO) does the same way: set up, build arguments, export.

The stages compose TRL trainers; this module holds the glue they share so that a change to,
say, checkpoint selection or LoRA export happens once.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import autocast, distributed
from rlhf.checkpoint import latest_checkpoint, now, write_manifest
from rlhf.config import (
    ConfigError,
    DeepSpeedConfig,
    PeftConfig,
    ModelConfig,
    Precision,
    TrackingConfig,
    TrainConfig,
    to_dict,
)
from rlhf.models import ModelKind, load_model, merge_adapter
from rlhf.tracking import METRICS_FILE, metrics_callback, setup_wandb_env

log = logging.getLogger("rlhf")


@dataclass
class StageDirs:
    """Where one stage of a run reads and writes."""

    run: Path  # the recipe's output_dir, shared by every stage of a run
    out: Path  # <run>/<stage>: the final HF directory + manifest
    checkpoints: Path  # <run>/<stage>/checkpoints: resumable trainer states
    started_at: str


def setup_logging() -> None:
    level = logging.INFO if distributed.is_main() else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, format="[rlhf %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rlhf").setLevel(level)


def start_stage(output_dir: str, stage: str, demo_assets: str | None) -> StageDirs:
    """Logging, demo assets (if the recipe asks), output directories."""
    setup_logging()
    if demo_assets:
        from rlhf.demo.assets import build_demo_assets

        build_demo_assets(demo_assets)  # file-locked: concurrent ranks wait for the first
    run = Path(output_dir)
    dirs = StageDirs(run=run, out=run / stage, checkpoints=run / stage / "checkpoints", started_at=now())
    dirs.checkpoints.mkdir(parents=True, exist_ok=True)
    return dirs


def resume_from(resume: str, checkpoints: Path) -> str | None:
    """'auto' -> newest complete checkpoint or None; 'never' -> None; else a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = latest_checkpoint(checkpoints)
        if found:
            log.info("resuming from %s", found)
        return str(found) if found else None
    if not Path(resume, "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume!r} is not a checkpoint directory (no trainer_state.json in it)")
    return resume


def training_arguments(
    *,
    train: TrainConfig,
    ds: DeepSpeedConfig,
    model: ModelConfig,
    tracking: TrackingConfig,
    dirs: StageDirs,
    stage: str,
    has_validation: bool,
    best_metric: str,
    greater_is_better: bool,
) -> dict[str, Any]:
    """Keyword arguments shared by trl.SFTConfig and trl.RewardConfig (both TrainingArguments)."""
    import torch

    report_to = setup_wandb_env(tracking, dirs.run, stage)
    evaluate = bool(train.eval_steps) and has_validation
    ds_config = None
    if ds.enabled:
        distributed.ensure_process_group_env()
        optimizer = {"lr": train.learning_rate, "weight_decay": train.weight_decay} if ds.offload_optimizer else None
        ds_config = distributed.build_deepspeed_config(ds, train, distributed.world_size(), optimizer)
    keep_best = train.keep_best and evaluate
    return dict(
        output_dir=str(dirs.checkpoints),
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        max_grad_norm=train.max_grad_norm,
        bf16=train.precision == "bf16",
        fp16=train.precision == "fp16",
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=train.eval_steps if evaluate else None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=keep_best,
        metric_for_best_model=best_metric if keep_best else None,
        greater_is_better=greater_is_better if keep_best else None,
        gradient_checkpointing=model.gradient_checkpointing,
        report_to=report_to,
        run_name=tracking.run_name,
        deepspeed=ds_config,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def sources_are_conversational(sources, keys: tuple[str, ...]) -> bool:
    """Whether the first rows of any source carry message lists under `keys` (a chat template is then required)."""
    from rlhf.data.formats import _decode
    from rlhf.data.io import read_rows
    from rlhf.data.prepare import require_source

    for i, src in enumerate(sources):
        require_source(src.path, f"data.sources[{i}].path")  # before read_rows' keyless message
        for row in read_rows(src.path, src.split, src.config)[:50]:
            if row.data and any(isinstance(_decode(row.data.get(k)), list) for k in keys):
                return True
    return False


def train(trainer, recipe, dirs: StageDirs) -> tuple[Any, float] | None:
    """Train, resuming from the newest checkpoint when there is one (recipe.resume); returns the
    Trainer's result and the seconds it took, or None when training was interrupted (the stage
    then stays resumable and must write no manifest)."""
    import torch

    ref = getattr(trainer, "ref_model", None)
    models = [m for m in (trainer.model, getattr(ref, "module", ref)) if isinstance(m, torch.nn.Module)]
    bf16 = autocast.resolve_autocast(recipe.model.autocast, trainer.args.device)
    if bf16:
        # Before train(): every later forward (training, evaluation, the stage's own test metrics
        # on trainer.model) then runs the same way, inside DeepSpeed's engine or without it.
        # DPO's separate reference computes the same way, so its first log-ratio is still 0. TRL
        # has already put it inside a DeepSpeed engine, whose own forward turns autocast off on a
        # GPU when the engine's config has no torch_autocast section: wrap the module inside it.
        for model in models:
            autocast.autocast_forward(model, trainer.args.device)
    kernel = autocast.attention_kernel(
        recipe.model.attn_implementation,
        trainer.args.device,
        bf16 or recipe.train.precision == "bf16",
        recipe.data.max_length,
    )
    for model in models:  # the reference computes as the policy does (DPO's first log-ratio 0)
        autocast.use_attention(model, kernel)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from(recipe.resume, dirs.checkpoints))
    seconds = time.perf_counter() - start
    if interrupted(trainer, recipe.train):
        log.info("training stopped at step %d; rerun the same command to resume", trainer.state.global_step)
        return None
    return result, seconds


def interrupted(trainer, train: TrainConfig) -> bool:
    """Stopped before max_steps by something other than early stopping (a callback, a signal):
    the stage must stay resumable and write no manifest."""
    state = trainer.state
    return (
        trainer.control.should_training_stop
        and state.global_step < state.max_steps
        and not train.early_stopping_patience
    )


def callbacks(train: TrainConfig, dirs: StageDirs, has_validation: bool) -> list:
    from transformers import EarlyStoppingCallback

    out = [metrics_callback(dirs.out / METRICS_FILE)]
    if train.early_stopping_patience and train.eval_steps and has_validation:
        out.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return out


def export(
    trainer, tokenizer, out: Path, peft: PeftConfig, base_path: str, kind: ModelKind, precision: Precision
) -> dict[str, Any]:
    """Write the trained model to `out` as a standalone HF directory (or an adapter: when the recipe
    asks, or when its method cannot merge, as prompt and prefix tuning cannot).

    Every rank must call this: under ZeRO-3 `save_model` gathers the sharded weights. A merged
    LoRA export reloads base + adapter on the main rank's CPU (`rlhf.models.merge_adapter`, the
    one merge every stage uses), so it works at any ZeRO stage. Returns the manifest's record.
    """
    info: dict[str, Any] = {"peft": None}
    if peft.enabled and peft.merge_on_export and peft.mergeable:
        adapter = out / "adapter"
        trainer.save_model(str(adapter))
        distributed.barrier()
        if distributed.is_main():
            merged = merge_adapter(adapter, kind, precision)
            merged.config.pad_token_id = tokenizer.pad_token_id  # a scorer's head reads the last non-pad token
            merged.save_pretrained(out)
        info["peft"] = {"type": peft.kind, "merged": True, "base": str(base_path), "adapter": str(adapter)}
    else:
        trainer.save_model(str(out))
        if peft.enabled:
            info["peft"] = {"type": peft.kind, "merged": False, "mergeable": peft.mergeable, "base": str(base_path)}
    if distributed.is_main():
        tokenizer.save_pretrained(out)
    distributed.barrier()
    return info


def load_stage_model(recipe, kind: ModelKind, **hf_kwargs: Any):
    """The model an HF-trainer stage (SFT, reward, DPO) starts from, loaded as its recipe says:
    path, precision, loading options, and QLoRA's quantized base (storage dtype per ZeRO stage)."""
    return load_model(
        recipe.model.name_or_path,
        kind,
        recipe.train.precision,
        model=recipe.model,
        lora=recipe.peft,
        zero_stage=recipe.deepspeed.zero_stage,
        **hf_kwargs,
    )


def peak_memory(device) -> dict[str, Any]:
    """The manifest's memory metrics: the peak (`peak_memory_mb`) and what it measures."""
    kind = "gpu_allocated" if getattr(device, "type", str(device)) == "cuda" else "cpu_resident_set"
    return {"peak_memory_mb": round(peak_memory_mb(device), 1), "peak_memory_of": kind}


def peak_memory_mb(device) -> float:
    """This process's peak memory: GPU memory allocated by torch on a GPU, else peak resident set
    size (each pipeline stage is its own process, so this is the stage's peak)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_now_mb(device) -> float:
    """Memory in use now: torch's allocation on a GPU, else this process's resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import os

    with open("/proc/self/statm") as f:  # pages: size, resident, ...
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryMarks:
    """Named points of a stage's run, each with the memory in use then and the stage's peak so far
    (the measures of `peak_memory_mb`): where the peak is reached, for an itemised account beside
    `rlhf.memory`'s estimate. The first time a name is marked counts (a PPO step's phases are
    marked on the process's first step). Marks are of one process: a resumed run's are of its
    first step after resuming, with the optimizer state it loaded counted under `models` (a fresh
    run allocates AdamW's moments in its first update, so they show under `training`).
    `scripts/estimate_memory.py --measured` prints them."""

    def __init__(self, device):
        self.device, self.marks = device, {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = {
                "now_mb": round(memory_now_mb(self.device), 1),
                "peak_mb": round(peak_memory_mb(self.device), 1),
            }


class MarkedTimes(dict):
    """A step's phase times ({phase: seconds}) that marks memory as each phase's time is recorded,
    so the code that times a phase marks it too, with no second hook to keep beside it."""

    def __init__(self, marks: MemoryMarks | None):
        super().__init__()
        self._marks = marks

    def __setitem__(self, phase: str, seconds: float) -> None:
        super().__setitem__(phase, seconds)
        if self._marks is not None:
            self._marks.mark(phase)


def finish_stage(
    trainer,
    tokenizer,
    recipe,
    dirs: StageDirs,
    *,
    stage: str,
    kind: ModelKind,
    parents: list[dict],
    datasets: dict[str, Any],
    metrics: dict[str, Any],
    **extra: Any,
) -> None:
    """Export the trained model (every rank: ZeRO-3 gathers shards), then write the manifest last on
    the main rank, since its presence is what marks the stage complete. The one ending of every
    HF-trainer stage (SFT, reward, DPO)."""
    info = export(trainer, tokenizer, dirs.out, recipe.peft, recipe.model.name_or_path, kind, recipe.train.precision)
    if distributed.is_main():
        write_manifest(
            dirs.out,
            stage=stage,
            recipe=to_dict(recipe),
            started_at=dirs.started_at,
            parents=parents,
            datasets=datasets,
            metrics=metrics,
            world_size=distributed.world_size(),
            **extra,
            **info,
        )
    distributed.barrier()
