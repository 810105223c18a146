"""What a round asks people to label: pairs of the current policy's answers, least certain first.

Also the one on-policy measure of the loop: how often a reward model agrees with the labels of a
round (before its update on them: drift; after, on the round's held-out part).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

from rlhf.config import GenerationSettings
from rlhf.data.formats import Messages
from rlhf.label.batches import PairToLabel
from rlhf.label.project import generate_candidates, pair_uncertainty
from rlhf.reward_metrics import pairwise_accuracy


@dataclass(frozen=True)
class PromptSlice:
    prompts: list[Messages]
    first: int  # position of the slice in the seeded prompt order (over all rounds)
    wrapped: bool  # the pool ran out and the slice started over from the first prompts


def prompts_for_round(pool: list[Messages], k: int, per_round: int, seed: int) -> PromptSlice:
    """Round k's prompts (k >= 1): the next `per_round` of a seeded order of the pool, so rounds
    see fresh prompts until the pool is used up, then start over (recorded as `wrapped`; a pool
    smaller than one round's need is gone through more than once, each time with new samples)."""
    order = sorted(range(len(pool)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    first = (k - 1) * per_round
    picked = [pool[order[(first + i) % len(pool)]] for i in range(per_round)]
    return PromptSlice(picked, first, first + per_round > len(pool))


def prompts_needed(labels: int, pool_factor: int, samples_per_prompt: int) -> int:
    return math.ceil(labels * pool_factor / (samples_per_prompt // 2))


def score_pairs(
    reward_dir: str, prompts: list[Messages], a: list[str], b: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of both answers of N pairs, (N,) x 2, rendered as reward training renders them."""
    from rlhf.models import default_device, load_model, load_tokenizer, release_device_memory
    from rlhf.sampling import render_conversation, score_sequences

    tok = load_tokenizer(reward_dir)
    device = default_device()
    model = load_model(reward_dir, "scorer", device=device).eval()
    seqs = [
        render_conversation(tok, p + [{"role": "assistant", "content": t}])
        for p, x, y in zip(prompts, a, b)
        for t in (x, y)
    ]
    s = score_sequences(model, seqs, tok.pad_token_id, device) if seqs else torch.zeros(0)  # on the CPU
    del model
    release_device_memory()
    return s[0::2], s[1::2]


def candidate_pairs(
    policy: str,
    reward_dir: str,
    prompts: list[Messages],
    samples_per_prompt: int,
    gen: GenerationSettings,
    seed: int,
    keep: int,
) -> tuple[list[PairToLabel], dict[str, int]]:
    """Sample answers from `policy`, pair them two by two per prompt (identical answers carry no
    preference and are left out), and keep the `keep` pairs whose |P(a > b) - 1/2| under the
    reward model is smallest. Returns the pairs and counts of what was sampled."""
    answers = generate_candidates(prompts, policy, samples_per_prompt, gen, seed)
    rows = [
        (p, texts[i], texts[i + 1])
        for p, texts in zip(prompts, answers)
        for i in range(0, len(texts) - 1, 2)
        if texts[i] != texts[i + 1]
    ]
    sa, sb = score_pairs(reward_dir, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    certainty = pair_uncertainty(sa, sb).tolist() if rows else []
    ranked = sorted(range(len(rows)), key=lambda i: (certainty[i], i))[:keep]
    pairs = [PairToLabel(rows[i][0], rows[i][1], rows[i][2], certainty[i]) for i in sorted(ranked)]
    n_pairs = sum(len(t) // 2 for t in answers)
    return pairs, {
        "prompts": len(prompts),
        "pairs_sampled": n_pairs,
        "identical": n_pairs - len(rows),
        "kept": len(pairs),
    }


def accuracies(reward_dir: str, groups: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Pairwise accuracy of a reward model on each group of exported preference rows {prompt,
    chosen, rejected}, with the model loaded and every row scored once. Ties have no right answer
    and are left out (counted)."""
    scored = [r for rows in groups.values() for r in rows if not r.get("tie")]
    sc, sr = (
        score_pairs(
            reward_dir, [r["prompt"] for r in scored], [r["chosen"] for r in scored], [r["rejected"] for r in scored]
        )
        if scored
        else (torch.zeros(0), torch.zeros(0))
    )
    out, at = {}, 0
    for name, rows in groups.items():
        n = sum(not r.get("tie") for r in rows)
        acc = pairwise_accuracy(sc[at : at + n], sr[at : at + n]) if n else float("nan")
        out[name] = {"accuracy": acc, "pairs": n, "ties": len(rows) - n}
        at += n
    return out


def accuracy(reward_dir: str, rows: list[dict]) -> dict[str, float]:
    """`accuracies` of one group."""
    return accuracies(reward_dir, {"rows": rows})["rows"]


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): each pair's side chosen by a hash of its prompt, so the split is the same
    after a restart, does not depend on the row order, and a prompt asked twice in a round (a small
    pool) never has one pair in training and another held out."""

    def share(r: dict) -> float:
        h = hashlib.sha256(f"{seed}:{json.dumps(r['prompt'], sort_keys=True)}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    held = [r for r in rows if share(r) < fraction]
    train = [r for r in rows if share(r) >= fraction]
    if rows and not held:  # a tiny batch: keep at least one pair out, or 'after' would be unmeasured
        held, train = train[:1], train[1:]
    return train, held
