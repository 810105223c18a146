"""The real `deepspeed` launcher with 2 CPU processes (gloo): ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, demo_overrides, free_port, ppo_overrides, reward_overrides
from rlhf.checkpoint import MANIFEST

pytestmark = pytest.mark.distributed
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def launch(script: str, recipe: str, overrides: list[str], log: Path, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        str(procs),
        "--master_port",
        str(free_port()),
        str(REPO / script),
        "--config",
        str(REPO / recipe),
        *overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}); tail:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc


# ZeRO-3 only for SFT and the reward model: ZeRO-2 through the same Trainer + DeepSpeed path and
# export is covered by the DPO stage's ZeRO-2 run below, and ZeRO-3 is the case with shards to gather.
@pytest.mark.parametrize("zero", [3])
def test_sft_under_deepspeed_launcher(demo_assets, tmp_path, zero):
    from transformers import AutoModelForCausalLM
    import torch

    out = tmp_path / "run"
    launch(
        "scripts/train_sft.py",
        "recipes/demo/sft.yaml",
        demo_overrides(demo_assets, out)
        + [
            f"deepspeed.zero_stage={zero}",
            "train.max_steps=8",
            "train.micro_batch_size=8",
            "train.save_steps=4",
            "train.eval_steps=4",
            "train.logging_steps=1",
        ],
        tmp_path / "log.txt",
    )
    manifest = json.loads((out / "sft" / MANIFEST).read_text())
    assert manifest["world_size"] == 2
    assert manifest["recipe"]["deepspeed"]["zero_stage"] == zero
    assert manifest["metrics"]["global_step"] == 8
    # Under ZeRO-3 the export must gather the shards into full tensors.
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    base = AutoModelForCausalLM.from_pretrained(demo_assets / "base")
    for k, v in base.state_dict().items():
        got = model.state_dict()[k]
        assert got.shape == v.shape and torch.isfinite(got).all(), k
    assert not torch.equal(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"]
    )
    ckpt = out / "sft" / "checkpoints" / "checkpoint-8"
    assert ckpt.is_dir() and any(ckpt.glob("global_step*")), "DeepSpeed engine state missing from the checkpoint"


@pytest.mark.parametrize("zero", [3])
def test_reward_under_deepspeed_launcher(demo_assets, sft_dir, tmp_path, zero):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    launch(
        "scripts/train_reward.py",
        "recipes/demo/reward.yaml",
        reward_overrides(demo_assets, sft_dir, out)
        + [
            f"deepspeed.zero_stage={zero}",
            "train.max_steps=8",
            "train.micro_batch_size=8",
            "train.save_steps=4",
            "train.eval_steps=4",
            "train.logging_steps=1",
        ],
        tmp_path / "log.txt",
    )
    manifest = json.loads((out / "reward" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["recipe"]["deepspeed"]["zero_stage"] == zero
    assert manifest["parents"][0]["stage"] == "sft"
    v = manifest["metrics"]["validation"]
    assert v["pairs"] > 150 and 0.0 <= v["accuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward")
    assert model.score.weight.shape == (1, model.config.hidden_size)


@pytest.mark.parametrize("zero,method", [(2, "dpo"), (3, "dpo"), (3, "kto")])
def test_dpo_stage_under_deepspeed_launcher(demo_assets, sft_dir, tmp_path, zero, method):
    """DPO and KTO with a separate reference copy under ZeRO-2/3 on 2 processes: the reference is
    sharded like the policy, the export gathers full weights, and the held-out metrics are written."""
    from transformers import AutoModelForCausalLM
    import torch

    from test_dpo_recipe import dpo_overrides

    out = tmp_path / "run"
    launch(
        "scripts/train_dpo.py",
        "recipes/demo/dpo.yaml",
        dpo_overrides(demo_assets, sft_dir, out)
        + [
            f"deepspeed.zero_stage={zero}",
            "train.max_steps=6",
            "train.micro_batch_size=8",
            "train.save_steps=3",
            "train.eval_steps=3",
            "train.logging_steps=1",
            "train.learning_rate=1e-3",
            f"method={method}",
            f"loss_type={'sigmoid' if method == 'dpo' else 'kto'}",
        ],
        tmp_path / "log.txt",
    )
    manifest = json.loads((out / "dpo" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["recipe"]["deepspeed"]["zero_stage"] == zero
    assert manifest["parents"][0]["stage"] == "sft" and manifest["metrics"]["global_step"] == 6
    assert math.isfinite(manifest["metrics"]["test"]["loss"])
    if method == "dpo":
        assert 0.0 <= manifest["metrics"]["test"]["rewards/accuracies"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(out / "dpo").state_dict()
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    assert all(model[k].shape == v.shape and torch.isfinite(model[k]).all() for k, v in sft.items())
    assert max((model[k] - v).abs().max().item() for k, v in sft.items()) > 1e-4


@pytest.mark.parametrize("zero,lora", [(2, False), (3, False), (3, True)])
def test_ppo_under_deepspeed_launcher(demo_assets, sft_dir, reward_dir, tmp_path, zero, lora):
    from transformers import AutoModelForCausalLM
    import torch

    out = tmp_path / "run"
    launch(
        "scripts/train_ppo.py",
        "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, out)
        + [
            f"deepspeed.zero_stage={zero}",
            "train.max_steps=3",
            "train.save_steps=2",
            f"peft.enabled={str(lora).lower()}",
        ],
        tmp_path / "log.txt",
    )
    manifest = json.loads((out / "ppo" / MANIFEST).read_text())
    assert (manifest["peft"] or {}).get("merged", False) is lora
    assert manifest["world_size"] == 2 and manifest["recipe"]["deepspeed"]["zero_stage"] == zero
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(out / "ppo")
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    for k, v in sft.state_dict().items():
        got = model.state_dict()[k]
        assert got.shape == v.shape and torch.isfinite(got).all(), k
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in sft.state_dict().items())
    # each rank wrote its RNG state into the complete checkpoint
    assert sorted(p.name for p in (out / "ppo" / "checkpoints" / "step-3").glob("rng_rank*.pt")) == [
        "rng_rank0.pt",
        "rng_rank1.pt",
    ]
    if zero == 3 and lora:
        _continue_under_zero3(demo_assets, sft_dir, reward_dir, tmp_path, out / "ppo", rows[0])


def _continue_under_zero3(demo_assets, sft_dir, reward_dir, tmp_path, first, first_step):
    """A new run continues the ZeRO-3 LoRA run (`continue_from`, as a round of `rlhf rounds` does):
    its partitioned actor, critic and their optimizer states load, so its first rollout is already
    away from the reference, where a fresh run's first rollout is the reference itself."""
    out = tmp_path / "continued"
    proc = launch(
        "scripts/train_ppo.py",
        "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, out)
        + [
            "deepspeed.zero_stage=3",
            "peft.enabled=true",
            "train.max_steps=1",
            f"continue_from={{path: {first}, critic: true, optimizer: true}}",
        ],
        tmp_path / "log_continued.txt",
    )
    assert (
        "continuing from" in proc.stdout + proc.stderr
        and "actor, critic with optimizer states" in proc.stdout + proc.stderr
    )
    (row,) = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert abs(first_step["kl"]) < 1e-6
    assert abs(row["kl"]) > 1e-3
    assert json.loads((out / "ppo" / MANIFEST).read_text())["recipe"]["continue_from"]["path"] == str(first)


@pytest.mark.parametrize("zero,estimator", [(2, "grpo"), (3, "rloo")])
def test_critic_free_estimators_under_deepspeed_launcher(demo_assets, sft_dir, reward_dir, tmp_path, zero, estimator):
    """2 processes, no critic, the reward model mixed with a reward function (each rank has its
    own function process): trains, checkpoints without a critic, and every rank agrees on the KL
    coefficient and the function's normaliser."""
    fn = tmp_path / "len_reward.py"
    fn.write_text("def short(prompt, response, **fields):\n    return -float(len(response.split()))\n")
    out = tmp_path / "run"
    launch(
        "scripts/train_ppo.py",
        "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, out)
        + [
            f"deepspeed.zero_stage={zero}",
            "train.max_steps=3",
            "train.save_steps=2",
            "ppo.rollouts_per_prompt=4",
            f"ppo.advantage_estimator={estimator}",
            "ppo.kl_target=0.5",
            "ppo.kl_horizon=200",
            f"reward_functions=[{{function: '{fn}:short', weight: 0.5}}]",
        ],
        tmp_path / "log.txt",
    )
    manifest = json.loads((out / "ppo" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["recipe"]["ppo"]["advantage_estimator"] == estimator
    rows = _metrics(out / "ppo" / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3]
    assert all(r["rank_spread/kl_coef"] == 0.0 and r["reward_function_failures"] == 0 for r in rows.values())
    assert all(
        r["rank_spread/reward_fn_norm_mean_0"] == r["rank_spread/reward_fn_norm_std_0"] == 0.0 for r in rows.values()
    )
    assert all("value_loss" not in r and r["reward_fn/short"] < 0 for r in rows.values())
    state = out / "ppo" / "checkpoints" / "step-3"
    assert (state / "actor").is_dir() and not (state / "critic").exists()


def _metrics(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_ppo_two_processes_share_statistics_and_resume_exactly_after_kill_9(demo_assets, sft_dir, reward_dir, tmp_path):
    """2 processes with an adaptive KL controller and a running reward normaliser: every rank holds
    the same coefficient and normaliser after every step, and a run killed with SIGKILL mid-step
    resumes to exactly the metrics and weights of an uninterrupted 2-process run."""
    import signal
    import time

    import torch
    from transformers import AutoModelForCausalLM

    steps = [
        "train.max_steps=5",
        "train.save_steps=2",
        "ppo.kl_target=0.5",
        "ppo.kl_horizon=200",
        "ppo.reward_normalization=running",
        "ppo.rollout_batch_size=8",
        "generation.max_new_tokens=12",
    ]
    clean = tmp_path / "clean"
    launch(
        "scripts/train_ppo.py",
        "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, clean) + steps,
        tmp_path / "clean.log",
    )
    rows = _metrics(clean / "ppo" / "metrics.jsonl")
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for step, r in rows.items():
        for key in ("kl_coef", "reward_norm_mean", "reward_norm_std", "reward_norm_count"):
            assert r[f"rank_spread/{key}"] == 0.0, (step, key)
    assert rows[5]["kl_coef"] != rows[1]["kl_coef"], "the controller never moved: the test would prove nothing"

    killed = tmp_path / "killed"
    cmd = [
        str(DEEPSPEED),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "scripts/train_ppo.py"),
        "--config",
        str(REPO / "recipes/demo/ppo.yaml"),
        *ppo_overrides(demo_assets, sft_dir, reward_dir, killed),
        *steps,
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not (killed / "ppo" / "checkpoints" / "step-2" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first state"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid step 3: no goodbye, no flush
        proc.wait()
    assert not (killed / "ppo" / MANIFEST).exists()
    launch(
        "scripts/train_ppo.py",
        "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, killed) + steps,
        tmp_path / "resumed.log",
    )
    resumed = _metrics(killed / "ppo" / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4, 5], "each step logged once"
    for step in (3, 4, 5):
        for key in ("reward_mean", "kl", "kl_coef", "policy_loss", "value_loss", "score_mean"):
            assert resumed[step][key] == pytest.approx(rows[step][key], rel=1e-5, abs=1e-6), (step, key)
    a = AutoModelForCausalLM.from_pretrained(clean / "ppo").state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed / "ppo").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    (tmp_path / "resume_diff.txt").write_text(f"{worst}\n")
    assert worst <= 1e-6, worst
    assert all(torch.isfinite(v).all() for v in b.values())
