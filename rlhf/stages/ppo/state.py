"""Full PPO training state on disk: written atomically, read back exactly.

A state directory `step-N/` holds the DeepSpeed engines' checkpoints (actor, and critic if any) (weights, optimizer,
scheduler: each rank writes its shards), `trainer_state.json` (step, KL controller, reward
normaliser, consecutive bad steps) and one RNG file per rank. It is written as `step-N.tmp` and
renamed only after every rank finished, so a crash during a save leaves the previous state as the
newest complete one. The data position needs no saving: the prompt order is a pure function of
the seed and the step.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf import distributed
from rlhf.errors import HandoffError

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_states(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete state, oldest first; `.tmp` leftovers of a crash are ignored."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_state(root: Path, step: int, actor, critic, trainer_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank must call it. Returns the final directory."""
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    actor.save_checkpoint(str(tmp / "actor"), tag="state")
    if critic is not None:
        critic.save_checkpoint(str(tmp / "critic"), tag="state")
    torch.save(rng_state(), tmp / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in complete_states(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_state(path: Path, actor, critic) -> dict[str, Any]:
    """Restore engines, this rank's RNG, and return the trainer state dict."""
    has_critic = (path / "critic").is_dir()
    if has_critic != (critic is not None):
        raise HandoffError(
            f"{path} was saved by a run {'with' if has_critic else 'without'} a critic model of its own, but "
            f"this recipe {'has none' if has_critic else 'has one'} (ppo.advantage_estimator, ppo.critic_trunk); "
            "resume with the recipe that made it, or start over with resume=never (or another output_dir)"
        )
    actor.load_checkpoint(str(path / "actor"), tag="state")
    if critic is not None:
        critic.load_checkpoint(str(path / "critic"), tag="state")
    rng_file = path / f"rng_rank{distributed.rank()}.pt"
    if not rng_file.is_file():
        raise HandoffError(
            f"{path} was saved with a different number of processes (no {rng_file.name}); "
            "resume with the same world size, or start over with resume=never"
        )
    set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())
