"""Rollouts: sample responses, score them with all four models, turn scores into advantages.

With a group estimator every prompt appears k = ppo.rollouts_per_prompt times in a row.
Layout of one rollout batch: B prompts left-padded to width P, responses right-padded to width R,
so every response starts at column P and position t of a response is column P + t. Rendering,
sampling and log-probs come from `rlhf.sampling`, shared with evaluation and labelling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from rlhf import distributed
from rlhf.config_rl import PPOSettings, PPORecipe
from rlhf.data.formats import Messages
from rlhf.sampling import (
    generate,
    left_pad,
    policy_outputs,
    positions,
    render_prompt,
    response_mask_of,
    score_responses,
)
from rlhf.stages.ppo import advantages, engines, losses, scoring, value_head


@dataclass
class Rollout:
    """One PPO batch on one rank; B rollouts, P prompt columns, R response columns."""

    input_ids: torch.Tensor  # (B, P+R) prompt (left-padded) then response (right-padded) token ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real prompt tokens and counted response tokens
    position_ids: torch.Tensor  # (B, P+R) positions that skip the left padding
    response_mask: torch.Tensor  # (B, R) 1 on response tokens up to and including the first eos
    logprobs: torch.Tensor  # (B, R) log p(token) under the actor when sampled (at the temperature)
    ref_logprobs: torch.Tensor  # (B, R) the same under the frozen reference policy
    values: torch.Tensor  # (B, R) critic value of the state before each response token (zeros without a critic)
    entropy: torch.Tensor  # (B, R) actor entropy at each response position
    raw_scores: torch.Tensor  # (B,) reward-model score as it came out (without one: weighted raw function values)
    scores: torch.Tensor  # (B,) normalised, eos-penalised, clipped score used as the final reward
    has_eos: torch.Tensor  # (B,) bool: the response stopped by itself
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference
    rewards: torch.Tensor  # (B, R) dense rewards: -kl_coef * kl, plus the score on the last token
    advantages: torch.Tensor  # (B, R) the estimator's advantages (`advantages.ESTIMATORS`)
    returns: torch.Tensor  # (B, R) value targets for the critic (zeros without one)
    source_stats: dict = field(default_factory=dict)  # per reward-function means and failures (not per row)

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__ if k != "source_stats"})


def advantages_and_returns(
    values: torch.Tensor | None,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    ppo: PPOSettings,
    kl_coef: float,
    all_reduce=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's estimator on one rank's batch: scores (B,), values / kl / mask (B, R) -> advantages
    and returns (B, R); returns are zeros for critic-free estimators. `all_reduce` sums over ranks
    (batch whitening); None on a single process. With the KL in the loss it stays out of the reward."""
    inputs = advantages.AdvantageInputs(
        scores=scores,
        kl=kl,
        mask=mask.float(),
        values=values,
        kl_coef=kl_coef if ppo.kl_placement == "reward" else 0.0,
        group_size=ppo.rollouts_per_prompt,
        gamma=ppo.gamma,
        lam=ppo.lam,
        whiten=ppo.whiten_advantages,
        all_reduce=all_reduce,
    )
    adv, ret = ppo.estimator.fn(inputs)
    return adv, (ret if ret is not None else torch.zeros_like(adv))


def decode_responses(tok, responses: list[list[int]]) -> list[str]:
    return [tok.decode(r, skip_special_tokens=True) for r in responses]


def _sample(m: engines.Models, recipe: PPORecipe, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) left-padded prompts -> (B, R) sampled response ids on the CPU (pad after eos), the
    actor's weights gathered once for the whole call under ZeRO-3."""
    gen, dev = recipe.generation, m.device
    with engines.gathered(m.actor, recipe.deepspeed.zero_stage, gen.gather_weights), engines.compute(m):
        m.actor.module.eval()
        synced = recipe.deepspeed.zero_stage == 3 and distributed.world_size() > 1
        return generate(
            m.actor.module,
            prompt_ids.to(dev),
            prompt_mask.to(dev),
            gen,
            m.tokenizer.eos_token_id,
            m.tokenizer.pad_token_id,
            synced=synced,
        ).cpu()


def _score(m: engines.Models, recipe: PPORecipe, batch: tuple, prompts: list[Messages], responses: list[list[int]]):
    """Forward passes over (ids, attention mask, positions, response ids), each (B, .): actor
    log-probs and entropy, reference log-probs, critic values, each (B, R) float on the CPU (values
    None without a critic), and the reward model's raw (B,) scores (None without one)."""
    dev, temperature, P = m.device, recipe.generation.temperature, batch[0].shape[1] - batch[3].shape[1]
    on = [x.to(dev) for x in batch]
    with engines.compute(m):
        values = None
        if m.shared_critic:  # the values come from the actor's own forward pass
            logp, entropy, values = value_head.outputs_with_values(m.actor.module, *on, temperature, with_entropy=True)
            values = values.cpu()
        else:
            logp, entropy = policy_outputs(m.actor.module, *on, temperature, with_entropy=True)
        with engines.as_reference(m.actor.module, m.reference) as reference:
            ref_logp, _ = policy_outputs(reference, *on, temperature)
        if m.critic is not None:
            m.critic.module.eval()
            values = m.critic.module(on[0], on[1], on[2])[:, P - 1 : -1].float().cpu()
        rm_raw = None
        if m.reward is not None:
            batch_size = recipe.train.micro_batch_size * 2
            rm_raw = score_responses(m.reward, m.tokenizer, prompts, responses, dev, batch_size=batch_size)
    logp, ref_logp, entropy = (x.float().cpu() for x in (logp, ref_logp, entropy))
    return logp, ref_logp, entropy, values, rm_raw


@torch.no_grad()
def make_rollout(
    m: engines.Models,
    recipe: PPORecipe,
    prompts: list[Messages],
    norm: tuple[float, float],
    kl_coef: float,
    times: dict,
    code: scoring.CodeRewards | None = None,
    fields: list[dict] | None = None,
) -> Rollout:
    """Generate for `prompts` (k consecutive copies per prompt for grouped estimators), score with
    actor / reference / critic and the reward sources, and compute rewards and advantages.
    `norm` is the reward model's (mean, std) at this step; `code` the reward functions, called
    with each prompt row's `fields`."""
    tok, ppo = m.tokenizer, recipe.ppo
    prompt_ids, prompt_mask = left_pad([render_prompt(tok, p) for p in prompts], tok.pad_token_id)
    t0 = time.perf_counter()
    response = _sample(m, recipe, prompt_ids, prompt_mask)
    times["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    resp_mask = response_mask_of(response, tok.eos_token_id)
    has_eos = (response == tok.eos_token_id).any(dim=1)
    ids = torch.cat([prompt_ids, response], dim=1)
    attn = torch.cat([prompt_mask, resp_mask], dim=1)
    pos = positions(attn)
    responses = [r[: int(k)].tolist() for r, k in zip(response, resp_mask.sum(1))]
    logp, ref_logp, entropy, values, rm_raw = _score(m, recipe, (ids, attn, pos, response), prompts, responses)
    fn_scores = code(prompts, decode_responses(tok, responses), fields or [{}] * len(prompts)) if code else None
    times["scoring"] = time.perf_counter() - t0
    scores = scoring.mix(recipe, rm_raw, norm, fn_scores, has_eos)
    # Guard: a row whose score is not finite (a reward function failed, the reward model gave NaN)
    # leaves the update: no tokens, no group membership, no advantage.
    ok = torch.isfinite(scores)
    resp_mask = resp_mask * ok[:, None].to(resp_mask.dtype)
    scores = torch.where(ok, scores, torch.zeros_like(scores))
    kl = losses.kl_penalty(logp, ref_logp, ppo.kl_estimator) * resp_mask
    rewards = losses.token_rewards(scores, kl, resp_mask.float(), kl_coef if ppo.kl_placement == "reward" else 0.0)
    adv, ret = advantages_and_returns(
        values, scores, kl, resp_mask, ppo, kl_coef, all_reduce=distributed.sum_over_ranks
    )
    raw = scoring.headline_raw(recipe, rm_raw, fn_scores)
    return Rollout(
        ids,
        attn,
        pos,
        resp_mask,
        logp,
        ref_logp,
        values if values is not None else torch.zeros_like(logp),
        entropy,
        raw,
        scores,
        has_eos,
        kl,
        rewards,
        adv,
        ret,
        scoring.source_metrics(recipe, fn_scores),
    )


def rollout_metrics(ro: Rollout, kl_coef: float, with_critic: bool = True) -> dict[str, float]:
    """This rank's summary of a rollout batch (the trainer averages them over ranks); rows the
    guards dropped are left out of the reward statistics."""
    mask = ro.response_mask.float()
    kept = mask.sum(1) > 0
    raw = ro.raw_scores[kept & torch.isfinite(ro.raw_scores)]
    out = {
        "reward_mean": raw.mean().item() if len(raw) else math.nan,
        "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
        "score_mean": ro.scores[kept].mean().item() if kept.any() else math.nan,
        "kl": (ro.kl * mask).sum(1)[kept].mean().item() if kept.any() else 0.0,
        "entropy": losses.masked_mean(ro.entropy, mask).item(),
        "response_length": mask.sum(1)[kept].mean().item(),
        "eos_rate": ro.has_eos.float().mean().item(),
        "kl_coef": kl_coef,
        "advantage_mean": losses.masked_mean(ro.advantages, mask).item(),
        "dropped_rows": float((~kept).sum()),
        **ro.source_stats,
    }
    if with_critic:
        out["explained_variance"] = losses.explained_variance(ro.values, ro.returns, mask).item()
    return out


def is_finite(ro: Rollout) -> bool:
    """The batch is usable: log-probs and values finite, and at least one row kept (rows with a
    non-finite score were dropped in `make_rollout`)."""
    return bool(ro.response_mask.any()) and all(
        torch.isfinite(t).all() for t in (ro.logprobs, ro.ref_logprobs, ro.values)
    )
