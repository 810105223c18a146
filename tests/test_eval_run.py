"""`rlhf eval` in one process on the session's SFT and reward outputs: a held-out reward model,
an extra few-shot policy, the report's files, and the hand-off refusals."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from rlhf.checkpoint import MANIFEST, HandoffError
from rlhf.config import load_recipe
from rlhf.config_run import EvalRecipe
from rlhf.eval.run import run_eval


def recipe(assets, sft, reward, out, *extra) -> EvalRecipe:
    return load_recipe(
        EvalRecipe,
        REPO / "recipes/demo/eval.yaml",
        [
            f"demo_assets={assets}",
            f"base_dir={assets / 'base'}",
            f"sft_dir={sft}",
            "ppo_dir=null",
            f"reward_dir={reward}",
            f"prompts.sources.0.path={assets / 'data/heldout_prompts.jsonl'}",
            f"few_shot_data.path={assets / 'data/sft.jsonl'}",
            f"output_dir={out}",
            "tracking.wandb=false",
            "samples_per_prompt=2",
            "generation.max_new_tokens=12",
            *extra,
        ],
    )


def test_eval_with_heldout_reward_model_and_extra_policy(demo_assets, sft_dir, reward_dir, tmp_path):
    out = run_eval(
        recipe(
            demo_assets,
            sft_dir,
            reward_dir,
            tmp_path,
            f"heldout_reward_dir={reward_dir}",
            f"extra_policies=[{{name: sft_fewshot, path: {sft_dir}, few_shot: 1}}]",
        )
    )
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert list(s) == ["base", "sft", "sft_fewshot"]
    # the same model as judge and held-out judge must agree exactly
    for row in s.values():
        assert row["heldout_reward_mean"] == pytest.approx(row["reward_mean"], abs=1e-6)
    assert report["prompts"] == 24 and len(report["samples"]) == 3 * 24 * 2
    assert s["sft_fewshot"]["kl_to_sft"] != pytest.approx(0.0, abs=1e-3)  # demonstrations change the answers
    md = (out / "report.md").read_text()
    assert "| held-out RM |" in md
    assert "ppo_curves.png" not in md and (out / "lengths.png").is_file()  # no PPO: no curves
    m = json.loads((out / MANIFEST).read_text())
    assert m["stage"] == "eval" and [p["stage"] for p in m["parents"]] == ["sft", "sft"]


def test_eval_refuses_wrong_stage_outputs(demo_assets, sft_dir, reward_dir, tmp_path):
    with pytest.raises(HandoffError, match="expects a 'ppo' or 'dpo' output"):
        run_eval(recipe(demo_assets, sft_dir, reward_dir, tmp_path, f"ppo_dir={sft_dir}"))
    with pytest.raises(HandoffError, match="expects a 'reward' output"):
        run_eval(recipe(demo_assets, sft_dir, sft_dir, tmp_path))


def test_best_of_n_row_and_forgetting_measure(demo_assets, sft_dir, reward_dir, tmp_path):
    """Best-of-n keeps the reward model's pick among n SFT samples (so its mean reward is at least
    SFT's) with the analytic KL; forgetting is 0 for the base model itself and finite for SFT."""
    import math

    questions = tmp_path / "general.jsonl"
    questions.write_text(
        "".join(json.dumps({"prompt": f"tell me about the {x} ."}) + "\n" for x in ("pizza", "movie", "hotel"))
    )
    out = run_eval(
        recipe(
            demo_assets,
            sft_dir,
            reward_dir,
            tmp_path,
            "best_of_n=4",
            "base_few_shot=0",
            f"forgetting_prompts={{path: {questions}}}",
            "forgetting_max_new_tokens=8",
            "forgetting_limit=0.025",
        )
    )
    s = json.loads((out / "report.json").read_text())["summary"]
    rise = s["sft"]["forgetting_ppl_rise"]
    verdict = "over the 2.5% limit: sft." if rise > 0.025 else "all within 2.5%."
    assert f"sft {100 * rise:+.1f}%; {verdict}" in (out / "report.md").read_text()  # the recipe's limit
    assert list(s) == ["base", "sft", "sft_best_of_4"]
    assert s["sft_best_of_4"]["reward_mean"] >= s["sft"]["reward_mean"]
    assert s["sft_best_of_4"]["kl_to_sft"] == pytest.approx(math.log(4) - 3 / 4)
    assert s["base"]["forgetting_ppl_rise"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(s["sft"]["forgetting_ppl_rise"]) and s["sft"]["forgetting_ppl_rise"] != 0.0
    assert "forgetting_ppl_rise" not in s["sft_best_of_4"]  # the SFT weights: measured once, in the SFT row


def test_eval_without_a_reward_model_reports_ground_truth_only(demo_assets, sft_dir, tmp_path):
    """Verifiable-reward runs have no reward model: rewards are n/a, no win rates, ground truth stays."""
    import math

    out = run_eval(recipe(demo_assets, sft_dir, None, tmp_path, "reward_dir=null", "base_dir=null"))
    s = json.loads((out / "report.json").read_text())["summary"]
    assert list(s) == ["sft"]
    assert math.isnan(s["sft"]["reward_mean"]) and "win_rate_vs_sft" not in s["sft"]
    assert 0.0 <= s["sft"]["ground_truth"] <= 100.0
    assert "No reward model" in (out / "report.md").read_text()
    with pytest.raises(Exception, match="best_of_n needs reward_dir"):
        recipe(demo_assets, sft_dir, None, tmp_path, "reward_dir=null", "best_of_n=4")


def test_greedy_eval_gives_one_seed_free_answer_per_prompt(demo_assets, sft_dir, tmp_path):
    """greedy: true answers each prompt once with the most likely tokens: the seed changes nothing,
    and the KL column is n/a (greedy answers are not samples of the policy)."""
    import math

    def run(seed: int, *extra: str) -> dict:
        out = tmp_path / f"{seed}{'_'.join(extra)}"
        done = run_eval(
            recipe(demo_assets, sft_dir, None, out, "reward_dir=null", "base_dir=null", f"seed={seed}", *extra)
        )
        return json.loads((done / "report.json").read_text()) | {"md": (done / "report.md").read_text()}

    a, b = run(0, "greedy=true"), run(1, "greedy=true")
    prompts = a["prompts"]
    assert a["samples_per_prompt"] == 1 and a["greedy"] is True
    assert a["policies"][0]["n"] == prompts
    assert a["summary"] == b["summary"]
    assert math.isnan(a["summary"]["sft"]["kl_to_sft"])
    assert "one greedy answer per model" in a["md"]
    sampled = run(1)  # the same run sampled: two answers per prompt, a finite KL (0 for SFT itself)
    assert sampled["policies"][0]["n"] == 2 * prompts and sampled["summary"]["sft"]["kl_to_sft"] == 0.0
    with pytest.raises(Exception, match="cannot be combined with greedy"):
        recipe(demo_assets, sft_dir, None, tmp_path, "greedy=true", "best_of_n=4")
