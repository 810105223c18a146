"""The exact-answer tasks for checking defaults across tasks (`reverse`, `pick`): graders,
demonstrations, annotators and the held-out split, by hand."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.tasks import GRADERS, pick, reverse


@pytest.mark.parametrize(
    "response,score",
    [("t k b p", 100.0), (" t k b p .", 100.0), ("tkbp", 0.0), ("t k p b", 0.0), ("t k b", 0.0), ("", 0.0)],
)
def test_reverse_grades_exact_letters_only(response, score):
    prompt = "write backwards : p b k t"
    assert reverse.answer_of(prompt) == "t k b p"
    assert GRADERS["reverse"](prompt, response, False) == score


def test_reverse_annotator_prefers_right_length_then_placed_letters():
    prompt = "reverse the letters : r k p"  # answer "p k r"
    quiet = random.Random(0)
    assert reverse.placed(prompt, "p k r") == (1, 3)
    assert reverse.placed(prompt, "p r") == (0, 1)
    assert reverse.annotator_prefers(quiet, prompt, "p r k", "p k", noise=0.0) == 0  # length first
    assert reverse.annotator_prefers(quiet, prompt, "k p r", "p k r", noise=0.0) == 1
    assert reverse.annotator_prefers(quiet, prompt, "k p r", "r k p", noise=0.0) is None
    assert reverse.annotator_prefers(quiet, prompt, "k p r", "p k r", noise=1.0) == 0  # always flipped


@pytest.mark.parametrize(
    "prompt,response,score",
    [
        ("which one is the fruit : desk plum red ?", "plum", 100.0),
        ("which one is the fruit : desk plum red ?", "plum .", 100.0),
        ("which one is the fruit : desk plum red ?", "desk", 0.0),
        ("pick the colour : cat red saw", "red cat", 0.0),
        ("pick the colour : cat red saw", "", 0.0),
    ],
)
def test_pick_grades_the_one_right_word(prompt, response, score):
    assert GRADERS["pick"](prompt, response, False) == score


def test_pick_annotator_skips_ties_and_flips_its_noise():
    prompt = "pick the animal : owl sofa lime"
    quiet = random.Random(0)
    assert pick.annotator_prefers(quiet, prompt, "sofa", "owl", noise=0.0) == 1
    assert pick.annotator_prefers(quiet, prompt, "sofa", "lime", noise=0.0) is None
    assert pick.annotator_prefers(quiet, prompt, "owl", "sofa", noise=1.0) == 1


@pytest.mark.parametrize("task,n_sft,p_right", [(reverse, 900, 0.7), (pick, 600, 0.65)])
def test_files_hold_out_their_questions_and_demonstrations_are_imperfect(tmp_path, task, n_sft, p_right):
    counts = task.build_data(tmp_path, seed=1)
    rows = {n: [json.loads(line) for line in (tmp_path / n).read_text().splitlines()] for n in counts}
    assert counts == {
        "sft.jsonl": n_sft,
        "preferences.jsonl": n_sft,
        "prompts.jsonl": 300,
        "heldout_prompts.jsonl": 100,
    }
    held = {r["prompt"] for r in rows["heldout_prompts.jsonl"]}
    trained = {r["prompt"] for n in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl") for r in rows[n]}
    assert not held & trained
    # held out by question, not only by prompt text: no held-out question in another phrasing either
    key = (lambda p: " ".join(task.letters_of(p))) if task is reverse else (lambda p: task.question_of(p))
    assert not {str(key(p)) for p in held} & {str(key(p)) for p in trained}
    right = [task.score(r["prompt"], r["completion"]) == 100 for r in rows["sft.jsonl"]]
    assert abs(sum(right) / len(right) - p_right) < 0.06
    chosen_better = [
        task.score(r["prompt"], r["chosen"]) >= task.score(r["prompt"], r["rejected"])
        for r in rows["preferences.jsonl"]
    ]
    assert 0.8 < sum(chosen_better) / len(chosen_better) < 0.97  # noisy labels, mostly right
    task.build_data(tmp_path / "again", seed=1)
    assert (tmp_path / "again" / "sft.jsonl").read_text() == (tmp_path / "sft.jsonl").read_text()


def test_tasks_build_writes_both_from_the_cli(tmp_path):
    for name in ("reverse", "pick"):
        out = subprocess.run(
            [sys.executable, "-m", "rlhf.cli", "tasks", "build", name, "--out", str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "heldout_prompts.jsonl: 100 rows" in out
        assert (tmp_path / name / "sft.jsonl").is_file()


def test_eval_recipe_accepts_the_new_graders(tmp_path):
    from rlhf.config_loader import load_recipe
    from rlhf.config_run import EvalRecipe

    for name in ("reverse", "pick"):
        recipe = load_recipe(EvalRecipe, "recipes/demo/eval.yaml", [f"ground_truth={name}"])
        assert recipe.ground_truth == name


def test_cross_task_changes_only_the_data_paths_of_the_demo_recipes(tmp_path):
    """scripts/cross_task.py must measure the demo recipes as they ship: the planned stages of a
    task differ from the demo's own plan only in data paths, where the assets are and the grader."""
    import importlib.util

    from rlhf.config_loader import load_recipe
    from rlhf.config_run import PipelineRecipe
    from rlhf.pipeline import plan

    spec = importlib.util.spec_from_file_location("cross_task", "scripts/cross_task.py")
    cross_task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross_task)
    data = tmp_path / "reverse" / "data"
    reverse.build_data(data)
    path = cross_task.pipeline_recipe("reverse", data, tmp_path / "run", tmp_path / "assets", {})
    ours = {s.label: s.resolved for s in plan(load_recipe(PipelineRecipe, path))}
    demo = {
        s.label: s.resolved
        for s in plan(load_recipe(PipelineRecipe, "recipes/demo/pipeline.yaml", [f"output_dir={tmp_path / 'run'}"]))
    }
    assert ours.keys() == demo.keys() == {"sft", "reward", "ppo", "eval"}

    def differences(a, b, where=""):
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in a.keys() | b.keys() for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
        return [] if a == b else [where]

    allowed = {".demo_assets", ".model.name_or_path", ".base_dir", ".ground_truth", ".few_shot_data.path"}
    for stage in ours:
        changed = {
            d for d in differences(ours[stage], demo[stage]) if not d.startswith((".data.sources", ".prompts.sources"))
        }
        assert changed <= allowed, (stage, changed)
    assert ours["sft"]["data"]["sources"][0]["path"] == str(data / "sft.jsonl")
    assert ours["eval"]["ground_truth"] == "reverse"
    assert ours["sft"]["train"]["early_stopping_patience"] > 0  # the shipped rule, not a fixed epoch count


def test_cross_task_trl_peer_trains_from_the_runs_models_and_evaluates_beside_them(tmp_path, monkeypatch):
    """--trl-peer: TRL's PPOTrainer gets this run's SFT and reward models and the task's prompts, and the
    second evaluation is the pipeline's own evaluation recipe with TRL's policy added, in its own directory."""
    import importlib.util

    from rlhf.config_loader import load_recipe
    from rlhf.config_run import EvalRecipe

    spec = importlib.util.spec_from_file_location("cross_task", "scripts/cross_task.py")
    cross_task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cross_task)
    monkeypatch.syspath_prepend("scripts")  # where trl_peer imports the peer venv's maker from
    import bench_ppo

    data, run = tmp_path / "reverse" / "data", tmp_path / "run"
    reverse.build_data(data)
    cross_task.pipeline_recipe("reverse", data, run, tmp_path / "assets", {})
    monkeypatch.setattr(bench_ppo, "ensure_peer_venv", lambda: Path("/peer/python"))
    calls = []
    monkeypatch.setattr(cross_task.subprocess, "run", lambda cmd, check: calls.append(cmd))
    report = cross_task.trl_peer(data, run, ["learning_rate=3e-4"])

    trl, ev = calls
    assert trl[0] == "/peer/python" and trl[1].endswith("scripts/trl_ppo_task_peer.py")
    given = dict(zip(trl[2::2], trl[3::2]))
    assert given["--sft"] == str(run / "sft") and given["--reward"] == str(run / "reward")
    assert given["--prompts"] == str(data / "prompts.jsonl") and given["--out"] == str(run / "trl_ppo")
    assert trl[-1] == "--set=learning_rate=3e-4"
    assert ev[3:5] == ["eval", "--config"]
    recipe = load_recipe(EvalRecipe, ev[5], ev[6:])
    assert (recipe.sft_dir, recipe.ppo_dir, recipe.reward_dir) == tuple(str(run / k) for k in ("sft", "ppo", "reward"))
    assert [(p.name, p.path) for p in recipe.extra_policies] == [("trl_ppo", str(run / "trl_ppo"))]
    assert recipe.ground_truth == "reverse" and recipe.prompts.sources[0].path == str(data / "heldout_prompts.jsonl")
    assert report == run / "with_trl" / "eval" / "report.json" and recipe.output_dir == str(run / "with_trl")
