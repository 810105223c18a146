"""The whole pipeline as a user runs it: `rlhf pipeline` launching every stage under the real
deepspeed launcher (1 process), then evaluation; rerun skips, a changed recipe is refused, an
interrupted stage resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from rlhf.checkpoint import MANIFEST
from rlhf.errors import HandoffError

pytestmark = pytest.mark.distributed


def write_pipeline(assets: Path, out: Path, path: Path, ppo_steps: int = 4) -> Path:
    a = str(assets)
    common = [f"demo_assets={a}", "tracking.wandb=false"]
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "group": "pipe",
                "sft": str(REPO / "recipes/demo/sft.yaml"),
                "reward": str(REPO / "recipes/demo/reward.yaml"),
                "ppo": str(REPO / "recipes/demo/ppo.yaml"),
                "eval": str(REPO / "recipes/demo/eval.yaml"),
                "overrides": {
                    "sft": common
                    + [
                        f"model.name_or_path={a}/base",
                        f"data.sources.0.path={a}/data/sft.jsonl",
                        "train.max_steps=40",
                        "train.eval_steps=20",
                        "train.save_steps=20",
                    ],
                    "reward": common
                    + [
                        f"data.sources.0.path={a}/data/preferences.jsonl",
                        "train.max_steps=40",
                        "train.eval_steps=20",
                        "train.save_steps=20",
                    ],
                    "ppo": common
                    + [
                        f"prompts.sources.0.path={a}/data/prompts.jsonl",
                        f"train.max_steps={ppo_steps}",
                        "train.save_steps=2",
                        "ppo.rollout_batch_size=16",
                        "train.micro_batch_size=8",
                    ],
                    "eval": common
                    + [
                        f"base_dir={a}/base",
                        f"prompts.sources.0.path={a}/data/heldout_prompts.jsonl",
                        f"few_shot_data.path={a}/data/sft.jsonl",
                        "samples_per_prompt=2",
                    ],
                },
                "rl_variants": [
                    {"name": "grpo", "overrides": ["ppo.advantage_estimator=grpo", "ppo.rollouts_per_prompt=4"]}
                ],
            }
        )
    )
    return path


def rlhf(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return proc


@pytest.fixture(scope="module")
def pipeline_run(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    cfg = write_pipeline(demo_assets, out, tmp / "pipeline.yaml")
    proc = rlhf("pipeline", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cfg, out, proc


def test_every_stage_output_and_the_report_exist(pipeline_run):
    _, out, proc = pipeline_run
    for stage, parents in (
        ("sft", []),
        ("reward", ["sft"]),
        ("ppo", ["sft", "reward"]),
        ("eval", ["sft", "ppo", "ppo"]),
    ):  # the base has no manifest; PPO and the grpo variant
        m = json.loads((out / stage / MANIFEST).read_text())
        assert m["stage"] == stage
        assert [p["stage"] for p in m["parents"]] == parents, stage
        assert m["recipe"]["tracking"]["group"] == "pipe"  # one wandb group for the whole run
    for stage in ("sft", "reward", "ppo"):
        assert json.loads((out / stage / MANIFEST).read_text())["world_size"] == 1
        assert (out / "logs" / f"{stage}.log").is_file()
    report = (out / "eval" / "report.md").read_text()
    assert "| model | reward | win vs SFT | ground truth | KL to SFT |" in report
    for name in ("base", "sft", "ppo"):
        assert f"| {name} |" in report
    for png in ("ppo_curves.png", "lengths.png", "scores.png"):
        assert f"![{png}]({png})" in report
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "eval" / "report.json").read_text())["summary"]
    assert summary["sft"]["win_rate_vs_sft"] == 0.5 and summary["sft"]["kl_to_sft"] == pytest.approx(0, abs=1e-4)
    assert 0 <= summary["ppo"]["ground_truth"] <= 100 and summary["base"]["kl_to_sft"] > 0
    assert "[pipeline] report:" in proc.stdout and "ground_truth" in proc.stdout
    record = json.loads((out / "pipeline.json").read_text())["stages"]
    assert all(record[s]["status"] == "ran" for s in ("sft", "reward", "ppo", "eval"))


def test_rl_variants_train_beside_ppo_and_the_report_compares_them(pipeline_run):
    _, out, proc = pipeline_run
    manifest = json.loads((out / "variants" / "grpo" / "ppo" / MANIFEST).read_text())
    assert manifest["recipe"]["ppo"]["advantage_estimator"] == "grpo"
    assert [p["stage"] for p in manifest["parents"]] == ["sft", "reward"]
    assert manifest["parents"][0]["path"] == str(out / "sft")  # the same SFT and reward outputs as PPO
    summary = json.loads((out / "eval" / "report.json").read_text())["summary"]
    for name in ("ppo", "grpo"):
        assert summary[name]["train_seconds"] > 0 and summary[name]["peak_memory_mb"] > 100, name
        assert "ground_truth" in summary[name] and "kl_to_sft" in summary[name]
    report = (out / "eval" / "report.md").read_text()
    assert "## Methods side by side" in report and "- grpo: ground truth" in report
    assert "[pipeline] grpo: done" in proc.stdout


def test_rerun_skips_completed_stages(pipeline_run):
    cfg, out, _ = pipeline_run
    before = (out / "ppo" / MANIFEST).read_text()
    proc = rlhf("pipeline", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("sft", "reward", "ppo", "eval"):
        assert f"[pipeline] {stage}: complete in" in proc.stdout
    assert (out / "ppo" / MANIFEST).read_text() == before


def test_changed_recipe_is_refused_and_nothing_is_lost(pipeline_run):
    cfg, out, _ = pipeline_run
    proc = rlhf("pipeline", "--config", str(cfg), "overrides.sft=[train.max_steps=41]")
    assert proc.returncode == 2
    assert "was made by a different 'sft' recipe" in proc.stderr and "train.max_steps" in proc.stderr
    assert (out / "sft" / MANIFEST).is_file()


def test_bad_stage_recipe_fails_before_any_compute(pipeline_run, tmp_path):
    cfg, _, _ = pipeline_run
    proc = rlhf(
        "pipeline", "--config", str(cfg), f"output_dir={tmp_path / 'new'}", "overrides.eval=[samples_per_promt=3]"
    )
    assert proc.returncode == 2
    assert "pipeline stage 'eval'" in proc.stderr and "samples_per_promt" in proc.stderr
    assert not (tmp_path / "new" / "sft").exists()


def test_interrupted_stage_resumes(pipeline_run):
    """PPO killed after its step-2 state: the pipeline reruns only PPO, which resumes from step 2."""
    import shutil

    cfg, out, _ = pipeline_run
    (out / "ppo" / MANIFEST).unlink()
    shutil.rmtree(out / "ppo" / "checkpoints" / "step-4")
    proc = rlhf("pipeline", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[pipeline] reward: complete" in proc.stdout and "[pipeline] ppo: running" in proc.stdout
    assert "[pipeline] eval: running" in proc.stdout  # its PPO parent changed: the report is redone
    assert "resumed PPO from" in (out / "logs" / "ppo.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # steps 3-4 logged again after the resume, once each
    assert (out / "ppo" / MANIFEST).is_file()


def test_a_setting_added_after_an_output_was_made_does_not_invalidate_it():
    """Upgrading rlhf adds recipe keys with defaults that keep the old behaviour: a finished stage
    whose manifest predates a key is still complete; a changed value is still a difference."""
    from rlhf.pipeline import _diff

    then = {"train": {"max_steps": 60}, "ppo": {"kl_coef": 0.05}}
    now = {"train": {"max_steps": 60}, "ppo": {"kl_coef": 0.05, "new_knob": 0}, "model": {"autocast": "none"}}
    assert _diff(then, now) == []
    assert _diff(then, {**now, "train": {"max_steps": 61}}) == ["train.max_steps: 60 then, 61 now"]
    assert _diff({**then, "gone": 1}, now) == ["gone: 1 then, None now"]


def test_an_evaluation_made_by_another_recipe_is_redone_not_refused(tmp_path):
    """Evaluation keeps no state: a new method in the comparison reruns it. A training stage made by
    another recipe is still refused (its output may be worth keeping)."""
    from rlhf.checkpoint import write_manifest
    from rlhf.config import load_recipe
    from rlhf.config_run import PipelineRecipe
    from rlhf.pipeline import is_complete, plan

    p = load_recipe(PipelineRecipe, REPO / "recipes/demo/pipeline_dpo_methods.yaml", [f"output_dir={tmp_path}"])
    stages = {s.label: s for s in plan(p)}
    for label in ("eval", "sft"):
        old = dict(stages[label].resolved, seed=12345)  # the same recipe but for one value
        stages[label].out.mkdir(parents=True)
        write_manifest(stages[label].out, stage=label, recipe=old, started_at="then")
    assert is_complete(stages["eval"]) is False
    with pytest.raises(HandoffError, match="made by a different 'sft' recipe"):
        is_complete(stages["sft"])
