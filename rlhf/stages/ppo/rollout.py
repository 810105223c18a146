"""Rollouts: sample responses, score them with all four models, turn scores into advantages.

Layout of one rollout batch: B prompts left-padded to width P, responses right-padded to width R,
so every response starts at column P and position t of a response is column P + t. Rendering,
sampling and log-probs come from `rlhf.sampling`, shared with evaluation and labelling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.config_rl import PPOSettings, PPORecipe
from rlhf.data.formats import Messages
from rlhf.sampling import (generate, left_pad, policy_outputs, positions, render_prompt, response_mask_of,
                           score_responses)
from rlhf.stages.ppo import engines, losses


@dataclass
class Rollout:
    """One PPO batch on one rank; B rollouts, P prompt columns, R response columns."""

    input_ids: torch.Tensor  # (B, P+R) prompt (left-padded) then response (right-padded) token ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt tokens and counted response tokens
    position_ids: torch.Tensor  # (B, P+R) positions that skip the left padding
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first eos
    logprobs: torch.Tensor  # (B, R) log p(token) under the actor when sampled (at the temperature)
    ref_logprobs: torch.Tensor  # (B, R) the same under the frozen reference policy
    values: torch.Tensor  # (B, R) critic value of the state before each response token
    entropy: torch.Tensor  # (B, R) actor entropy at each response position
    raw_scores: torch.Tensor  # (B,) reward-model score as it came out
    scores: torch.Tensor  # (B,) normalised, eos-penalised, clipped score used as the final reward
    has_eos: torch.Tensor  # (B,) bool: the response stopped by itself
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference
    rewards: torch.Tensor  # (B, R) dense rewards: -kl_coef * kl, plus the score on the last token
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened over the global batch when the recipe says)
    returns: torch.Tensor  # (B, R) value targets for the critic

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, ppo: PPOSettings, mean: float, std: float) -> torch.Tensor:
    """Raw reward-model scores (B,) -> the final rewards (B,): normalise, penalise missing eos, clip."""
    scores = (raw - mean) / max(std, 1e-6)
    if ppo.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - ppo.missing_eos_penalty)
    return scores.clamp(-ppo.reward_clip, ppo.reward_clip)


def advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, ppo: PPOSettings,
                           all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE per sequence, then (optionally) whitening over the global batch; (B, R) each -> (B, R) x 2.
    `all_reduce` sums over ranks (see `losses.masked_whiten`); None on a single process."""
    adv, ret = losses.gae(rewards, values, mask.float(), ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        adv = losses.masked_whiten(adv, mask.float(), all_reduce=all_reduce)
    return adv, ret


@torch.no_grad()
def make_rollout(m: engines.Models, recipe: PPORecipe, prompts: list[Messages], norm: tuple[float, float],
                 kl_coef: float, times: dict) -> Rollout:
    """Generate for `prompts`, score with actor / reference / critic / reward model, and compute
    rewards and advantages."""
    tok, gen, ppo, dev = m.tokenizer, recipe.generation, recipe.ppo, m.device
    prompt_ids, prompt_mask = left_pad([render_prompt(tok, p) for p in prompts], tok.pad_token_id)
    t0 = time.perf_counter()
    with engines.gathered(m.actor, recipe.deepspeed.zero_stage, gen.gather_weights), engines.compute(m):
        m.actor.module.eval()
        synced = recipe.deepspeed.zero_stage == 3 and distributed.world_size() > 1
        response = generate(m.actor.module, prompt_ids.to(dev), prompt_mask.to(dev), gen, tok.eos_token_id,
                            tok.pad_token_id, synced=synced).cpu()
    times["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resp_mask = response_mask_of(response, tok.eos_token_id)
    has_eos = (response == tok.eos_token_id).any(dim=1)
    ids = torch.cat([prompt_ids, response], dim=1)
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    pos = positions(attn)
    on = [x.to(dev) for x in (ids, attn, pos, response)]
    P = prompt_ids.shape[1]
    with engines.compute(m):
        logp, entropy = policy_outputs(m.actor.module, *on, gen.temperature, with_entropy=True)
        with engines.as_reference(m.actor.module, m.reference) as reference:
            ref_logp, _ = policy_outputs(reference, *on, gen.temperature)
        m.critic.module.eval()
        values = m.critic.module(on[0], on[1], on[2])[:, P - 1:-1]
        responses = [r[: int(k)].tolist() for r, k in zip(response, resp_mask.sum(1))]
        raw = score_responses(m.reward, tok, prompts, responses, dev, batch_size=recipe.train.micro_batch_size * 2)
    times["scoring"] = time.perf_counter() - t0
    logp, ref_logp, entropy, values = (x.float().cpu() for x in (logp, ref_logp, entropy, values))
    scores = shape_scores(raw, has_eos, ppo, *norm)
    kl = losses.kl_penalty(logp, ref_logp, ppo.kl_estimator) * resp_mask
    rewards = losses.token_rewards(scores, kl, resp_mask.float(), kl_coef)
    adv, ret = advantages_and_returns(values, rewards, resp_mask, ppo, all_reduce=distributed.sum_over_ranks)
    return Rollout(ids, attn, pos, resp_mask, logp, ref_logp, values, entropy, raw, scores, has_eos, kl, rewards,
                   adv, ret)


def rollout_metrics(ro: Rollout, kl_coef: float) -> dict[str, float]:
    """This rank's summary of a rollout batch (the trainer averages them over ranks)."""
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


def is_finite(ro: Rollout) -> bool:
    return all(torch.isfinite(t).all() for t in (ro.raw_scores, ro.logprobs, ro.ref_logprobs, ro.values))
