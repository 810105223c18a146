"""The GPU recipes cannot run here, so everything about them that can be checked without a GPU is:
they load, DeepSpeed accepts their configs, the models they name have the shapes and parameter
counts we claim (built on the meta device, no weights), and the memory estimate fits the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from rlhf import memory
from rlhf.config import load_recipe
from rlhf.config_rl import STAGES
from rlhf.config_run import PipelineRecipe
from rlhf.distributed import build_deepspeed_config

GPU_DIRS = sorted(p.parent for p in (REPO / "recipes").glob("*/architecture"))
# Published parameter counts of the models the recipes are written for.
PARAMS = {"qwen2.5-0.5b": 494_032_768, "llama3-8b": 8_030_261_248, "llama3-70b": 70_553_706_496}
GPU_GB = 80  # the recipes target 80 GB GPUs (A100 / H100 80GB)


def test_three_model_sizes_are_shipped():
    assert sorted(d.name for d in GPU_DIRS) == sorted(PARAMS)


def test_model_states_by_hand():
    psi = 10**9
    assert memory.model_states(psi, psi, 0, 1)["gpu"] == 16e9  # 2 + 2 + 12 bytes per parameter
    assert memory.model_states(psi, psi, 1, 4)["gpu"] == 4e9 + 3e9  # 2 + 2 + 12/4
    assert memory.model_states(psi, psi, 2, 4)["gpu"] == 2e9 + 14e9 / 4
    assert memory.model_states(psi, psi, 3, 8)["gpu"] == 2e9  # 16 / 8
    off = memory.model_states(psi, psi, 3, 8, offload_optimizer=True, offload_params=True)
    assert off == {"gpu": 2e9 / 8, "cpu": 14e9 / 8}
    assert memory.model_states(psi, 0, 3, 8)["gpu"] == 2e9 / 8  # frozen weights only
    assert memory.model_states(psi, psi, 0, 1, precision="fp32")["gpu"] == 16e9  # 4 + 4 + 8


def test_activations_and_kv_by_hand():
    shape = memory.Shape(params=0, hidden=10, layers=2, vocab=100, heads=2)
    # checkpointed: 2 s b h per layer kept + one layer recomputed (34 s b h) + fp32 logits and grad
    assert memory.activations(shape, 1, 4, True) == 2 * 40 * 2 + 34 * 40 + 8 * 4 * 100
    assert memory.activations(shape, 1, 4, False, logits=False) == 34 * 40 * 2
    assert memory.kv_cache(shape, kv_heads=1, batch=3, seq=4) == 2 * 2 * 2 * 3 * 4 * 1 * 5
    # an fp32 recipe (the CPU ones) holds 4-byte activations and cache; the logits were fp32 already
    assert memory.activations(shape, 1, 4, False, logits=False, precision="fp32") == 2 * 34 * 40 * 2
    assert memory.activations(shape, 1, 4, True, precision="fp32") == 2 * (2 * 40 * 2 + 34 * 40) + 8 * 4 * 100
    assert memory.kv_cache(shape, kv_heads=1, batch=3, seq=4, precision="fp32") == 2 * 4 * 2 * 3 * 4 * 1 * 5


@pytest.mark.parametrize("d", GPU_DIRS, ids=lambda d: d.name)
def test_model_builds_on_meta_with_the_claimed_size(d):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(d / "architecture", num_labels=1)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg)
        rm = AutoModelForSequenceClassification.from_config(cfg)
    n_lm = sum(p.numel() for p in lm.parameters())
    assert n_lm == PARAMS[d.name]
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert sum(p.numel() for p in rm.parameters()) == n_lm - head + cfg.hidden_size  # scalar head
    assert lm.lm_head.weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert len(lm.model.layers) == cfg.num_hidden_layers


@pytest.mark.parametrize("d", GPU_DIRS, ids=lambda d: d.name)
def test_deepspeed_accepts_every_stage_config(d):
    from deepspeed.runtime.config import DeepSpeedConfig as DSParsed

    pipe = load_recipe(PipelineRecipe, d / "pipeline.yaml")
    world = pipe.launcher.num_gpus * pipe.launcher.num_nodes
    for stage in ("sft", "reward", "ppo"):
        r = load_recipe(STAGES[stage], d / f"{stage}.yaml")
        cfg = build_deepspeed_config(r.deepspeed, r.train, world)
        assert cfg["train_batch_size"] == r.train.micro_batch_size * r.train.gradient_accumulation_steps * world
        assert cfg["zero_optimization"]["stage"] == r.deepspeed.zero_stage
        assert cfg["bf16"]["enabled"], f"{d.name}/{stage}: GPU recipes train in bf16"
        parsed = DSParsed(build_deepspeed_config(r.deepspeed, r.train, 1))  # the parser sees world size 1 here
        assert parsed.zero_optimization_stage == r.deepspeed.zero_stage
    if pipe.launcher.hostfile:
        hosts = [line.split() for line in Path(REPO / pipe.launcher.hostfile).read_text().splitlines() if line]
        assert len(hosts) == pipe.launcher.num_nodes and all(h[1] == f"slots={pipe.launcher.num_gpus}" for h in hosts)


@pytest.mark.parametrize("d", GPU_DIRS, ids=lambda d: d.name)
def test_memory_estimate_fits_the_gpu_and_is_written_in_the_recipe(d):
    est = memory.estimate_recipe_dir(d)
    for stage, s in est["stages"].items():
        assert s["total"] < 0.9 * GPU_GB, f"{d.name}/{stage}: {s['total']:.1f} GB per GPU"
        assert s["cpu_per_rank"] * 8 < 1000, f"{d.name}/{stage}: over 1 TB of CPU memory per node"
        assert f"# Estimated memory per GPU: {s['total']:.0f} GB" in (d / f"{stage}.yaml").read_text()
    lora = memory.estimate_recipe_dir(d, peft=True)
    assert lora["stages"]["sft"]["model_states"] <= est["stages"]["sft"]["model_states"]


def test_the_ppo_estimate_counts_what_the_run_builds():
    """kl_rollback's copy (trainable weights + AdamW states) while training; no critic for a
    critic-free estimator or a shared trunk; no reward model for rewards from functions alone."""
    from dataclasses import replace

    from transformers import AutoConfig

    from rlhf.config_rl import PPORecipe, RewardFunction

    d = REPO / "recipes/qwen2.5-0.5b"
    cfg = AutoConfig.from_pretrained(d / "architecture")
    r = load_recipe(PPORecipe, d / "ppo.yaml")
    assert r.deepspeed.zero_stage < 3 and r.train.precision == "bf16" and not r.peft.enabled

    def ppo(recipe) -> tuple[int, dict]:
        n, stages = memory._estimate_for_config(cfg, 1, {"ppo": recipe})
        return n, stages["ppo"]

    n, auto = ppo(r)
    _, never = ppo(replace(r, ppo=replace(r.ppo, kl_rollback="never")))
    assert auto["kl_rollback"] * memory.GB == pytest.approx((2 + 12) * n)  # bf16 weights, fp32 master + 2 moments
    assert never["kl_rollback"] == 0 and auto["total"] - never["total"] == pytest.approx(auto["kl_rollback"])
    grpo = replace(r, ppo=replace(r.ppo, advantage_estimator="grpo", rollouts_per_prompt=4))
    assert ppo(grpo)[1]["model_states"] == pytest.approx(auto["model_states"] / 2, rel=0.01)  # no critic
    shared = replace(r, ppo=replace(r.ppo, critic_trunk="shared"))  # the critic is a head on the actor
    assert ppo(shared)[1]["model_states"] == pytest.approx(auto["model_states"] / 2, rel=0.01)
    functions_only = replace(grpo, reward_dir=None, reward_functions=[RewardFunction("m:f")])
    assert ppo(functions_only)[1]["frozen_models"] == pytest.approx(ppo(grpo)[1]["frozen_models"] / 2, rel=0.01)


def test_the_estimate_of_a_finished_output_uses_its_own_recipe_and_measured_peak(sft_dir):
    """`estimate_memory.py --measured`: the recipe comes from the output's manifest, the shape from
    its config, and the measured peak with what it measures (here, on the CPU, the resident set)."""
    import json

    from rlhf.checkpoint import MANIFEST

    got = memory.estimate_stage_output(sft_dir)
    manifest = json.loads((sft_dir / MANIFEST).read_text())
    assert got["stage"] == "sft" and got["params"] > 0
    assert got["measured_gb"] == pytest.approx(manifest["metrics"]["peak_memory_mb"] * 2**20 / 1e9)
    assert got["measured_as"] == "peak resident set (CPU)" and got["estimate_gb"] > 0


def test_the_memory_account_sets_each_marked_phase_beside_its_estimated_parts():
    """Measured in use and peak growth per phase, by hand; the phases the estimate has no part
    for (the runtime, scoring, the export) say so rather than borrowing another's."""
    marks = {
        "start": {"now_mb": 400.0, "peak_mb": 420.0},
        "models": {"now_mb": 2000.0, "peak_mb": 2100.0},
        "generation": {"now_mb": 2050.0, "peak_mb": 2100.0},  # below the peak so far: no rise
        "scoring": {"now_mb": 2300.0, "peak_mb": 2600.0},
        "training": {"now_mb": 2400.0, "peak_mb": 3100.0},
    }
    parts = {"model_states": 1.0, "frozen_models": 0.5, "generation": 0.05, "activations": 0.3, "kl_rollback": 0.1}
    rows = {r["mark"]: r for r in memory.memory_account(marks, parts)}
    assert list(rows) == list(marks)
    mb = 2**20 / 1e9
    assert rows["start"]["now_gb"] == pytest.approx(400 * mb) and rows["start"]["estimated_gb"] is None
    assert rows["models"]["peak_rise_gb"] == pytest.approx(1680 * mb) and rows["models"]["estimated_gb"] == 1.5
    assert rows["generation"]["peak_rise_gb"] == 0.0 and rows["generation"]["estimated_gb"] == 0.05
    assert rows["scoring"]["peak_rise_gb"] == pytest.approx(500 * mb) and rows["scoring"]["parts"] == []
    assert rows["training"]["peak_rise_gb"] == pytest.approx(500 * mb)
    assert rows["training"]["estimated_gb"] == pytest.approx(0.4)
    assert memory.memory_account({}, parts) == []  # outputs made before the marks: no account
