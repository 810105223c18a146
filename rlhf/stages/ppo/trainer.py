"""Stage 3: PPO on DeepSpeed engines. Ours, because TRL removed its PPO trainer.

`run_ppo` reads top to bottom: (1) hand-off checks and data, (2) models, (3) resume, then per step
(4) rollout, (5) update, (6) statistics shared by all ranks, (7) log, (8) save; finally (9) export.
Every statistic that steers training (KL coefficient, reward normaliser, advantage whitening) is
computed over all ranks, so every rank holds the same value, and those statistics equal what 1
process computes on the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from rlhf import autocast, distributed, handoff
from rlhf.checkpoint import parent_ref, write_manifest
from rlhf.config import to_dict
from rlhf.config_rl import PPORecipe
from rlhf.errors import HandoffError, TrainingAborted
from rlhf.models import load_tokenizer
from rlhf.stages import common
from rlhf.stages.ppo import engines, losses, value_head
from rlhf.stages.ppo.advantages import ESTIMATORS
from rlhf.stages.ppo.data import Data, prepare_data, rollout_prompts, stream_batch
from rlhf.stages.ppo.rollout import Rollout, is_finite, make_rollout, rollout_metrics
from rlhf.stages.ppo.scoring import CodeRewards
from rlhf.stages.ppo.state import STATE_FILE, complete_states, load_state, save_state
from rlhf.stages.ppo.update import ppo_update
from rlhf.tracking import METRICS_FILE, Tracker, truncate_after

log = logging.getLogger("rlhf")


class PPOAborted(TrainingAborted):
    """Too many consecutive steps with non-finite rewards, log-probs or losses."""


def check_handoff(recipe: PPORecipe):
    """Before any compute: the parents are finished outputs of the right stage, the SFT weights are
    full (not an unmerged adapter), and the reward model (when there is one) shares the policy's
    tokenizer and reads its score where our padding puts it. Returns (tokenizer, reward manifest;
    {} without a reward model)."""
    # An RL output may be the reference too: `rlhf rounds` with carry.reference=previous.
    sft = handoff.parent_stage(recipe.sft_dir, (*handoff.POLICY_STAGES, "ppo"), needed_by="the PPO stage")
    handoff.merged_adapter(recipe.sft_dir, sft, needed_by="the PPO stage")
    tok = load_tokenizer(recipe.sft_dir)
    if recipe.continue_from is not None:
        continued_state(recipe)  # fails now, before any model loads, if there is nothing to continue
    if recipe.reward_dir is None:
        return tok, {}
    reward_manifest = handoff.reward_model(
        recipe.reward_dir, tok, f"actor/reference ({recipe.sft_dir})", needed_by="the PPO stage"
    )
    return tok, reward_manifest


@dataclass
class RunState:
    """What the loop carries from step to step, all of it saved in every state directory."""

    kl_ctl: losses.KLController
    running: losses.RunningMoments = field(default_factory=losses.RunningMoments)
    start_step: int = 0
    bad_steps: int = 0
    code: CodeRewards | None = None  # reward functions and their running normalisers

    def saved(self) -> dict:
        out = {
            "bad_steps": self.bad_steps,
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_normaliser": self.running.state_dict(),
        }
        if self.code is not None:
            out["reward_function_normalisers"] = self.code.state_dict()
        return out


def continued_state(recipe: PPORecipe) -> Path:
    """The final training state of the run named by continue_from; a HandoffError names what is wrong."""
    c = recipe.continue_from
    assert c is not None
    manifest = handoff.parent_stage(c.path, "ppo", needed_by="continue_from")
    states = complete_states(Path(c.path) / "checkpoints")
    if not states or states[-1][0] != manifest.get("metrics", {}).get("steps", states[-1][0]):
        raise HandoffError(
            f"continue_from.path {c.path}: no final training state in {Path(c.path) / 'checkpoints'} "
            "(the run keeps it unless its checkpoints were deleted)"
        )
    # under a shared trunk the critic is in the actor's state (the layout check below)
    for name, wanted in (("actor", c.actor), ("critic", c.critic and recipe.ppo.separate_critic)):
        if wanted and not (states[-1][1] / name).is_dir():
            raise HandoffError(
                f"continue_from.path {c.path}: its final state {states[-1][1]} has no {name} to continue "
                f"(set continue_from.{name}=false)"
            )
    then = manifest.get("recipe", {})
    had_head = _value_head_in_actor(then.get("ppo", {}))
    if c.actor and had_head != recipe.ppo.shared_critic:
        # the actor's state holds the shared value head exactly when its run had one
        raise HandoffError(
            f"continue_from.path {c.path} trained its actor {'with' if had_head else 'without'} a shared "
            f"value head (ppo.critic_trunk=shared with a critic), and this run's actor has "
            f"{'none' if had_head else 'one'}: a training state does not carry across the two layouts. Start "
            f"from that run's exported policy instead (sft_dir={c.path}, continue_from.actor=false), or use "
            "the same ppo.critic_trunk and estimator"
        )
    if c.actor and recipe.peft.enabled and then.get("sft_dir") != recipe.sft_dir:
        # Under LoRA the state holds base + adapter; the base must be the one this run builds on.
        raise HandoffError(
            f"continue_from.path {c.path} trained an adapter on {then.get('sft_dir')}, but this run's sft_dir is "
            f"{recipe.sft_dir}; continue the actor only on the same base (or set continue_from.actor=false)"
        )
    return states[-1][1]


def _value_head_in_actor(ppo: dict) -> bool:
    """Whether an earlier run's actor held a value head, from the `ppo` section its manifest saved
    (`PPOSettings.shared_critic` of that recipe, read from JSON)."""
    estimator = ESTIMATORS.get(ppo.get("advantage_estimator", "gae"))
    return ppo.get("critic_trunk", "separate") == "shared" and estimator is not None and estimator.needs_critic


def _carry(recipe: PPORecipe, m: engines.Models, state: RunState) -> None:
    """A fresh run that continues another (continue_from): load only what the recipe carries."""
    c = recipe.continue_from
    assert c is not None
    path = continued_state(recipe)
    frozen_dtype_matches(path, m, "continue with model.autocast on as well")
    carried = [
        (name, engine)
        for name, engine, on in (("actor", m.actor, c.actor), ("critic", m.critic, c.critic))
        if on and engine is not None  # a shared trunk's critic comes with the actor
    ]
    for name, engine in carried:
        loaded, _ = engine.load_checkpoint(
            str(path / name),
            tag="state",
            load_module_only=not c.optimizer,
            load_optimizer_states=c.optimizer,
            load_lr_scheduler_states=False,  # this run's schedule starts at its own step 0
        )
        if loaded is None:  # DeepSpeed only warns when it finds nothing: a fresh model must not pass as carried
            raise HandoffError(f"continue_from: DeepSpeed found no checkpoint to load in {path / name}")
        if c.optimizer:  # the loaded optimizer brings the old run's last learning rate; this run's schedule rules
            for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr
    if m.shared_critic and c.actor and not c.critic:
        value_head.reset(m.actor)  # a fresh critic, as a separate one would start from reward_dir
    if c.kl_controller:
        state.kl_ctl.load_state_dict(json.loads((path / STATE_FILE).read_text())["kl_controller"])
    names = [n for n, _ in carried] + (["its value head"] if m.shared_critic and c.actor and c.critic else [])
    log.info(
        "continuing from %s: %s%s%s",
        path,
        ", ".join(names) or "nothing of the models",
        " with optimizer states" if c.optimizer else "",
        ", KL controller" if c.kl_controller else "",
    )


def frozen_dtype_matches(path: Path, m: engines.Models, fix: str) -> None:
    """A state saved with frozen weights in bf16 (`Models.frozen_bf16`) holds them rounded: loaded
    into a run that computes in fp32, its reference and LoRA bases would no longer be the models it
    names. Refused with a HandoffError saying `fix`. The other way round (fp32 state, bf16 run)
    rounds them exactly as the run itself does, and is allowed."""
    if json.loads((path / STATE_FILE).read_text()).get("frozen_bf16", False) and not m.frozen_bf16:
        raise HandoffError(
            f"{path} was saved by a run under bf16 autocast, with its frozen weights (LoRA bases, reference, "
            f"reward model) stored in bf16, and this run computes in fp32 (model.autocast resolved off); {fix}"
        )


def resume(recipe: PPORecipe, m: engines.Models, checkpoints: Path, code: CodeRewards | None = None) -> RunState:
    """The newest complete state when `resume: auto` finds one; else what continue_from carries
    (see ContinueFrom); else a fresh start."""
    state = RunState(losses.KLController(recipe.ppo.kl_coef, recipe.ppo.kl_target, recipe.ppo.kl_horizon), code=code)
    states = complete_states(checkpoints)
    if not (recipe.resume == "auto" and states):
        if recipe.continue_from is not None:
            _carry(recipe, m, state)
        return state
    had_head = json.loads((states[-1][1] / STATE_FILE).read_text()).get("value_head", m.shared_critic)
    if had_head != m.shared_critic:  # the actor's weights differ by the head: say so before DeepSpeed fails
        raise HandoffError(
            f"{states[-1][1]} was saved by a run {'with' if had_head else 'without'} a shared value head "
            f"(ppo.critic_trunk=shared), and this recipe's actor has {'none' if had_head else 'one'}; resume "
            "with the recipe that made it, or start over with resume=never (or another output_dir)"
        )
    frozen_dtype_matches(states[-1][1], m, "resume with the same model.autocast, or start over with resume=never")
    saved = load_state(states[-1][1], m.actor, m.critic)
    state.start_step, state.bad_steps = saved["step"], saved["bad_steps"]
    state.kl_ctl.load_state_dict(saved["kl_controller"])
    state.running.load_state_dict(saved["reward_normaliser"])
    if code is not None:
        code.load_state_dict(saved.get("reward_function_normalisers", []))
    log.info("resumed PPO from %s (step %d)", states[-1][1], state.start_step)
    return state


def normaliser(recipe: PPORecipe, data: Data, state: RunState) -> tuple[float, float]:
    """(mean, std) that raw reward-model scores are normalised with at this step."""
    mode = recipe.ppo.reward_normalization
    if recipe.reward_dir is None:  # no reward model; each reward function has its own normaliser
        return 0.0, 1.0
    if mode == "manifest":
        return data.reward_stats["mean"], data.reward_stats["std"]
    if mode == "running":
        return state.running.mean, state.running.std
    return 0.0, 1.0


def train_step(
    recipe: PPORecipe,
    m: engines.Models,
    data: Data,
    state: RunState,
    step: int,
    checkpoints: Path,
    marks: common.MemoryMarks | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Steps 4-6 of one PPO step; returns the rollout and the metrics, averaged over ranks. Each
    phase's time also marks memory in `marks` (generation, scoring, training)."""
    times = common.MarkedTimes(marks)
    batch = rollout_prompts(data.prompts.train, step, recipe)
    ro = make_rollout(
        m,
        recipe,
        [r["messages"] for r in batch],
        normaliser(recipe, data, state),
        state.kl_ctl.value,
        times,
        code=state.code,
        fields=[r["fields"] for r in batch],
    )
    t0 = time.perf_counter()
    if distributed.reduce_floats([float(not is_finite(ro))], "max")[0] > 0:
        _count_bad_step(recipe, state, step, checkpoints)
        return ro, {"skipped_step": 1.0, **{f"time/{k}": v for k, v in times.items()}}
    state.bad_steps = 0
    ptx_source = (
        partial(stream_batch, data.ptx, batch=recipe.train.micro_batch_size, seed=recipe.train.seed + 1)
        if data.ptx
        else None
    )
    update = ppo_update(m, recipe, ro, step, ptx_source, kl_coef=state.kl_ctl.value)
    times["training"] = time.perf_counter() - t0
    if update["kl_rollback"]:
        log.warning(
            "step %d: an update moved the policy past ppo.max_minibatch_kl=%g from its rollouts and "
            "was taken back (kl_rollback). If this repeats, lower train.learning_rate",
            step,
            recipe.ppo.max_minibatch_kl,
        )
    local = {**rollout_metrics(ro, state.kl_ctl.value, with_critic=m.has_values), **update}
    metrics = _reduced_metrics(ro, local)
    # 6. Statistics from every rank: the normaliser sees all ranks' scores, the controller the mean KL.
    if recipe.ppo.reward_normalization == "running":
        everyone = distributed.gather_over_ranks(ro.raw_scores)
        state.running.update(everyone[torch.isfinite(everyone)])
    state.kl_ctl.update(metrics["kl"], recipe.ppo.rollout_batch_size * distributed.world_size())
    metrics.update(_rank_spread(state))
    metrics.update({f"time/{k}": v for k, v in times.items()})
    return ro, metrics


def _count_bad_step(recipe: PPORecipe, state: RunState, step: int, checkpoints: Path) -> None:
    """A rollout with NaN/inf (on any rank) skips its update; ppo.max_bad_steps in a row abort the run."""
    state.bad_steps += 1
    log.warning(
        "step %d: non-finite rewards/log-probs/values (or no row with a usable reward); update skipped (%d in a row)",
        step,
        state.bad_steps,
    )
    if state.bad_steps >= recipe.ppo.max_bad_steps:
        raise PPOAborted(
            f"{state.bad_steps} consecutive PPO steps had NaN/inf in rewards, log-probs or values "
            f"(ppo.max_bad_steps={recipe.ppo.max_bad_steps}); last good state is in {checkpoints}"
        )


def _reduced_metrics(ro: Rollout, local: dict[str, float]) -> dict[str, float]:
    """This rank's step metrics -> the means over ranks, except the counts, which add up, and `kl`,
    which is the mean over every kept response of every rank (a mean of per-rank means would weigh
    ranks that dropped rows wrongly)."""
    keys = sorted(local)
    metrics = dict(zip(keys, distributed.reduce_floats([local[k] for k in keys])))
    mask = ro.response_mask.float()
    kept = mask.sum(1) > 0
    counts = {k: local[k] for k in ("dropped_rows", "reward_function_failures") if k in local}
    totals = distributed.reduce_floats([float((ro.kl * mask).sum()), float(kept.sum()), *counts.values()], "sum")
    metrics["kl"] = totals[0] / max(totals[1], 1.0)
    metrics.update(zip(counts, totals[2:]))
    return metrics


def _rank_spread(state: RunState) -> dict[str, float]:
    """Max - min over ranks of the values every rank must agree on (0 when they do); 2+ processes only."""
    if distributed.world_size() < 2:
        return {}
    values = [state.kl_ctl.value, state.running.mean, state.running.std, float(state.running.count)]
    names = ["kl_coef", "reward_norm_mean", "reward_norm_std", "reward_norm_count"]
    for j, moments in enumerate(state.code.moments if state.code else []):
        values += [moments.mean, moments.std]
        names += [f"reward_fn_norm_mean_{j}", f"reward_fn_norm_std_{j}"]
    hi, lo = distributed.reduce_floats(values, "max"), distributed.reduce_floats(values, "min")
    return {f"rank_spread/{n}": high - low for n, high, low in zip(names, hi, lo)}


def log_step(
    tracker: Tracker, recipe: PPORecipe, tokenizer, ro: Rollout, metrics: dict, step: int, elapsed: float
) -> None:
    """Step 7: metrics with throughput, and a table of samples every `sample_every` steps."""
    tokens = int(ro.response_mask.sum()) * distributed.world_size()
    metrics.update({"time/step": elapsed, "tokens_per_second": tokens / elapsed})
    tracker.log(metrics, step + 1)
    if recipe.sample_every and (step + 1) % recipe.sample_every == 0:
        P = ro.prompt_width
        rows = [
            [
                tokenizer.decode(ro.input_ids[i, :P], skip_special_tokens=True),
                tokenizer.decode(ro.input_ids[i, P:][ro.response_mask[i].bool()], skip_special_tokens=True),
                ro.raw_scores[i].item(),
            ]
            for i in range(min(8, ro.input_ids.shape[0]))
        ]
        tracker.table("samples", ["prompt", "response", "reward"], rows, step + 1)


def export(
    recipe: PPORecipe,
    m: engines.Models,
    dirs: common.StageDirs,
    data: Data,
    metrics: dict,
    seconds: float,
    marks: common.MemoryMarks,
) -> None:
    """Step 9 (collective): the policy (ZeRO-3 shards gathered), the tokenizer, then the manifest last."""
    peft_info = engines.export_policy(m.actor, recipe, dirs.out)
    if distributed.is_main():
        m.tokenizer.save_pretrained(dirs.out)
        marks.mark("export")
        final = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        write_manifest(
            dirs.out,
            stage="ppo",
            recipe=to_dict(recipe),
            started_at=dirs.started_at,
            parents=[
                parent_ref(d)
                for d in (recipe.sft_dir, recipe.reward_dir, recipe.continue_from and recipe.continue_from.path)
                if d is not None
            ],
            datasets={"prompts": data.prompts.report()},
            metrics={
                **final,
                "steps": recipe.train.max_steps,
                "train_seconds": seconds,
                "bf16_autocast": m.autocast,  # what model.autocast (auto: by the hardware) chose
                "attention": autocast.attention_of(m.actor.module),  # what attn_implementation (auto) chose
                "frozen_weights_bf16": m.frozen_bf16,  # stored as autocast casts them (bit-identical compute)
                **common.peak_memory(m.device),
                # the main rank's memory at this process's named points (its first step's phases; under
                # ZeRO-3 the export's gather lands on this rank): see common.MemoryMarks
                "memory_marks": marks.marks,
            },
            world_size=distributed.world_size(),
            peft=peft_info,
        )
        log.info("PPO done: %d steps -> %s", recipe.train.max_steps, dirs.out)
    distributed.barrier()


def run_ppo(recipe: PPORecipe, on_step_end: Callable[[int, dict], bool] | None = None) -> Path:
    """Run PPO and export the policy; returns `<output_dir>/ppo`. `on_step_end(step, metrics)`
    returning True stops the run after that step's save (used to test resume)."""
    # 1-3. Hand-off checks and data before any model is loaded; models; resume.
    dirs = common.start_stage(recipe.output_dir, "ppo", recipe.demo_assets)
    tokenizer, reward_manifest = check_handoff(recipe)
    data = prepare_data(recipe, tokenizer, reward_manifest)
    code = CodeRewards.start(recipe)  # imports the reward functions now: a typo fails before models load
    try:
        return _train(recipe, dirs, tokenizer, data, code, on_step_end)
    finally:
        if code is not None:
            code.close()


def _train(
    recipe: PPORecipe,
    dirs: common.StageDirs,
    tokenizer,
    data: Data,
    code: CodeRewards | None,
    on_step_end: Callable[[int, dict], bool] | None,
) -> Path:
    torch.manual_seed(recipe.train.seed)
    marks = common.MemoryMarks(engines.device_of_rank())
    marks.mark("start")  # the runtime, the libraries and the prompts, before any model
    m = engines.build_models(recipe, tokenizer)
    state = resume(recipe, m, dirs.checkpoints, code)
    marks.mark("models")
    for name in (METRICS_FILE, "samples.jsonl"):
        truncate_after(dirs.out / name, state.start_step)
    tracker = Tracker(recipe.tracking, dirs.run, "ppo", dirs.out, to_dict(recipe))
    from tqdm.auto import tqdm

    bar = tqdm(
        range(state.start_step, recipe.train.max_steps),
        initial=state.start_step,
        total=recipe.train.max_steps,
        desc="PPO",
        disable=not distributed.is_main(),
    )
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for step in bar:
        t_step = time.perf_counter()
        ro, metrics = train_step(recipe, m, data, state, step, dirs.checkpoints, marks)  # 4-6
        log_step(tracker, recipe, tokenizer, ro, metrics, step, time.perf_counter() - t_step)  # 7
        bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}", kl=f"{metrics.get('kl', 0):.3f}")
        # 8. Save the full state every train.save_steps and at the end.
        stop = bool(on_step_end and on_step_end(step + 1, metrics))
        if (step + 1) % recipe.train.save_steps == 0 or step + 1 == recipe.train.max_steps or stop:
            saved = {**state.saved(), "value_head": m.shared_critic, "frozen_bf16": m.frozen_bf16}
            save_state(dirs.checkpoints, step + 1, m.actor, m.critic, saved, recipe.keep_checkpoints)
            marks.mark("checkpoint")
        if stop:
            tracker.finish()
            return dirs.out
    marks.mark("last_step")
    export(recipe, m, dirs, data, metrics, time.perf_counter() - started, marks)  # 9
    tracker.finish()
    return dirs.out
