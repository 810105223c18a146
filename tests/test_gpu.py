"""GPU-only checks (marker `gpu`): skipped without CUDA, never required for CI.

Run them on a GPU machine with `bash scripts/test.sh -m gpu`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, SFT_QUICK, demo_overrides
from rlhf.checkpoint import MANIFEST
from rlhf.config import SFTRecipe, load_recipe
from rlhf.stages.sft import run_sft

pytestmark = pytest.mark.gpu


def _sft(assets, out, *extra):
    r = load_recipe(
        SFTRecipe,
        REPO / "recipes/demo/sft.yaml",
        demo_overrides(assets, out)
        + SFT_QUICK
        + ["train.max_steps=8", "train.eval_steps=0", "train.early_stopping_patience=0", *extra],
    )
    return run_sft(r)


def test_qlora_sft_in_bf16_on_a_gpu_trains_and_merges(demo_assets, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = _sft(
        demo_assets,
        tmp_path,
        "peft.enabled=true",
        "peft.method=qlora",
        "train.precision=bf16",
        "train.learning_rate=1e-2",
        "train.save_steps=8",
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["type"] == "qlora" and manifest["peft"]["merged"] is True
    assert manifest["metrics"]["peak_memory_mb"] > 0  # torch.cuda.max_memory_allocated on a GPU
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda()
    assert torch.isfinite(merged(torch.tensor([[2, 10, 20, 1]], device="cuda")).logits).all()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning"])
def test_peft_methods_train_in_bf16_on_a_gpu(demo_assets, tmp_path, method):
    out = _sft(
        demo_assets,
        tmp_path,
        "peft.enabled=true",
        f"peft.method={method}",
        "train.precision=bf16",
        "train.learning_rate=1e-2",
        "train.save_steps=8",
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_the_run_process_gives_the_gpu_memory_of_its_sampling_back(reward_dir):
    """`rlhf rounds` scores pairs in its own process, then launches training stages as other
    processes: after scoring, nothing may stay reserved on the device."""
    from rlhf.rounds.candidates import score_pairs

    from rlhf.models import release_device_memory

    release_device_memory()  # what earlier tests left cached
    before = torch.cuda.memory_reserved()
    prompt = [{"role": "user", "content": "write a review of the pizza ."}]
    a, b = score_pairs(str(reward_dir), [prompt] * 64, ["good ."] * 64, ["bad ."] * 64)
    assert a.shape == b.shape == (64,) and a.device.type == "cpu"
    assert torch.cuda.memory_reserved() <= before  # the model and its activations went back
