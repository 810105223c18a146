"""Reward stage end to end on the demo task in one process: accuracy, export, hand-off, resume, LoRA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import REPO, reward_overrides
from rlhf.checkpoint import MANIFEST, HandoffError
from rlhf.config import RewardRecipe, load_recipe
from rlhf.demo import task
from rlhf.reward_metrics import pairwise_accuracy
from rlhf.sampling import render_conversation as encode
from rlhf.sampling import score_sequences
from rlhf.stages.reward import _side, prepare_reward_data, run_reward
from rlhf.tracking import METRICS_FILE, read_jsonl

QUICK = [
    "train.max_steps=80",
    "train.logging_steps=1",
    "train.eval_steps=40",
    "train.save_steps=40",
    "train.warmup_ratio=0.0",
]
THRESHOLD = 0.65  # chance is 0.5; the label noise caps accuracy near 0.9; see the closing note for runs


def recipe(assets: Path, sft: Path, out: Path, *extra: str) -> RewardRecipe:
    return load_recipe(
        RewardRecipe, REPO / "recipes/demo/reward.yaml", reward_overrides(assets, sft, out) + QUICK + list(extra)
    )


def labelled_file(path: Path) -> Path:
    """Single responses with ground-truth-derived labels: clearly good (1) or clearly bad (0)."""
    rng, rows = random.Random(7), []
    train, _ = task.split_prompts()
    while len(rows) < 80:
        p = rng.choice(train)
        r = task.sample_response(rng, task.item_of(p))
        s = task.score(p, r).total
        if s >= 66 or s <= 34:
            rows.append({"prompt": p, "response": r, "label": int(s >= 66)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def reward_run(demo_assets, sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    r = recipe(demo_assets, sft_dir, out, f"labelled.path={labelled_file(out / 'labelled.jsonl')}")
    return run_reward(r), r


def load_scorer(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reloaded_accuracy(out: Path, r: RewardRecipe) -> float:
    model, tok = load_scorer(out)
    splits, _ = prepare_reward_data(r, tok)
    rc = score_sequences(model, [encode(tok, _side(p, "chosen")) for p in splits.validation], tok.pad_token_id)
    rr = score_sequences(model, [encode(tok, _side(p, "rejected")) for p in splits.validation], tok.pad_token_id)
    return pairwise_accuracy(rc, rr)


def test_validation_accuracy_clearly_above_chance(reward_run):
    out, _ = reward_run
    v = json.loads((out / MANIFEST).read_text())["metrics"]["validation"]
    assert v["pairs"] > 150
    assert v["accuracy"] > THRESHOLD, v
    assert v["mean_margin"] > 0 and v["mean_chosen"] > v["mean_rejected"]


def test_manifest_links_sft_parent_and_stores_stats(reward_run, sft_dir):
    out, _ = reward_run
    m = json.loads((out / MANIFEST).read_text())
    assert m["stage"] == "reward"
    assert m["parents"][0]["stage"] == "sft" and m["parents"][0]["path"] == str(sft_dir.resolve())
    stats = m["reward_stats"]
    assert stats["n"] == m["datasets"]["train"] and stats["std"] > 0
    cal = m["metrics"]["calibration"]
    assert sum(b["count"] for b in cal["bins"]) == m["metrics"]["validation"]["pairs"]
    assert 0 <= cal["ece"] < 0.5
    lab = m["metrics"]["labelled"]
    assert lab["count"] == 80 and lab["precision"] > 0.6 and lab["recall"] > 0.6, lab
    assert m["datasets"]["ties"] == {"policy": "drop", "train": 0, "validation_dropped": 0, "test_dropped": 0}
    assert m["metrics"]["peak_memory_mb"] > 100  # the stage's peak RSS here (torch alone is more)


def test_export_reloads_as_scorer_and_reproduces_metrics(reward_run):
    out, r = reward_run
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    model, tok = load_scorer(out)
    assert model.config.num_labels == 1 and model.score.weight.shape[0] == 1
    # The exported weights are the ones evaluated: same accuracy recomputed from disk.
    manifest_acc = json.loads((out / MANIFEST).read_text())["metrics"]["validation"]["accuracy"]
    assert reloaded_accuracy(out, r) == pytest.approx(manifest_acc, abs=1e-6)
    good = "the pizza was great and lovely . i loved it ."
    bad = "the pizza was awful and dull . i hated it ."
    prompt = [{"role": "user", "content": "write a review of the pizza ."}]
    s = score_sequences(
        model, [encode(tok, prompt + [{"role": "assistant", "content": t}]) for t in (good, bad)], tok.pad_token_id
    )
    assert s[0] > s[1], s


def test_eval_metrics_are_logged(reward_run):
    out, _ = reward_run
    evals = [r for r in read_jsonl(out / METRICS_FILE) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [40, 80]


def test_refuses_a_directory_that_is_not_an_sft_output(demo_assets, tmp_path):
    with pytest.raises(HandoffError, match="has no rlhf_manifest.json"):
        run_reward(recipe(demo_assets, demo_assets / "base", tmp_path))


def test_refuses_an_output_of_another_stage(demo_assets, reward_run, tmp_path):
    """An SFT output starts a reward model, and a reward model continues (rlhf rounds); an RL
    policy does neither."""
    import shutil

    out, _ = reward_run
    policy = tmp_path / "ppo"
    shutil.copytree(out, policy, ignore=shutil.ignore_patterns("checkpoints"))
    manifest = json.loads((policy / MANIFEST).read_text())
    (policy / MANIFEST).write_text(json.dumps({**manifest, "stage": "ppo"}))
    with pytest.raises(HandoffError, match="expects a 'sft' or 'reward' output, but .* is a 'ppo' output"):
        run_reward(recipe(demo_assets, policy, tmp_path / "run"))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(demo_assets, sft_dir, tmp_path):
    from test_sft_recipe import StopAt, losses

    extra = [
        "train.max_steps=20",
        "train.save_steps=10",
        "train.eval_steps=0",
        "train.early_stopping_patience=0",
        "train.load_best_at_end=false",
    ]
    clean = run_reward(recipe(demo_assets, sft_dir, tmp_path / "clean", *extra))
    interrupted = recipe(demo_assets, sft_dir, tmp_path / "resumed", *extra)
    out = run_reward(interrupted, extra_callbacks=[StopAt(15)])
    assert not (out / MANIFEST).exists()
    run_reward(interrupted)
    a, b = losses(clean), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    ma = json.loads((clean / MANIFEST).read_text())["metrics"]["validation"]
    mb = json.loads((out / MANIFEST).read_text())["metrics"]["validation"]
    assert mb["accuracy"] == pytest.approx(ma["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_lora_trains_and_saves_the_head(demo_assets, sft_dir, tmp_path):
    r = recipe(
        demo_assets, sft_dir, tmp_path, "peft.enabled=true", "peft.r=8", "peft.alpha=16", "train.learning_rate=5e-3"
    )
    out = run_reward(r)
    m = json.loads((out / MANIFEST).read_text())
    assert m["peft"]["merged"] is True
    assert m["metrics"]["validation"]["accuracy"] > 0.6
    # If the head were not trained and saved, the reloaded model would score with a random head.
    assert reloaded_accuracy(out, r) == pytest.approx(m["metrics"]["validation"]["accuracy"], abs=1e-6)
