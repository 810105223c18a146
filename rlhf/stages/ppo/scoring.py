"""The score of each rollout from its sources: the reward model and/or reward functions.

Each source is normalised before it is weighted, so sources whose scales differ 100x still count
by their weights: the reward model by `ppo.reward_normalization` (manifest, running or none), each
function by a running mean / std over all ranks that includes the current batch (with
`normalize: false`, as it comes). The weighted sum is then eos-penalised and clipped. A row where
any source failed (an exception, NaN, a timeout, a dead process) gets a NaN score; the rollout
drops it from the update.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rlhf import distributed
from rlhf.config_rl import PPORecipe, PPOSettings
from rlhf.data.formats import Messages
from rlhf.rewards.functions import Failure, RewardFunctions
from rlhf.stages.ppo.losses import RunningMoments

log = logging.getLogger("rlhf")


def prompt_text(messages: Messages) -> str:
    """What a reward function receives as `prompt`: the last user turn's text."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def shape(mixed: torch.Tensor, has_eos: torch.Tensor, ppo: PPOSettings) -> torch.Tensor:
    """The mixed normalised score (B,) -> the final reward (B,): penalise missing eos, clip."""
    if ppo.missing_eos_penalty is not None:
        mixed = torch.where(has_eos, mixed, mixed - ppo.missing_eos_penalty)
    return mixed.clamp(-ppo.reward_clip, ppo.reward_clip)


def normalise(raw: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(B,) -> (B,); a zero spread (every score equal) maps every score to 0 rather than dividing by 0."""
    return (raw - mean) / max(std, 1e-6)


@dataclass
class FunctionScores:
    """One batch scored by the reward functions (B rows, F functions)."""

    raw: torch.Tensor  # (B, F) values as returned, NaN where the call failed
    mixed: torch.Tensor  # (B,) sum over functions of weight x normalised value (NaN if any failed)
    failures: list[Failure]


@dataclass
class CodeRewards:
    """The recipe's reward functions, their child process and their running normalisers (saved with
    the training state, so a resumed run normalises as an uninterrupted one)."""

    recipe: PPORecipe
    runner: RewardFunctions
    moments: list[RunningMoments] = field(default_factory=list)

    @classmethod
    def start(cls, recipe: PPORecipe) -> "CodeRewards | None":
        specs = recipe.reward_functions
        if not specs:
            return None
        runner = RewardFunctions([s.function for s in specs], [s.timeout_seconds for s in specs])
        return cls(recipe, runner, [RunningMoments() for _ in specs])

    def __call__(self, prompts: list[Messages], responses: list[str], fields: list[dict]) -> FunctionScores:
        values, failures = self.runner.score([prompt_text(p) for p in prompts], responses, fields)
        raw = torch.tensor(values, dtype=torch.float64).reshape(len(responses), len(self.recipe.reward_functions))
        mixed = torch.zeros(len(responses), dtype=torch.float64)
        for j, spec in enumerate(self.recipe.reward_functions):
            col = raw[:, j]
            if spec.normalize:
                everyone = distributed.gather_over_ranks(col)
                self.moments[j].update(everyone[torch.isfinite(everyone)])
                col = normalise(col, self.moments[j].mean, self.moments[j].std)
            mixed = mixed + spec.weight * col
        for f in failures:
            log.warning(
                "%s (prompt %r...); the response is left out of this update", f, prompt_text(prompts[f.row])[:60]
            )
        return FunctionScores(raw.float(), mixed.float(), failures)

    def state_dict(self) -> list[dict]:
        return [m.state_dict() for m in self.moments]

    def load_state_dict(self, state: list[dict]) -> None:
        for m, s in zip(self.moments, state):
            m.load_state_dict(s)

    def close(self) -> None:
        self.runner.close()


def mix(
    recipe: PPORecipe,
    rm_raw: torch.Tensor | None,
    rm_norm: tuple[float, float],
    code: FunctionScores | None,
    has_eos: torch.Tensor,
) -> torch.Tensor:
    """Final scores (B,) from the sources; NaN on rows where a source failed."""
    parts = []
    if rm_raw is not None:
        rm = normalise(rm_raw.float(), *rm_norm)
        parts.append(rm if code is None else recipe.reward_model_weight * rm)
    if code is not None:
        parts.append(code.mixed)
    return shape(sum(parts), has_eos, recipe.ppo)


def headline_raw(recipe: PPORecipe, rm_raw: torch.Tensor | None, code: FunctionScores | None) -> torch.Tensor:
    """The raw reward reported as `reward_mean`: the reward model's score when there is one, else
    the weighted sum of the functions' raw values."""
    if rm_raw is not None:
        return rm_raw.float()
    weights = torch.tensor([s.weight for s in recipe.reward_functions], dtype=code.raw.dtype)
    return (code.raw * weights).sum(1)


def source_metrics(recipe: PPORecipe, code: FunctionScores | None) -> dict[str, float]:
    """Mean raw value of each reward function over its successful calls, and the failure count."""
    if code is None:
        return {}
    out = {"reward_function_failures": float(len(code.failures))}
    for j, spec in enumerate(recipe.reward_functions):
        col = code.raw[:, j]
        ok = col[torch.isfinite(col)]
        out[f"reward_fn/{spec.function.rpartition(':')[2]}"] = ok.mean().item() if len(ok) else math.nan
    return out
