"""The PPO update: epochs of clipped policy and value losses over shuffled mini-batches of a rollout.

Every decision that changes control flow (skip a mini-batch, stop the epochs early) is reduced
over ranks, so no rank waits alone in a gradient all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf import distributed
from rlhf.config_rl import PPORecipe
from rlhf.data.formats import Messages
from rlhf.sampling import policy_outputs, render_for_loss, right_pad
from rlhf.stages.ppo import engines, losses, undo, value_head
from rlhf.stages.ppo.rollout import Rollout

STATS = (
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "approx_kl",
    "value_clip_fraction",
    "ratio_mean",
    "ptx_loss",
    "kl_loss",
)


def ptx_batch(tokenizer, rows: list[Messages], device) -> dict[str, torch.Tensor]:
    """SFT examples -> right-padded ids, mask, and labels on the assistant replies only, rendered
    and masked as in the SFT stage (`rlhf.sampling.render_for_loss`)."""
    ids, labels = [], []
    for msgs in rows:
        full, train_on = render_for_loss(tokenizer, msgs)
        ids.append(full)
        labels.append([t if keep else -100 for t, keep in zip(full, train_on)])
    input_ids, attention_mask = right_pad(ids, tokenizer.pad_token_id)
    label_ids, _ = right_pad(labels, -100)
    return {
        k: v.to(device)
        for k, v in {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}.items()
    }


def ptx_stream_index(step: int, epoch: int, k: int, ppo_epochs: int, minibatches: int) -> int:
    """Position of the (step, epoch, mini-batch) in the endless ptx stream: consecutive integers, so
    no two mini-batches of a run ever share a batch of demonstrations."""
    return (step * ppo_epochs + epoch) * minibatches + k


@dataclass
class MinibatchLosses:
    policy: losses.PolicyLossOut  # clipped surrogate and its diagnostics
    total: torch.Tensor  # scalar actor loss: policy (+ KL loss) - entropy bonus + ptx_coef * ptx
    # (+ value_loss_coef * value under a shared critic trunk)
    value: torch.Tensor | None  # scalar clipped value loss (None without a critic)
    value_clip_fraction: torch.Tensor | None  # share of tokens where the clipped value branch was taken
    ptx: torch.Tensor | None  # scalar SFT loss on demonstrations (PPO-ptx), when mixed in
    max_abs_log_ratio: float  # max |log new/old| over the response tokens


def minibatch_losses(
    m: engines.Models, recipe: PPORecipe, mb: Rollout, ptx_rows: list | None, kl_coef: float = 0.0
) -> MinibatchLosses:
    """Forward the actor (and critic) on one mini-batch and form the losses (Schulman et al. 2017);
    the estimator decides the loss aggregation, the ratio level and whether KL is a loss term."""
    ppo, dev = recipe.ppo, m.device
    on, mask = _inputs(mb, dev)
    sequence = ppo.importance_ratio == "sequence"
    with engines.compute(m):
        shared_values = None
        if m.shared_critic:  # one forward pass gives the log-probs and the values
            logp, ent, shared_values = value_head.outputs_with_values(
                m.actor, *on, recipe.generation.temperature, with_entropy=ppo.entropy_coef > 0
            )
        else:
            logp, ent = policy_outputs(m.actor, *on, recipe.generation.temperature, with_entropy=ppo.entropy_coef > 0)
        pl = losses.policy_loss(
            logp,
            mb.logprobs.to(dev),
            mb.advantages.to(dev),
            mask,
            ppo.sequence_clip_ratio if sequence else ppo.clip_ratio,
            aggregation=ppo.aggregation,
            max_tokens=recipe.generation.max_new_tokens,
            ratio_level=ppo.importance_ratio,
            ref_logprobs=mb.ref_logprobs.to(dev) if ppo.kl_placement == "loss" else None,
            kl_coef=kl_coef if ppo.kl_placement == "loss" else 0.0,
        )
        total = pl.loss - (ppo.entropy_coef * losses.masked_mean(ent, mask) if ent is not None else 0.0)
        ptx = None
        if ptx_rows:
            ptx = m.actor(**ptx_batch(m.tokenizer, ptx_rows, dev), use_cache=False).loss
            total = total + ppo.ptx_coef * ptx
        vl = vclip = None
        if m.has_values:
            values = shared_values
            if values is None:
                values = m.critic(on[0], on[1], on[2])[:, mb.prompt_width - 1 : -1]
            vl, vclip = losses.value_loss(values, mb.values.to(dev), mb.returns.to(dev), mask, ppo.value_clip)
            if m.shared_critic:  # one loss, one backward through the shared trunk
                total = total + ppo.value_loss_coef * vl
    dev_log = (logp.detach() - mb.logprobs.to(dev)).abs() * mask
    return MinibatchLosses(pl, total, vl, vclip, ptx, float(dev_log.max()) if mask.any() else 0.0)


def _approx_kl(m: engines.Models, recipe: PPORecipe, mb: Rollout) -> float:
    """Approx KL (k3, per token) of the actor as it is now to the rollout policy on `mb`: one
    forward pass without gradients, to check the step's last update."""
    on, mask = _inputs(mb, m.device)
    with torch.no_grad(), engines.compute(m):
        logp, _ = policy_outputs(m.actor, *on, recipe.generation.temperature, with_entropy=False)
    log_ratio = (logp.float() - mb.logprobs.to(m.device)) * mask
    return float(losses.approx_kl_of(log_ratio, mask)) if mask.any() else 0.0


def _inputs(mb: Rollout, dev) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A mini-batch's (ids, attention mask, positions, response ids) and its (B, R) float response
    mask, on `dev`: what every forward pass of the update reads."""
    on = [x.to(dev) for x in (mb.input_ids, mb.attention_mask, mb.position_ids, mb.input_ids[:, mb.prompt_width :])]
    return on, mb.response_mask.float().to(dev)


def _verdict(out: MinibatchLosses, ppo) -> str | None:
    """Why this mini-batch must not be applied, or None. Checked before any optimizer step."""
    # KL first: a policy that far from its rollouts (inf or NaN: weights an update broke) ends the
    # step, and may be rolled back; a non-finite loss or a high mean ratio alone skips this mini-batch
    kl = out.policy.approx_kl.item()
    if ppo.max_minibatch_kl is not None and not kl <= ppo.max_minibatch_kl:
        return "kl"
    if not torch.isfinite(out.total) or (out.value is not None and not torch.isfinite(out.value)):
        return "non-finite loss"
    if out.policy.ratio_mean.item() > ppo.ratio_threshold:
        return "ratio"
    return None


def _record(stats: dict[str, list[float]], out: MinibatchLosses) -> None:
    """Append an applied mini-batch's losses and diagnostics to the step's lists (absent ones skipped)."""
    pl = out.policy
    for key, val in (
        ("policy_loss", pl.loss),
        ("value_loss", out.value),
        ("clip_fraction", pl.clip_fraction),
        ("approx_kl", pl.approx_kl),
        ("value_clip_fraction", out.value_clip_fraction),
        ("ratio_mean", pl.ratio_mean),
        ("ptx_loss", out.ptx),
        ("kl_loss", pl.kl_loss),
    ):
        if val is not None:
            stats[key].append(float(val.detach()))


def _apply(m: engines.Models, out: MinibatchLosses) -> None:
    """One optimizer step of the actor (and of a separate critic) on a mini-batch's losses."""
    m.actor.backward(out.total)
    m.actor.step()
    if m.critic is not None:
        m.critic.backward(out.value)
        m.critic.step()


def _take_back(
    m: engines.Models, recipe: PPORecipe, before_last: undo.Snapshot | None, last: Rollout | None, stopped: bool
) -> tuple[float | None, float]:
    """kl_rollback at the end of a step's updates: restore `before_last` (the actor before its
    latest update) if the guard stopped the step, or if one more forward pass of that update's
    mini-batch `last` finds it past max_minibatch_kl. Returns (that pass's KL or None, 1.0 if
    rolled back else 0.0)."""
    if before_last is None:  # no update was applied: nothing to take back
        return None, 0.0
    final_kl, too_far = None, stopped
    if not stopped:
        # Nothing after the last update has looked at it yet: one forward pass does. The decision is
        # reduced as a flag: a max over ranks need not carry one rank's NaN through.
        kl = _approx_kl(m, recipe, last)
        too_far, final_kl = distributed.reduce_floats([float(not kl <= recipe.ppo.max_minibatch_kl), kl], "max")
    if not too_far:
        return final_kl, 0.0
    undo.restore(m.actor, before_last)  # on every rank: they took the same decisions
    return final_kl, 1.0


def ppo_update(
    m: engines.Models,
    recipe: PPORecipe,
    ro: Rollout,
    step: int,
    ptx_source: Callable[[int], list] | None = None,
    kl_coef: float | None = None,
) -> dict[str, float]:
    """PPO epochs of clipped policy (and value) updates over shuffled mini-batches; returns their means.

    `ptx_source(index)` gives the demonstrations of ptx stream position `index` (`ptx_stream_index`).
    `kl_coef` weighs the KL loss term of estimators that put KL in the loss (default ppo.kl_coef).
    Also reports `initial_max_abs_log_ratio`, max |log new/old| on the step's first mini-batch: it
    must be 0 (up to rounding), because nothing has been updated yet when it is computed.

    Guards, decided on every rank together (a rank skipping alone would leave the others waiting
    in the gradient all-reduce): a mini-batch with a non-finite loss or a mean ratio above
    ppo.ratio_threshold is skipped; one whose approx KL to the rollout policy exceeds
    ppo.max_minibatch_kl is skipped and ends the step's updates, because every later mini-batch
    would start from a policy its rollouts no longer describe. With ppo.kl_rollback the update that
    moved it that far is taken back too (`undo`), and the step's last update is checked by one
    more forward pass; the policy is then always left where the guard last saw it in range.
    """
    ppo = recipe.ppo
    kl_coef = ppo.kl_coef if kl_coef is None else kl_coef
    rollback = ppo.rolls_back(recipe.deepspeed.zero_stage)
    progress = _Progress(stats={k: [] for k in STATS})
    m.actor.module.train()
    if m.critic is not None:
        m.critic.module.train()
    gen = torch.Generator().manual_seed(recipe.train.seed * 7919 + step)
    n_mini = -(-ro.input_ids.shape[0] // recipe.train.micro_batch_size)
    epochs_run = 0
    for epoch in range(ppo.ppo_epochs):
        order = torch.randperm(ro.input_ids.shape[0], generator=gen)

        def ptx_rows(k: int, epoch: int = epoch) -> list | None:
            return ptx_source(ptx_stream_index(step, epoch, k, ppo.ppo_epochs, n_mini)) if ptx_source else None

        epoch_kl = _run_epoch(m, recipe, ro, order, progress, ptx_rows, kl_coef, rollback)
        epochs_run = epoch + 1
        if progress.stopped:
            break
        mean_kl = distributed.reduce_floats([sum(epoch_kl) / max(len(epoch_kl), 1)])[0]
        if ppo.target_approx_kl is not None and mean_kl > ppo.target_approx_kl:
            break
    final_kl, rolled_back = (
        _take_back(m, recipe, progress.before_last, progress.last, progress.stopped) if rollback else (None, 0.0)
    )
    return _summary(progress, epochs_run, final_kl, rolled_back)


@dataclass
class _Progress:
    """What a step's updates have done so far: `ppo_update`'s running state across its epochs."""

    stats: dict[str, list[float]]  # per applied mini-batch, by STATS name
    skipped: int = 0  # mini-batches the guards skipped
    stopped: bool = False  # the KL guard ended the step's updates
    tripped: float | None = None  # the approx KL that stopped the step (max over ranks)
    initial: float | None = None  # max |log new/old| on the step's first mini-batch
    before_last: undo.Snapshot | None = None  # the actor before its latest update (kl_rollback)
    last: Rollout | None = None  # that update's mini-batch


def _run_epoch(
    m: engines.Models,
    recipe: PPORecipe,
    ro: Rollout,
    order: torch.Tensor,
    progress: _Progress,
    ptx_rows: Callable[[int], list | None],
    kl_coef: float,
    rollback: bool,
) -> list[float]:
    """One PPO epoch over the mini-batches of `order` (a permutation of the rollout's rows), guards
    first; returns the approx KL of each applied mini-batch. `ptx_rows(k)` gives mini-batch k's
    demonstrations. Sets `progress.stopped` when the KL guard ends the step."""
    micro = recipe.train.micro_batch_size
    epoch_kl = []
    for k, start in enumerate(range(0, len(order), micro)):
        mb = ro.select(order[start : start + micro])
        out = minibatch_losses(m, recipe, mb, ptx_rows(k), kl_coef)
        progress.initial = out.max_abs_log_ratio if progress.initial is None else progress.initial
        verdict = _verdict(out, recipe.ppo)
        kl_now = out.policy.approx_kl.item()
        worst = distributed.reduce_floats([float(verdict is not None), float(verdict == "kl"), kl_now], "max")
        if worst[0] > 0:
            progress.skipped += 1
            if worst[1] > 0:
                progress.stopped, progress.tripped = True, worst[2]
                break
            continue
        # One copy of the actor, reused from step to step
        progress.before_last = undo.take(m.actor, into=progress.before_last) if rollback else None
        _apply(m, out)
        _record(progress.stats, out)
        progress.last = mb
        epoch_kl.append(kl_now)
    return epoch_kl


def _summary(progress: _Progress, epochs_run: int, final_kl: float | None, rolled_back: float) -> dict[str, float]:
    """The step's update statistics: means over the applied mini-batches, and what the guards did."""
    out = {k: sum(v) / len(v) for k, v in progress.stats.items() if v}
    out.update(
        {
            "skipped_minibatches": progress.skipped,
            "ppo_epochs_run": epochs_run,
            "kl_guard_stop": float(progress.stopped),
            "kl_rollback": rolled_back,
            "initial_max_abs_log_ratio": progress.initial or 0.0,
        }
    )
    if final_kl is not None:
        out["final_approx_kl"] = final_kl
    if progress.tripped is not None:
        out["guard_approx_kl"] = progress.tripped
    return out
