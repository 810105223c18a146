"""What a PPO step reads: the prompt and PPO-ptx rows, cleaned and length-filtered like every
stage's data before any model loads, and each step's rows drawn as a pure function of the step
(so resuming needs no saved data position)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf import distributed
from rlhf.config_rl import PPORecipe
from rlhf.data.formats import Messages, normalize_prompt, normalize_prompt_row, normalize_sft
from rlhf.data.prepare import Splits, prepare_splits
from rlhf.errors import DataError, HandoffError
from rlhf.sampling import render_conversation, render_for_loss, render_prompt


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


def rollout_prompts(rows: list[dict], step: int, recipe: PPORecipe) -> list[dict]:
    """This rank's prompt rows for `step`: rollout_batch_size / k prompts of the stream, each
    repeated k = ppo.rollouts_per_prompt times in a row (a group never spans ranks)."""
    k = recipe.ppo.rollouts_per_prompt
    return [
        row for row in stream_batch(rows, step, recipe.ppo.rollout_batch_size // k, recipe.train.seed) for _ in range(k)
    ]


@dataclass
class Data:
    prompts: Splits  # the prompt splits of {"messages", "fields"} rows (report goes into the manifest)
    ptx: list[Messages] | None  # SFT demonstrations for PPO-ptx, length-filtered like all data
    reward_stats: dict  # the reward manifest's mean / std of chosen-response scores


def prepare_data(recipe: PPORecipe, tokenizer, reward_manifest: dict) -> Data:
    """Prompts and ptx rows through the same cleaning and length filter as every stage's data."""
    # Other columns matter only to reward functions; without them a prompt row is its messages
    # alone (so de-duplication and the data stream are those of the prompts).
    normalize = (
        normalize_prompt_row
        if recipe.reward_functions
        else lambda data: {"messages": normalize_prompt(data), "fields": {}}
    )
    prompts = prepare_splits(
        recipe.prompts, normalize, lambda row: len(render_prompt(tokenizer, row["messages"])), key="prompts"
    )
    ptx = None
    if recipe.ptx_data and recipe.ppo.ptx_coef:
        ptx = prepare_splits(
            recipe.ptx_data, normalize_sft, lambda msgs: len(render_conversation(tokenizer, msgs)), key="ptx_data"
        ).train
        for i, msgs in enumerate(ptx):  # every rank draws other rows: a bad one must fail here, not mid-step
            try:
                render_for_loss(tokenizer, msgs)
            except ValueError as e:
                raise DataError(f"ptx_data example {i} ({msgs[0]['content'][:60]!r}...): {e}") from None
    stats = reward_manifest.get("reward_stats") or {}
    if recipe.reward_dir is not None and recipe.ppo.reward_normalization == "manifest" and not stats:
        raise HandoffError(f"{recipe.reward_dir} manifest has no reward_stats; use ppo.reward_normalization=running")
    return Data(prompts, ptx, stats)
