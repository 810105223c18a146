"""Advantage estimators: how PPO and its critic-free relatives turn rewards into advantages.

PPO, GRPO, Dr. GRPO, RLOO and REINFORCE++ share the rollout, the clipped update, resume, guards
and hand-off; they differ only in how advantages are formed, where the KL penalty goes and how the
token losses are averaged. Each estimator here is a pure function of tensors, chosen by name from
`ESTIMATORS` (a plain dict, no subclassing), and tested against numbers worked out by hand.

Shapes: B rollouts on this rank, R response tokens. Grouped estimators see the batch as B / k
consecutive groups of k responses to the same prompt (`group_size` k); a group never spans ranks,
so group statistics are exact on any number of processes. Batch whitening sums over ranks through
`all_reduce`, so 2 processes whiten exactly as 1 process on the same global batch.

A response whose mask is all zero (a row the guards dropped, e.g. its reward function failed) is
not a member of its group: it neither counts in the group's statistics nor gets an advantage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from rlhf.stages.ppo import losses

AllReduce = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class AdvantageInputs:
    """Everything an estimator may read; B rollouts, R response tokens."""

    scores: torch.Tensor  # (B,) final sequence scores (normalised, eos-penalised, clipped)
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference, 0 off the mask
    mask: torch.Tensor  # (B, R) float, 1 on counted response tokens
    values: torch.Tensor | None  # (B, R) critic values (estimators that need a critic only)
    kl_coef: float  # weight of the KL penalty when it is folded into the reward
    group_size: int = 1  # k: rows [i*k, (i+1)*k) answer the same prompt
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True  # GAE only: whiten over the global batch
    all_reduce: AllReduce = None  # sums a tensor over ranks; None on one process


@dataclass
class Estimator:
    """One method's choices; the function returns (advantages, returns-or-None), (B, R) each."""

    fn: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]
    needs_critic: bool
    needs_groups: bool  # rollouts_per_prompt must be >= 2
    kl_in: Literal["reward", "loss"]  # KL folded into the reward, or k3 KL added to the policy loss
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"]  # see `losses.aggregate`
    sequence_level: bool = False  # one advantage per response (what GSPO's sequence ratio needs)


def _members(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, R) mask -> (B/k, k) float: 1 for a response that counts in its group."""
    return (mask.sum(1) > 0).float().view(-1, k)


def _grouped(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as (B/k, k) with non-members set to 0 (a dropped row may hold NaN, and NaN x 0 is
    NaN), and the (B/k, k) membership."""
    m = _members(mask, k)
    return torch.where(m > 0, scores.view(-1, k), torch.zeros_like(m, dtype=scores.dtype)), m


def group_mean_std(scores: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and unbiased std of scores over its members; (B,) -> (B,), (B,) broadcast back
    to every row of the group. A group with one member has std 0."""
    s, m = _grouped(scores, mask, k)
    n = m.sum(1, keepdim=True)
    mean = (s * m).sum(1, keepdim=True) / n.clamp(min=1)
    var = ((s - mean) ** 2 * m).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return mean.expand(-1, k).reshape(-1), var.sqrt().expand(-1, k).reshape(-1)


def leave_one_out_baseline(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the *other* members' scores for each response (Kool et al. 2019; Ahmadian et al. 2024);
    (B,) -> (B,). A response without other members gets its own score (advantage 0)."""
    s, m = _grouped(scores, mask, k)
    total, n = (s * m).sum(1, keepdim=True), m.sum(1, keepdim=True)
    others = n - m
    baseline = torch.where(others > 0, (total - s * m) / others.clamp(min=1), s)
    return baseline.reshape(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{u >= t} gamma^(u - t) r_u within each response; (B, R) -> (B, R), 0 off the mask."""
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def _per_token(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) on every counted token: (B, R); 0 on dropped rows."""
    kept = mask.sum(1) > 0
    return torch.where(kept, seq_adv, torch.zeros_like(seq_adv))[:, None] * mask


def _sequence_reward(x: AdvantageInputs) -> torch.Tensor:
    """score - kl_coef x sum_t KL_t per response (B,): the KL folded into a sequence-level reward.
    kl_coef is 0 when the recipe puts the KL in the loss instead."""
    return x.scores - x.kl_coef * (x.kl * x.mask).sum(1)


def gae(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO (Ouyang et al. 2022): dense rewards (-kl_coef * KL per token, score on the last), GAE
    against the critic, optionally whitened over the global batch."""
    rewards = losses.token_rewards(x.scores, x.kl, x.mask, x.kl_coef)
    adv, ret = losses.gae(rewards, x.values, x.mask, x.gamma, x.lam)
    if x.whiten:
        adv = losses.masked_whiten(adv, x.mask, all_reduce=x.all_reduce)
    return adv, ret


def grpo(x: AdvantageInputs, eps: float = 1e-4) -> tuple[torch.Tensor, None]:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean(group)) / (std(group) + eps) on every token of
    response i. The KL penalty is a k3 term of the loss (or, with kl_in=reward, r_i = score_i -
    kl_coef x sum_t KL_t)."""
    r = _sequence_reward(x)
    mean, std = group_mean_std(r, x.mask, x.group_size)
    return _per_token((r - mean) / (std + eps), x.mask), None


def dr_grpo(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): A_i = r_i - mean(group),
    without the division by the group std (which up-weights too easy and too hard prompts); its
    loss also drops the per-response length normalisation (aggregation 'constant')."""
    r = _sequence_reward(x)
    mean, _ = group_mean_std(r, x.mask, x.group_size)
    return _per_token(r - mean, x.mask), None


def rloo(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """RLOO (Ahmadian et al. 2024): sequence reward r_i = score_i - kl_coef * sum_t KL_t, advantage
    r_i minus the mean of the other k - 1 rewards of its group, on every token."""
    r = _sequence_reward(x)
    return _per_token(r - leave_one_out_baseline(r, x.mask, x.group_size), x.mask), None


def reinforce_pp(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): KL folded into dense token rewards as in PPO, returns-to-go as the
    advantage (no critic, no group), whitened over the global batch."""
    rewards = losses.token_rewards(x.scores, x.kl, x.mask, x.kl_coef)
    return losses.masked_whiten(returns_to_go(rewards, x.mask, x.gamma), x.mask, all_reduce=x.all_reduce), None


def reinforce_pp_baseline(x: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """REINFORCE++-baseline: each score minus its group's mean first, then as `reinforce_pp`."""
    mean, _ = group_mean_std(x.scores, x.mask, x.group_size)
    rewards = losses.token_rewards(x.scores - mean, x.kl, x.mask, x.kl_coef)
    return losses.masked_whiten(returns_to_go(rewards, x.mask, x.gamma), x.mask, all_reduce=x.all_reduce), None


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae, needs_critic=True, needs_groups=False, kl_in="reward", loss_aggregation="token_mean"),
    "grpo": Estimator(
        grpo, needs_critic=False, needs_groups=True, kl_in="loss", loss_aggregation="sequence_mean", sequence_level=True
    ),
    "dr_grpo": Estimator(
        dr_grpo, needs_critic=False, needs_groups=True, kl_in="loss", loss_aggregation="constant", sequence_level=True
    ),
    "rloo": Estimator(
        rloo, needs_critic=False, needs_groups=True, kl_in="reward", loss_aggregation="token_mean", sequence_level=True
    ),
    "reinforce_pp": Estimator(
        reinforce_pp, needs_critic=False, needs_groups=False, kl_in="reward", loss_aggregation="token_mean"
    ),
    "reinforce_pp_baseline": Estimator(
        reinforce_pp_baseline, needs_critic=False, needs_groups=True, kl_in="reward", loss_aggregation="token_mean"
    ),
}
"""The estimators by the name a recipe gives in `ppo.advantage_estimator`."""
