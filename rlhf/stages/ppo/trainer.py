"""Stage 3: PPO on DeepSpeed engines. Ours, because TRL removed its PPO trainer.

The loop reads top to bottom: build everything (hand-off checks first), then per step
(1) sample prompts, (2) generate, (3) score with actor / reference / critic / reward model,
(4) rewards and advantages, (5) PPO epochs over mini-batches, (6) log, (7) save; finally export.
All decisions that change control flow (skip, stop early) are all-reduced so ranks never diverge.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf import distributed
from rlhf.checkpoint import HandoffError, parent_ref, read_manifest, write_manifest
from rlhf.config import PPORecipe, to_dict
from rlhf.data.formats import Messages, normalize_prompt, normalize_sft
from rlhf.data.prepare import prepare_splits
from rlhf.models import check_tokenizers_match, load_tokenizer
from rlhf.scoring import score_sequences
from rlhf.stages import common
from rlhf.stages.ppo import engines, losses
from rlhf.stages.ppo.rollout import (Rollout, advantages_and_returns, encode_prompts, generate, left_pad,
                                     policy_outputs, positions, response_mask_of, shape_scores)
from rlhf.stages.ppo.state import complete_states, load_state, save_state
from rlhf.tracking import METRICS_FILE, Tracker, truncate_after

log = logging.getLogger("rlhf")


class PPOAborted(RuntimeError):
    """Too many consecutive steps with non-finite rewards, log-probs or losses."""


@dataclass
class Models:
    actor: object  # DeepSpeed training engine (causal LM)
    critic: object  # DeepSpeed training engine (TokenValues)
    reference: torch.nn.Module | None  # frozen SFT policy; None under LoRA (the adapter-disabled actor)
    reward: torch.nn.Module  # frozen reward model
    tokenizer: object
    device: torch.device


def check_handoff(recipe: PPORecipe):
    """Before any compute: both parents are finished outputs of the right stage, same tokenizer."""
    read_manifest(recipe.sft_dir, expect_stage="sft", needed_by="the PPO stage")
    reward_manifest = read_manifest(recipe.reward_dir, expect_stage="reward", needed_by="the PPO stage")
    tok = load_tokenizer(recipe.sft_dir, needs_chat_template=False)
    check_tokenizers_match(tok, f"actor/reference ({recipe.sft_dir})", load_tokenizer(recipe.reward_dir),
                           f"reward model ({recipe.reward_dir})")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(recipe.reward_dir)
    if getattr(cfg, "num_labels", None) != 1 or not any(a.endswith("ForSequenceClassification")
                                                        for a in cfg.architectures or []):
        raise HandoffError(f"{recipe.reward_dir} is not a scalar-head reward model "
                           f"(architectures={cfg.architectures}, num_labels={getattr(cfg, 'num_labels', None)})")
    return tok, reward_manifest


def build_models(recipe: PPORecipe, tokenizer) -> Models:
    import deepspeed

    distributed.ensure_process_group_env()
    deepspeed.init_distributed(dist_backend=None)
    device = torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pad = tokenizer.pad_token_id
    critic_src = recipe.reward_dir if recipe.ppo.critic_init == "reward" else recipe.sft_dir
    policy = engines.with_lora(engines.load_policy(recipe.sft_dir, recipe), recipe, "CAUSAL_LM")
    actor = engines.training_engine(policy, recipe, recipe.train.learning_rate)
    scorer = engines.with_lora(engines.load_scorer(critic_src, recipe, pad), recipe, "SEQ_CLS")
    critic = engines.training_engine(engines.TokenValues(scorer), recipe, recipe.ppo.critic_learning_rate)
    # With LoRA the reference is the actor with its adapter disabled: no second copy of the policy.
    reference = None if recipe.peft.enabled else engines.inference_model(
        engines.load_policy(recipe.sft_dir, recipe), recipe, device)
    reward = engines.inference_model(engines.load_scorer(recipe.reward_dir, recipe, pad), recipe, device)
    return Models(actor, critic, reference, reward, tokenizer, device)


def stream_batch(rows: list, step: int, batch: int, seed: int) -> list:
    """Rows for (step, this rank): a slice of an endless stream of seeded permutations of `rows`.
    A pure function of the step, so resuming needs no saved data position."""
    n, world, rank = len(rows), distributed.world_size(), distributed.rank()
    out = []
    for j in range(batch):
        g = (step * world + rank) * batch + j
        epoch, i = divmod(g, n)
        perm = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        out.append(rows[perm[i]])
    return out


def _all_reduce(values: list[float], op: str = "mean") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and distributed.world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= distributed.world_size()
    return t.tolist()


@torch.no_grad()
def make_rollout(m: Models, recipe: PPORecipe, prompts: list[list[int]], norm: tuple[float, float],
                 kl_coef: float, times: dict) -> Rollout:
    """Steps 2-4: generate, score with all four models, compute rewards and advantages."""
    tok, gen, ppo, dev = m.tokenizer, recipe.generation, recipe.ppo, m.device
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    t0 = time.perf_counter()
    with engines.gathered(m.actor, recipe.deepspeed.zero_stage, gen.gather_weights):
        m.actor.module.eval()
        response = generate(m.actor.module, prompt_ids.to(dev), prompt_mask.to(dev), gen, tok.eos_token_id,
                            tok.pad_token_id).cpu()
    times["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resp_mask = response_mask_of(response, tok.eos_token_id)
    has_eos = (response == tok.eos_token_id).any(dim=1)
    ids = torch.cat([prompt_ids, response], dim=1)
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    pos = positions(attn)
    on = [x.to(dev) for x in (ids, attn, pos, response)]
    logp, entropy = policy_outputs(m.actor.module, *on, gen.temperature, with_entropy=True)
    with engines.as_reference(m.actor.module, m.reference) as reference:
        ref_logp, _ = policy_outputs(reference, *on, gen.temperature)
    m.critic.module.eval()
    P = prompt_ids.shape[1]
    values = m.critic.module(on[0], on[1], on[2])[:, P - 1:-1]
    seqs = [p + r[: int(k)].tolist() for p, r, k in zip(prompts, response, resp_mask.sum(1))]
    raw = score_sequences(m.reward, seqs, tok.pad_token_id, dev, batch_size=recipe.train.micro_batch_size * 2)
    times["scoring"] = time.perf_counter() - t0
    logp, ref_logp, entropy, values = (x.float().cpu() for x in (logp, ref_logp, entropy, values))
    scores = shape_scores(raw, has_eos, ppo, *norm)
    kl = losses.kl_penalty(logp, ref_logp, ppo.kl_estimator) * resp_mask
    rewards = losses.token_rewards(scores, kl, resp_mask.float(), kl_coef)
    adv, ret = advantages_and_returns(values, rewards, resp_mask, ppo)
    return Rollout(ids, attn, pos, resp_mask, logp, ref_logp, values, entropy, raw, scores, has_eos, kl, rewards,
                   adv, ret)


def ptx_batch(tokenizer, rows: list[Messages], device) -> dict[str, torch.Tensor]:
    """SFT examples -> right-padded ids, mask and labels on the assistant reply only."""
    from rlhf.stages.reward import encode

    ids, labels = [], []
    for msgs in rows:
        full = encode(tokenizer, msgs)
        prompt_len = len(encode_prompts(tokenizer, [msgs[:-1]])[0]) if len(msgs) > 1 else 0
        ids.append(full)
        labels.append([-100] * prompt_len + full[prompt_len:])
    width = max(map(len, ids))
    out = {"input_ids": torch.full((len(ids), width), tokenizer.pad_token_id),
           "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
           "labels": torch.full((len(ids), width), -100)}
    for i, (x, y) in enumerate(zip(ids, labels)):
        out["input_ids"][i, : len(x)], out["attention_mask"][i, : len(x)] = torch.tensor(x), 1
        out["labels"][i, : len(y)] = torch.tensor(y)
    return {k: v.to(device) for k, v in out.items()}


def ppo_update(m: Models, recipe: PPORecipe, ro: Rollout, step: int, ptx_rows: list | None) -> dict[str, float]:
    """Step 5: PPO epochs of clipped policy and value updates over shuffled micro-batches."""
    ppo, micro, dev = recipe.ppo, recipe.train.micro_batch_size, m.device
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl",
                                                     "value_clip_fraction", "ratio_mean", "ptx_loss")}
    skipped, epochs_run = 0, 0
    m.actor.module.train(), m.critic.module.train()
    gen = torch.Generator().manual_seed(recipe.train.seed * 7919 + step)
    for epoch in range(ppo.ppo_epochs):
        order = torch.randperm(ro.input_ids.shape[0], generator=gen)
        epoch_kl = []
        for k, start in enumerate(range(0, len(order), micro)):
            mb = ro.select(order[start:start + micro])
            on = [x.to(dev) for x in (mb.input_ids, mb.attention_mask, mb.position_ids, mb.input_ids[:, mb.prompt_width:])]
            mask = mb.response_mask.float().to(dev)
            logp, ent = policy_outputs(m.actor, *on, recipe.generation.temperature, with_entropy=ppo.entropy_coef > 0)
            pl = losses.policy_loss(logp, mb.logprobs.to(dev), mb.advantages.to(dev), mask, ppo.clip_ratio)
            loss = pl.loss - (ppo.entropy_coef * losses.masked_mean(ent, mask) if ent is not None else 0.0)
            if ptx_rows:
                batch = ptx_batch(m.tokenizer, stream_batch(ptx_rows, step * 1000 + epoch * 100 + k, micro,
                                                            recipe.train.seed + 1), dev)
                ptx = m.actor(**batch, use_cache=False).loss
                loss = loss + ppo.ptx_coef * ptx
                stats["ptx_loss"].append(ptx.item())
            values = m.critic(on[0], on[1], on[2])[:, mb.prompt_width - 1:-1]
            vl, vclip = losses.value_loss(values, mb.values.to(dev), mb.returns.to(dev), mask, ppo.value_clip)
            # Guard: a non-finite loss or an exploding ratio on any rank skips this micro-batch on all
            # ranks (skipping alone would leave the others waiting in the gradient all-reduce).
            bad = not (torch.isfinite(loss) and torch.isfinite(vl)) or pl.ratio_mean.item() > ppo.ratio_threshold
            if _all_reduce([float(bad)], "max")[0] > 0:
                skipped += 1
                continue
            m.actor.backward(loss)
            m.actor.step()
            m.critic.backward(vl)
            m.critic.step()
            for key, val in (("policy_loss", pl.loss), ("value_loss", vl), ("clip_fraction", pl.clip_fraction),
                             ("approx_kl", pl.approx_kl), ("value_clip_fraction", vclip), ("ratio_mean", pl.ratio_mean)):
                stats[key].append(float(val.detach()) if torch.is_tensor(val) else float(val))
            epoch_kl.append(pl.approx_kl.item())
        epochs_run = epoch + 1
        mean_kl = _all_reduce([sum(epoch_kl) / max(len(epoch_kl), 1)])[0]
        if ppo.target_approx_kl is not None and mean_kl > ppo.target_approx_kl:
            break
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    out.update({"skipped_minibatches": skipped, "ppo_epochs_run": epochs_run})
    return out


def rollout_metrics(ro: Rollout, kl_coef: float) -> dict[str, float]:
    mask = ro.response_mask.float()
    lengths = mask.sum(1)
    return {
        "reward_mean": ro.raw_scores.mean().item(), "reward_std": ro.raw_scores.std().item(),
        "score_mean": ro.scores.mean().item(), "kl": (ro.kl * mask).sum(1).mean().item(),
        "entropy": losses.masked_mean(ro.entropy, mask).item(), "response_length": lengths.mean().item(),
        "eos_rate": ro.has_eos.float().mean().item(), "kl_coef": kl_coef,
        "explained_variance": losses.explained_variance(ro.values, ro.returns, mask).item(),
        "advantage_mean": losses.masked_mean(ro.advantages, mask).item(),
    }


def _finite(ro: Rollout) -> bool:
    return all(torch.isfinite(t).all() for t in (ro.raw_scores, ro.logprobs, ro.ref_logprobs, ro.values))


def run_ppo(recipe: PPORecipe, on_step_end: Callable[[int, dict], bool] | None = None) -> Path:
    """Run PPO and export the policy; returns `<output_dir>/ppo`. `on_step_end(step, metrics)`
    returning True stops the run after that step's save (used to test resume)."""
    # Build: hand-off checks and data before any model is loaded.
    dirs = common.start_stage(recipe.output_dir, "ppo", recipe.demo_assets)
    tokenizer, reward_manifest = check_handoff(recipe)
    prompt_splits = prepare_splits(recipe.prompts, normalize_prompt,
                                   lambda msgs: len(encode_prompts(tokenizer, [msgs])[0]))
    prompts = encode_prompts(tokenizer, prompt_splits.train)
    ptx_rows = prepare_splits(recipe.ptx_data, normalize_sft).train if recipe.ptx_data and recipe.ppo.ptx_coef else None
    stats = reward_manifest.get("reward_stats") or {}
    if recipe.ppo.reward_normalization == "manifest" and not stats:
        raise HandoffError(f"{recipe.reward_dir} manifest has no reward_stats; use ppo.reward_normalization=running")
    torch.manual_seed(recipe.train.seed)
    m = build_models(recipe, tokenizer)
    kl_ctl = losses.KLController(recipe.ppo.kl_coef, recipe.ppo.kl_target, recipe.ppo.kl_horizon)
    running = losses.RunningMoments()
    start_step, bad_steps = 0, 0
    states = complete_states(dirs.checkpoints)
    if recipe.resume == "auto" and states:
        saved = load_state(states[-1][1], m.actor, m.critic)
        start_step, bad_steps = saved["step"], saved["bad_steps"]
        kl_ctl.load_state_dict(saved["kl_controller"]), running.load_state_dict(saved["reward_normaliser"])
        log.info("resumed PPO from %s (step %d)", states[-1][1], start_step)
    for name in (METRICS_FILE, "samples.jsonl"):
        truncate_after(dirs.out / name, start_step)
    tracker = Tracker(recipe.tracking, dirs.run, "ppo", dirs.out, to_dict(recipe))
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, recipe.train.max_steps), initial=start_step, total=recipe.train.max_steps,
               desc="PPO", disable=not distributed.is_main())
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for step in bar:
        t_step, times = time.perf_counter(), {}
        # 1-4. Prompts, rollout, scoring, rewards and advantages.
        batch = stream_batch(prompts, step, recipe.ppo.rollout_batch_size, recipe.train.seed)
        norm = ((stats["mean"], stats["std"]) if recipe.ppo.reward_normalization == "manifest" else
                (running.mean, running.std) if recipe.ppo.reward_normalization == "running" else (0.0, 1.0))
        ro = make_rollout(m, recipe, batch, norm, kl_ctl.value, times)
        # 5. Update, unless any rank saw non-finite numbers (then every rank skips the step).
        t0 = time.perf_counter()
        if _all_reduce([float(not _finite(ro))], "max")[0] > 0:
            bad_steps += 1
            metrics = {"skipped_step": 1.0}
            log.warning("step %d: non-finite rewards/log-probs/values; update skipped (%d in a row)", step, bad_steps)
            if bad_steps >= recipe.ppo.max_bad_steps:
                raise PPOAborted(f"{bad_steps} consecutive PPO steps had NaN/inf in rewards, log-probs or values "
                                 f"(ppo.max_bad_steps={recipe.ppo.max_bad_steps}); last good state is in "
                                 f"{dirs.checkpoints}")
        else:
            bad_steps = 0
            if recipe.ppo.reward_normalization == "running":
                running.update(ro.raw_scores)
            update = ppo_update(m, recipe, ro, step, ptx_rows)
            times["training"] = time.perf_counter() - t0
            metrics = {**rollout_metrics(ro, kl_ctl.value), **update}
            kl_ctl.update(metrics["kl"], recipe.ppo.rollout_batch_size * distributed.world_size())
        # 6. Log: rank-averaged metrics, phase times, throughput, sample table.
        keys = sorted(metrics)
        metrics = dict(zip(keys, _all_reduce([metrics[k] for k in keys])))
        elapsed = time.perf_counter() - t_step
        tokens = int(ro.response_mask.sum()) * distributed.world_size()
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics.update({"time/step": elapsed, "tokens_per_second": tokens / elapsed})
        tracker.log(metrics, step + 1)
        bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}", kl=f"{metrics.get('kl', 0):.3f}")
        if recipe.sample_every and (step + 1) % recipe.sample_every == 0:
            rows = [[tokenizer.decode(ro.input_ids[i, : ro.prompt_width], skip_special_tokens=True),
                     tokenizer.decode(ro.input_ids[i, ro.prompt_width:][ro.response_mask[i].bool()],
                                      skip_special_tokens=True), ro.raw_scores[i].item()] for i in range(min(8, len(batch)))]
            tracker.table("samples", ["prompt", "response", "reward"], rows, step + 1)
        # 7. Save the full state every train.save_steps and at the end.
        stop = bool(on_step_end and on_step_end(step + 1, metrics))
        if (step + 1) % recipe.train.save_steps == 0 or step + 1 == recipe.train.max_steps or stop:
            save_state(dirs.checkpoints, step + 1, m.actor, m.critic,
                       {"bad_steps": bad_steps, "kl_controller": kl_ctl.state_dict(),
                        "reward_normaliser": running.state_dict()}, recipe.keep_checkpoints)
        if stop:
            tracker.finish()
            return dirs.out

    # Export the policy (ZeRO-3 shards gathered), then the manifest last.
    peft_info = engines.export_policy(m.actor, recipe, dirs.out)
    if distributed.is_main():
        tokenizer.save_pretrained(dirs.out)
        final = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        write_manifest(dirs.out, stage="ppo", recipe=to_dict(recipe), started_at=dirs.started_at,
                       parents=[parent_ref(recipe.sft_dir), parent_ref(recipe.reward_dir)],
                       datasets={"prompts": prompt_splits.report()}, metrics={**final, "steps": recipe.train.max_steps,
                                                                               "train_seconds": time.perf_counter() - started},
                       world_size=distributed.world_size(), peft=peft_info)
        log.info("PPO done: %d steps -> %s", recipe.train.max_steps, dirs.out)
    distributed.barrier()
    tracker.finish()
    return dirs.out
