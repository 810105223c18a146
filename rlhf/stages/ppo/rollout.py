"""Rollouts: sample responses, score them, and turn scores into per-token advantages.

Layout of one rollout batch: B prompts left-padded to width P, responses right-padded to width R,
so every response starts at column P and position t of a response is column P + t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import GenerationSettings, PPOSettings
from rlhf.data.formats import Messages
from rlhf.stages.ppo import losses


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
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened when the recipe says)
    returns: torch.Tensor  # (B, R) value targets for the critic

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def select(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})


def encode_prompts(tokenizer, prompts: list[Messages]) -> list[list[int]]:
    """Chat prompts -> token ids ending with the assistant header; without a chat template, the
    turns' text joined by blank lines."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
                for p in prompts]
    return [tokenizer("\n\n".join(m["content"] for m in p))["input_ids"] for p in prompts]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids and mask, padded on the left so all prompts end at column P."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def response_mask_of(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, R) sampled tokens -> (B, R) mask: 1 up to and including the first eos, 0 after it."""
    is_eos = (responses == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(policy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen: GenerationSettings, eos_id: int,
             pad_id: int) -> torch.Tensor:
    """Sample responses with the KV cache; (B, P) -> (B, R) token ids (R <= max_new_tokens)."""
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                          temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None,
                          max_new_tokens=gen.max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
    return out[:, prompt_ids.shape[1]:]


def policy_outputs(policy, input_ids, attention_mask, position_ids, response: torch.Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the response tokens (and entropies (B, R)) under `policy`."""
    R = response.shape[1]
    # logits_to_keep: the LM head runs on the R + 1 last positions only, never on the prompt (with a
    # 150k vocabulary and long prompts that is most of the logits memory).
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=R + 1).logits[:, :-1].float() / temperature
    logp = losses.logprobs_of(logits, response)
    return logp, (losses.entropy_from_logits(logits) if with_entropy else None)


def shape_scores(raw: torch.Tensor, has_eos: torch.Tensor, ppo: PPOSettings, mean: float, std: float) -> torch.Tensor:
    """Raw reward-model scores (B,) -> the final rewards: normalise, penalise missing eos, clip."""
    scores = (raw - mean) / max(std, 1e-6)
    if ppo.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - ppo.missing_eos_penalty)
    return scores.clamp(-ppo.reward_clip, ppo.reward_clip)


def advantages_and_returns(rollout_values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                           ppo: PPOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    adv, ret = losses.gae(rewards, rollout_values, mask.float(), ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
        adv = losses.masked_whiten(adv, mask.float())
    return adv, ret
