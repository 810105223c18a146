"""The everyday tools: `rlhf export` (LoRA merge), `rlhf generate`, `rlhf chat`, `rlhf data prepare`."""

from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import REPO, demo_overrides
from rlhf.checkpoint import MANIFEST, HandoffError
from rlhf.cli import main
from rlhf.config import GenerationSettings, RewardRecipe, SFTRecipe, load_recipe


@pytest.fixture(scope="module")
def lora_adapter_run(demo_assets, tmp_path_factory):
    """SFT with LoRA exported as an adapter only (merge_on_export=false)."""
    from rlhf.stages.sft import run_sft

    out = tmp_path_factory.mktemp("lora")
    recipe = load_recipe(
        SFTRecipe,
        REPO / "recipes/demo/sft.yaml",
        demo_overrides(demo_assets, out)
        + [
            "peft.enabled=true",
            "peft.r=8",
            "peft.alpha=16",
            "peft.merge_on_export=false",
            "train.learning_rate=1e-2",
            "train.max_steps=10",
            "train.eval_steps=0",
            "train.early_stopping_patience=0",
            "train.save_steps=10",
        ],
    )
    return run_sft(recipe)


def test_export_merges_lora_and_matches_the_adapter_model(demo_assets, lora_adapter_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (lora_adapter_run / "adapter_config.json").is_file()
    assert main(["export", str(lora_adapter_run), str(tmp_path / "merged")]) == 0
    merged_dir = tmp_path / "merged"
    assert "standalone model" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets / "base"), lora_adapter_run)
    x = torch.tensor([[2, 10, 20, 30, 1, 3, 40, 50]])
    torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(demo_assets / "base")
    assert not torch.allclose(merged(x).logits, base(x).logits), "the adapter changed nothing"
    manifest = json.loads((merged_dir / MANIFEST).read_text())
    assert manifest["stage"] == "sft" and manifest["peft"]["merged"] is True
    assert manifest["exported"]["merged_lora"] is True
    assert (merged_dir / "tokenizer_config.json").is_file()


def test_export_refuses_to_overwrite(lora_adapter_run, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(lora_adapter_run), str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_generate_answers_every_prompt(sft_dir, demo_assets, tmp_path):
    out = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(sft_dir),
                "--prompts",
                str(demo_assets / "data/heldout_prompts.jsonl"),
                "--out",
                str(out),
                "--samples",
                "2",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 * 2
    assert all(r["prompt"][-1]["role"] == "user" and isinstance(r["response"], str) for r in rows)
    assert sum(bool(r["response"]) for r in rows) > 40


def test_chat_keeps_history_and_resets(sft_dir):
    from rlhf.generate import chat

    out = io.StringIO()
    chat(
        str(sft_dir),
        GenerationSettings(max_new_tokens=12),
        stdin=io.StringIO("write a review of the pizza .\n/reset\ntell me about the car .\n/quit\n"),
        stdout=out,
    )
    text = out.getvalue()
    assert text.count("model> ") == 2 and text.startswith("chatting with")


def test_data_prepare_cleans_splits_and_feeds_the_reward_stage(demo_assets, sft_dir, tmp_path, capsys):
    from rlhf.stages.reward import prepare_reward_data
    from rlhf.models import load_tokenizer

    raw = tmp_path / "raw.jsonl"
    rows = [json.loads(line) for line in (demo_assets / "data/preferences.jsonl").read_text().splitlines()[:100]]
    lines = [json.dumps(r) for r in rows] + [
        json.dumps(rows[0]),  # duplicate
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),  # identical sides
        "{not json",  # broken line
        json.dumps({"prompt": "p", "chosen": "x " * 300, "rejected": "y"}),  # too long
    ]
    raw.write_text("\n".join(lines) + "\n")
    assert (
        main(
            [
                "data",
                "prepare",
                str(raw),
                "--kind",
                "preference",
                "--out",
                str(tmp_path / "prepared"),
                "--validation",
                "0.1",
                "--max-length",
                "200",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "104 rows read, 2 bad, 0 empty, 1 too long, 1 duplicates" in printed
    assert "raw.jsonl:line 103" in printed  # each dropped bad row named with file and line
    report = json.loads((tmp_path / "prepared" / "report.json").read_text())
    assert (report["train"], report["validation"]) == (90, 10)
    # the files load in the reward stage with no conversion
    recipe = load_recipe(
        RewardRecipe,
        REPO / "recipes/demo/reward.yaml",
        [
            f"model.name_or_path={sft_dir}",
            f"data.sources.0.path={tmp_path / 'prepared' / 'train.jsonl'}",
            "data.bad_rows=error",
            "data.validation_fraction=0.1",
            "data.test_fraction=0.0",
            "demo_assets=null",
        ],
    )
    splits, _ = prepare_reward_data(recipe, load_tokenizer(str(sft_dir)))
    assert len(splits.train) + len(splits.validation) == 90


def test_export_of_a_missing_dir_is_a_clear_error(tmp_path):
    from rlhf.export import export

    with pytest.raises(HandoffError, match="is not a directory"):
        export(tmp_path / "nope", tmp_path / "out")
