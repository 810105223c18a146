"""The forgetting measure: how well a policy still predicts what the base model says about things
unrelated to the task.

The base model answers general questions greedily once; each policy's per-token negative
log-likelihood of those answers is compared with the base model's own. Fine-tuning that damaged
general ability raises it; the report gives the relative rise in perplexity, exp(NLL - NLL_base) - 1.
"""

from __future__ import annotations

import math

from rlhf.config import GenerationSettings
from rlhf.sampling import Samples, sample, sequence_logprobs


def reference_answers(
    base, tokenizer, question_ids: list[list[int]], max_new_tokens: int, batch_size: int, device
) -> Samples:
    """The base model's greedy answer to each question (cut after its eos), as `Samples`."""
    gen = GenerationSettings(max_new_tokens=max_new_tokens)
    return sample(base, tokenizer, question_ids, 1, gen, 0, batch_size, device, greedy=True)


def nll_per_token(model, tokenizer, question_ids: list[list[int]], answers: Samples, batch_size: int, device) -> float:
    """Mean negative log-likelihood per answer token of `answers` under `model` (temperature 1)."""
    logp = sequence_logprobs(model, question_ids, answers, tokenizer.pad_token_id, 1.0, batch_size, device)
    tokens = sum(len(r) for r in answers.responses)
    return -sum(logp) / max(tokens, 1)


def perplexity_rise(nll: float, base_nll: float) -> float:
    """Relative perplexity increase over the base model: exp(nll - base_nll) - 1 (0.05 = 5% worse)."""
    return math.exp(nll - base_nll) - 1.0
