"""Sample responses from a policy and measure them: reward-model scores and KL to a reference.

Batched generation with the KV cache and left padding, exactly as PPO rollouts sample (the same
helpers from `rlhf.stages.ppo.rollout`), so evaluation sees the policy the way training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import GenerationSettings
from rlhf.data.formats import Messages
from rlhf.stages.ppo.rollout import generate, left_pad, policy_outputs, positions, response_mask_of


def with_few_shot(prompt: Messages, shots: list[Messages]) -> Messages:
    """Prepend demonstration turns (user, assistant, ...) so a base model sees the task's format."""
    return [turn for shot in shots for turn in shot] + prompt


@dataclass
class Samples:
    """N = prompts x samples responses of one policy, in prompt-major order."""

    prompt_index: list[int]  # (N,) which prompt each response answers
    responses: list[list[int]]  # (N,) response token ids, cut after the first eos
    hit_limit: list[bool]  # (N,) reached max_new_tokens without an eos


@torch.no_grad()
def sample(policy, tokenizer, prompt_ids: list[list[int]], n: int, gen: GenerationSettings, seed: int,
           batch_size: int, device) -> Samples:
    """`n` sampled responses per prompt; seeded, so two runs of the same policy agree."""
    torch.manual_seed(seed)
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
    out = Samples([], [], [])
    policy.eval()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        ids, mask = left_pad([c[1] for c in chunk], tokenizer.pad_token_id)
        resp = generate(policy, ids.to(device), mask.to(device), gen, tokenizer.eos_token_id,
                        tokenizer.pad_token_id).cpu()
        keep = response_mask_of(resp, tokenizer.eos_token_id)
        for (i, _), row, k in zip(chunk, resp, keep):
            tokens = row[: int(k.sum())].tolist()
            out.prompt_index.append(i)
            out.responses.append(tokens)
            out.hit_limit.append(tokenizer.eos_token_id not in tokens and len(tokens) >= gen.max_new_tokens)
    return out


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], samples: Samples, pad_id: int, temperature: float,
                      batch_size: int, device) -> list[float]:
    """Sum of log p(response | prompt) under `model` for each sample, (N,)."""
    out: list[float] = []
    model.eval()
    for start in range(0, len(samples.responses), batch_size):
        idx = range(start, min(start + batch_size, len(samples.responses)))
        p_ids, p_mask = left_pad([prompt_ids[samples.prompt_index[i]] for i in idx], pad_id)
        resp = [samples.responses[i] or [pad_id] for i in idx]  # an empty response scores 0 below
        width = max(map(len, resp))
        r_ids = torch.full((len(resp), width), pad_id, dtype=torch.long)
        r_mask = torch.zeros((len(resp), width), dtype=torch.long)
        for row, (i, r) in enumerate(zip(idx, resp)):
            r_ids[row, : len(r)] = torch.tensor(r)
            r_mask[row, : len(samples.responses[i])] = 1
        ids, attn = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        logp, _ = policy_outputs(model, ids.to(device), attn.to(device), positions(attn).to(device),
                                 r_ids.to(device), temperature)
        out.extend((logp.float().cpu() * r_mask).sum(1).tolist())
    return out
