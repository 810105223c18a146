"""PPO maths as pure functions of tensors: masked statistics, KL estimators, GAE, clipped losses.

Shapes: B rollouts, T response tokens. `mask` (B, T) is 1 on response tokens that count (up to
and including the first eos) and 0 on padding. Nothing here imports deepspeed or touches a model,
so each function is unit-tested against numbers worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x where mask is 1; (B, T) x (B, T) -> scalar."""
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask; an all-masked input gives 0, not NaN (an empty batch adds no gradient)."""
    n = mask.sum()
    return (x * mask).sum() / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over mask (0 for fewer than two masked elements); -> scalar."""
    n = mask.sum()
    if n < 2:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    mean = masked_mean(x, mask)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the masked elements, (B, T) -> (B, T); masked-out positions become 0.

    With several processes pass `all_reduce` (sums a tensor over ranks): the mean and variance are
    then those of the global batch, so 2 processes whiten exactly as 1 process on the same rows.
    """
    total = all_reduce or (lambda t: t)
    sums = total(torch.stack([(x * mask).sum(), mask.sum()]).double())
    n = sums[1]
    mean = sums[0] / n.clamp(min=1)
    sq = total(((x.double() - mean) ** 2 * mask).sum().reshape(1))[0]
    var = sq / (n - 1) if n >= 2 else torch.zeros((), dtype=torch.float64)
    out = ((x.double() - mean) * torch.rsqrt(var + eps)).to(x.dtype)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled tokens, (B, T) -> (B, T).

    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r with
    r = q / p (unbiased and always >= 0, lower variance). Schulman, "Approximating KL divergence" (2020).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Dense PPO rewards: -kl_coef * KL on every response token, plus the sequence score on the
    last one (Ziegler et al. 2019; Ouyang et al. 2022). scores (B,), kl and mask (B, T) -> (B, T)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(dim=1) > 0
    rewards[torch.arange(len(scores)), last] += torch.where(has_tokens, scores, torch.zeros_like(scores))
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), (B, T) each -> advantages, returns.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    taken as 0 past the last unmasked token (the episode ends at eos). returns = A + V.
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Past the end of a sequence nothing flows back; inside it the next step's values do.
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = torch.where(m > 0, adv, torch.zeros_like(next_adv))
    returns = (advantages + values) * mask
    return advantages, returns


def aggregate(
    x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", max_tokens: int | None = None
) -> torch.Tensor:
    """Average token losses (B, T) -> scalar, the way a method defines its objective.

    token_mean: over every counted token of the batch (long responses weigh more; DAPO, PPO here);
    sequence_mean: over tokens within each response, then over responses (GRPO as published);
    constant: the sum divided by B x max_tokens, a constant (Dr. GRPO: no length bias at all).
    Responses without counted tokens are left out of every average.
    """
    if how == "token_mean":
        return masked_mean(x, mask)
    if how == "sequence_mean":
        lengths = mask.sum(1)
        rows = lengths > 0
        per_row = (x * mask).sum(1) / lengths.clamp(min=1)
        return per_row[rows].sum() / rows.sum().clamp(min=1)
    if how == "constant":
        if not max_tokens:
            raise ValueError("aggregation 'constant' needs max_tokens (the generation budget)")
        return (x * mask).sum() / (mask.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r} (token_mean, sequence_mean or constant)")


def approx_kl_of(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) masked log new/old -> scalar mean k3 estimate of KL(old || new) per token: how far
    an update moved the policy from the one that sampled the tokens."""
    return masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)


@dataclass
class PolicyLossOut:
    loss: torch.Tensor  # scalar, to minimise (includes the KL loss when there is one)
    clip_fraction: torch.Tensor  # share of tokens (sequences, for a sequence ratio) on the clipped branch
    approx_kl: torch.Tensor  # mean of k3(old, new) per token: how far this update moved the policy
    ratio_mean: torch.Tensor  # mean probability ratio new / old
    kl_loss: torch.Tensor | None = None  # the k3 KL-to-reference term, when the method puts KL in the loss


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    ratio_level: str = "token",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyLossOut:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), (B, T) each -> PolicyLossOut.

    ratio_level 'token' clips each token's ratio p/p_old; 'sequence' is GSPO (Zheng et al. 2025):
    one ratio per response, exp(mean_t log p/p_old), clipped with a far smaller range, against the
    response's advantage. With `ref_logprobs` and `kl_coef`, kl_coef x k3 KL to the reference is
    added to the loss (GRPO's KL term), aggregated like the policy term.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
        loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, max_tokens)
        with torch.no_grad():
            clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    elif ratio_level == "sequence":
        rows = mask.sum(1) > 0
        lengths = mask.sum(1).clamp(min=1)
        seq_ratio = torch.exp(log_ratio.sum(1) / lengths)
        seq_adv = (advantages * mask).sum(1) / lengths
        unclipped = -seq_adv * seq_ratio
        clipped = -seq_adv * torch.clamp(seq_ratio, 1.0 - clip, 1.0 + clip)
        loss = torch.maximum(unclipped, clipped)[rows].sum() / rows.sum().clamp(min=1)
        with torch.no_grad():
            clip_fraction = (clipped > unclipped)[rows].float().sum() / rows.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown ratio level {ratio_level!r} (token or sequence)")
    kl_loss = None
    if ref_logprobs is not None and kl_coef:
        # masked before the exp: past eos the gap can exceed 88 nats, and inf x 0 is NaN
        kl_loss = aggregate(kl_penalty(logprobs * mask, ref_logprobs * mask, "k3"), mask, aggregation, max_tokens)
        loss = loss + kl_coef * kl_loss
    with torch.no_grad():
        approx_kl = approx_kl_of(log_ratio, mask)
        ratio_mean = masked_mean(torch.exp(log_ratio), mask)
    return PolicyLossOut(loss, clip_fraction, approx_kl, ratio_mean, kl_loss)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2) (PPO2 baselines); -> (loss, clip fraction)."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), torch.zeros(())
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).float(), mask)
    return loss, frac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the mask: 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    if var_r == 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask) / var_r


@dataclass
class KLController:
    """KL coefficient: fixed, or adaptive towards a target KL (Ziegler et al. 2019, sec. 2.2)."""

    value: float
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> None:
        """Proportional control: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon."""
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


class RunningMoments:
    """Running mean/std of scalar rewards (Chan et al. parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        batch_mean = x.double().mean().item()
        batch_m2 = ((x.double() - batch_mean) ** 2).sum().item()
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
