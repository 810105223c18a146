"""The DPO stage (DPO, IPO, robust DPO, KTO) on the demo task: a few steps each, then the
export, the manifest, resume, and the hand-off refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO
from rlhf.checkpoint import MANIFEST
from rlhf.config import load_recipe
from rlhf.config_dpo import DPORecipe
from rlhf.data.formats import RowError, normalize_unpaired, unpair
from rlhf.data.io import DataError
from rlhf.errors import ConfigError, HandoffError
from rlhf.stages.dpo import check_tokenization, run_dpo

QUICK = [
    "train.max_steps=6",
    "train.micro_batch_size=8",
    "train.logging_steps=1",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.warmup_ratio=0.0",
    "train.learning_rate=1e-3",
]


def dpo_overrides(assets: Path, sft: Path, out: Path) -> list[str]:
    return [
        f"demo_assets={assets}",
        f"model.name_or_path={sft}",
        f"data.sources.0.path={assets / 'data' / 'preferences.jsonl'}",
        f"output_dir={out}",
        "tracking.wandb=false",
    ]


def recipe(assets: Path, sft: Path, out: Path, *extra: str) -> DPORecipe:
    return load_recipe(DPORecipe, REPO / "recipes/demo/dpo.yaml", dpo_overrides(assets, sft, out) + QUICK + list(extra))


def changed_weights(out: Path, sft: Path) -> float:
    """Largest absolute change of any weight between the export and the SFT model it started from."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sft).state_dict()
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


VARIANTS = {
    "dpo": [],
    "ipo": ["loss_type=ipo"],
    "robust_dpo": ["loss_type=robust", "label_smoothing=0.1"],
    "kto": ["method=kto", "loss_type=kto"],
}


# DPO itself in the fast tier; the other variants in the full suite.
@pytest.mark.parametrize("name", [n if n == "dpo" else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_each_loss_variant_trains_changes_the_model_and_exports(demo_assets, sft_dir, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_dpo(recipe(demo_assets, sft_dir, tmp_path, *VARIANTS[name]))
    m = json.loads((out / MANIFEST).read_text())
    assert m["stage"] == "dpo" and m["parents"][0]["stage"] == "sft"
    assert m["recipe"]["loss_type"] == (VARIANTS[name][0].split("=")[1] if VARIANTS[name] else "sigmoid")
    assert m["metrics"]["global_step"] == 6 and math.isfinite(m["metrics"]["train_loss"])
    assert math.isfinite(m["metrics"]["test"]["loss"]) and m["metrics"]["test"]["used_for"].startswith("nothing")
    assert m["metrics"]["peak_memory_mb"] > 0 and m["metrics"]["train_seconds"] > 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert changed_weights(out, sft_dir) > 1e-4
    # The export reloads on its own and answers a prompt in the chat format.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "what did you think of the pizza ?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    if name == "dpo":  # step 1: policy == reference (a separate copy), so the rewards are 0 and the loss log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    if name != "kto":  # a pairwise method reports the implicit reward's preference accuracy on held-out pairs
        assert 0.0 <= m["metrics"]["test"]["rewards/accuracies"] <= 1.0


@pytest.mark.slow
def test_lora_reference_is_the_adapter_switched_off_and_the_export_is_merged(demo_assets, sft_dir, tmp_path):
    out = run_dpo(recipe(demo_assets, sft_dir, tmp_path, "peft.enabled=true", "peft.r=8", "peft.alpha=16"))
    m = json.loads((out / MANIFEST).read_text())
    assert m["peft"]["merged"] is True and changed_weights(out, sft_dir) > 1e-5
    # The first logged step compares the policy with its reference: identical (adapter B = 0), so
    # the implicit rewards are 0 and the DPO loss is log 2 exactly.
    first = next(r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_best_checkpoint_by_held_out_preference_accuracy(demo_assets, sft_dir, tmp_path):
    """best_metric: accuracy keeps the checkpoint whose validation preference accuracy (TRL's
    rewards/accuracies) was highest; early stopping watches the same number."""
    out = run_dpo(
        recipe(
            demo_assets,
            sft_dir,
            tmp_path,
            "best_metric=accuracy",
            "train.load_best_at_end=true",
            "train.early_stopping_patience=5",
        )
    )
    m = json.loads((out / MANIFEST).read_text())
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_rewards/accuracies"] for h in state["log_history"] if "eval_rewards/accuracies" in h}
    assert sorted(evals) == [3, 6] and state["best_metric"] == max(evals.values())
    best_step = max(evals, key=lambda k: (evals[k], -k))  # the first of equals is kept
    assert m["metrics"]["best_checkpoint"].endswith(f"checkpoint-{best_step}")


def kto_file(path: Path) -> Path:
    """Single judged responses in every accepted label spelling, with one malformed row."""
    rows = []
    for i in range(60):
        good = i % 3 != 0
        label = [True, 1, "good", "yes"][i % 4] if good else [False, 0, "bad", "no"][i % 4]
        rows.append(
            {
                "prompt": f"what did you think of the pizza {i} ?",
                "completion": "the pizza was great . i loved it ." if good else "the pizza was bland .",
                "label": label,
            }
        )
    rows.append({"prompt": "broken", "completion": "x", "label": "maybe"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_kto_reads_single_judged_responses(demo_assets, sft_dir, tmp_path):
    data = kto_file(tmp_path / "kto.jsonl")
    out = run_dpo(
        recipe(demo_assets, sft_dir, tmp_path / "run", "method=kto", "loss_type=kto", f"data.sources.0.path={data}")
    )
    m = json.loads((out / MANIFEST).read_text())
    src = m["datasets"]["sources"][0]
    assert src["rows_read"] == 61 and src["bad"] == 1
    assert src["train"] + src["validation"] + src["test"] == 60


def test_unpaired_rows_normalise_and_pairs_split_after_the_splits():
    got = normalize_unpaired({"prompt": "p", "response": "r", "label": "Bad"})
    assert got == {
        "prompt": [{"role": "user", "content": "p"}],
        "completion": [{"role": "assistant", "content": "r"}],
        "label": False,
    }
    with pytest.raises(RowError, match="'label' must be"):
        normalize_unpaired({"prompt": "p", "completion": "r", "label": 2})
    with pytest.raises(RowError, match="needs 'completion'"):
        normalize_unpaired({"prompt": "p", "label": 1})
    pair = normalize_unpaired({"prompt": "p", "chosen": "a", "rejected": "b"})
    tie = normalize_unpaired({"prompt": "p", "chosen": "a", "rejected": "c", "tie": True})
    rows, ties = unpair([pair, tie, got])
    assert ties == 1
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("a", True), ("b", False), ("r", False)]


def test_tokenization_mismatch_names_the_example(demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "a b"}],
            "rejected": [{"role": "assistant", "content": "c"}],
        }
    ]
    from rlhf.sampling import render_conversation, render_prompt

    prompt = render_prompt(tok, rows[0]["prompt"])
    good = [
        {
            "prompt_ids": prompt,
            "chosen_ids": render_conversation(tok, rows[0]["prompt"] + rows[0]["chosen"])[len(prompt) :],
            "rejected_ids": render_conversation(tok, rows[0]["prompt"] + rows[0]["rejected"])[len(prompt) :],
        }
    ]
    check_tokenization(tok, rows, good, "train")  # agrees: no error
    bad = [{**good[0], "rejected_ids": good[0]["rejected_ids"][:-1]}]
    with pytest.raises(DataError, match="train example 0 \\(rejected\\): TRL's tokens differ"):
        check_tokenization(tok, rows, bad, "train")


def test_refuses_a_reward_model_as_parent(demo_assets, reward_dir, tmp_path):
    with pytest.raises(HandoffError, match="expects a 'sft' or 'pretrained' output, but .* is a 'reward' output"):
        run_dpo(recipe(demo_assets, reward_dir, tmp_path))


def test_refuses_a_different_tokenizer(demo_assets, sft_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(tmp_path / "other_tok")
    with pytest.raises(HandoffError, match="tokenizers of model.tokenizer .* and the SFT output .* differ"):
        run_dpo(recipe(demo_assets, sft_dir, tmp_path / "run", f"model.tokenizer={tmp_path / 'other_tok'}"))
    assert not (tmp_path / "run" / "dpo" / MANIFEST).exists()


@pytest.mark.parametrize(
    "bad,message",
    [
        (["loss_type=kto"], "not a dpo loss"),
        (["method=kto", "loss_type=ipo"], "not a kto loss"),
        (["label_smoothing=0.5"], "flip probability"),
        (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing is used by"),
        (["method=kto", "loss_type=kto", "train.micro_batch_size=1"], "micro_batch_size must be >= 2"),
        (["precompute_ref_log_probs=true"], "test split could not be scored"),
    ],
)
def test_recipe_errors_name_the_key(demo_assets, sft_dir, tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message):
        recipe(demo_assets, sft_dir, tmp_path, *bad)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(demo_assets, sft_dir, tmp_path):
    from test_sft_recipe import StopAt, losses

    extra = ["train.max_steps=12", "train.save_steps=6", "train.eval_steps=0"]
    clean = run_dpo(recipe(demo_assets, sft_dir, tmp_path / "clean", *extra))
    interrupted = recipe(demo_assets, sft_dir, tmp_path / "resumed", *extra)
    out = run_dpo(interrupted, extra_callbacks=[StopAt(9)])
    assert not (out / MANIFEST).exists()
    run_dpo(interrupted)
    a, b = losses(clean), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(7, 13):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(clean).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_pipeline_wires_dpo_beside_ppo_and_alone(tmp_path):
    from rlhf.config_run import PipelineRecipe
    from rlhf.pipeline import plan

    p = load_recipe(PipelineRecipe, REPO / "recipes/demo/pipeline_dpo_methods.yaml", [f"output_dir={tmp_path}"])
    stages = plan(p)
    assert [s.label for s in stages] == ["sft", "reward", "ppo", "dpo", "ipo", "robust_dpo", "kto", "eval"]
    assert f"model.name_or_path={tmp_path}/sft" in stages[3].overrides
    assert stages[4].out == tmp_path / "variants" / "ipo" / "dpo" and "loss_type=ipo" in stages[4].overrides
    ev = stages[-1].resolved
    assert [v["name"] for v in ev["rl_variants"]] == ["dpo", "ipo", "robust_dpo", "kto"]
    assert ev["ppo_dir"] == f"{tmp_path}/ppo" and ev["reward_dir"] == f"{tmp_path}/reward"
    # DPO alone: no reward model and no PPO, the evaluation judges by ground truth only.
    alone = load_recipe(
        PipelineRecipe,
        REPO / "recipes/demo/pipeline_dpo_methods.yaml",
        [f"output_dir={tmp_path}", "reward=null", "ppo=null"],
    )
    stages = plan(alone)
    assert [s.label for s in stages] == ["sft", "dpo", "ipo", "robust_dpo", "kto", "eval"]
    ev = stages[-1].resolved
    assert ev["reward_dir"] is None and ev["ppo_dir"] is None and ev["best_of_n"] == 0
    with pytest.raises(ConfigError, match="ppo stage needs a reward recipe"):
        load_recipe(PipelineRecipe, REPO / "recipes/demo/pipeline_dpo_methods.yaml", ["reward=null"])
