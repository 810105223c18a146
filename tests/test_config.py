"""Recipe loading: types, overrides, errors that name the key, and every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ConfigError, SFTRecipe, load_recipe, to_dict
from rlhf.cli import RECIPES  # every recipe kind, the rounds included
from rlhf.config_loader import apply_override

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "model: {name_or_path: m}\ndata: {sources: [{path: d.jsonl}]}\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_minimal_recipe_fills_defaults(tmp_path):
    r = load_recipe(SFTRecipe, write(tmp_path, MINIMAL))
    assert r.model.name_or_path == "m"
    assert r.data.sources[0].path == "d.jsonl" and r.data.sources[0].weight == 1.0
    assert r.train.max_steps == -1 and r.deepspeed.zero_stage == 0 and r.resume == "auto"


def test_overrides_change_typed_values(tmp_path):
    r = load_recipe(
        SFTRecipe,
        write(tmp_path, MINIMAL),
        [
            "train.max_steps=20",
            "output_dir=runs/try1",
            "train.learning_rate=1e-4",
            "packing=true",
            "data.sources.0.weight=2",
            "peft.target_modules=[q_proj,v_proj]",
            "model.tokenizer=null",
        ],
    )
    assert r.train.max_steps == 20 and isinstance(r.train.max_steps, int)
    assert r.output_dir == "runs/try1"
    assert r.train.learning_rate == pytest.approx(1e-4)
    assert r.packing is True
    assert r.data.sources[0].weight == 2.0 and isinstance(r.data.sources[0].weight, float)
    assert r.peft.target_modules == ["q_proj", "v_proj"]
    assert r.model.tokenizer is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=20", "unknown key 'train.max_step'. Did you mean 'max_steps'?"),
        ("trian.max_steps=20", "unknown key 'trian'. Did you mean 'train'?"),
        ("train.max_steps=lots", "train.max_steps: expected an integer, got 'lots'"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer"),
        ("packing=maybe", "packing: expected true or false"),
        ("train.precision=fp64", "train.precision: 'fp64' is not one of 'fp32', 'bf16', 'fp16'"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3"),
        ("data.sources.3.path=x", "index 3 is out of range"),
        ("output_dir.x=1", "'output_dir' is a str, it has no sub-keys"),
        ("train.max_steps", "not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), [override])
    assert message in str(e.value)


def test_unknown_yaml_key_is_an_error_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'. Did you mean 'learning_rate'\?"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL + "train: {learning_rat: 0.1}\n"))


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError, match="missing required key.*'data'"):
        load_recipe(SFTRecipe, write(tmp_path, "model: {name_or_path: m}\n"))


@pytest.mark.parametrize(
    "extra, message",
    [
        ("deepspeed: {offload_params: true, zero_stage: 2}", "offload_params needs deepspeed.zero_stage: 3"),
        ("deepspeed: {offload_optimizer: true}", "offload_optimizer needs deepspeed.zero_stage >= 1"),
        ("train: {max_steps: 0}", "train.max_steps must be -1"),
        ("train: {early_stopping_patience: 2, eval_steps: 30, save_steps: 50}", "must be a multiple"),
        ("peft: {quantization: 4bit}", "peft.quantization needs peft.enabled: true"),
    ],
)
def test_cross_field_validation(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL + extra + "\n"))


def test_cross_field_validation_applies_to_overrides_too(tmp_path):
    with pytest.raises(ConfigError, match="validation_fraction"):
        load_recipe(SFTRecipe, write(tmp_path, MINIMAL), ["data.validation_fraction=1.5"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(SFTRecipe, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(SFTRecipe, write(tmp_path, "model: [unclosed\n"))


def test_override_keeps_other_list_entries(tmp_path):
    data = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "a"}, {"path": "b"}]}}
    apply_override(data, SFTRecipe, "data.sources.1.weight=3")
    assert data["data"]["sources"] == [{"path": "a"}, {"path": "b", "weight": 3}]


def _stage_of(path: Path) -> str:
    stem = path.stem
    for stage in RECIPES:
        if stem == stage or stem.startswith(stage + "_") or stem.endswith("_" + stage):
            return stage
    raise AssertionError(f"{path}: cannot tell which stage this recipe is for; name it <stage>.yaml")


SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert SHIPPED, "no recipes shipped"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(RECIPES[_stage_of(path)], path)
    assert to_dict(recipe)["output_dir"]


def test_rl_variants_are_planned_after_ppo_and_wired_into_the_evaluation():
    from rlhf.config_run import PipelineRecipe
    from rlhf.pipeline import plan, stage_overrides

    repo = Path(__file__).resolve().parents[1]
    p = load_recipe(PipelineRecipe, repo / "recipes/demo/pipeline_methods.yaml", ["output_dir=/tmp/rl_variants_plan"])
    stages = plan(p)
    assert [s.label for s in stages] == ["sft", "reward", "ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp", "eval"]
    grpo = stages[3]
    assert grpo.name == "ppo" and str(grpo.out) == "/tmp/rl_variants_plan/variants/grpo/ppo"
    assert grpo.resolved["sft_dir"] == "/tmp/rl_variants_plan/sft"  # the same parents as the PPO stage
    assert grpo.resolved["ppo"]["advantage_estimator"] == "grpo"
    assert [v["name"] for v in stages[-1].resolved["rl_variants"]] == ["grpo", "dr_grpo", "rloo", "reinforce_pp"]
    # without the ppo stage there are no variants, and the evaluation is not pointed at them
    q = load_recipe(
        PipelineRecipe,
        repo / "recipes/demo/pipeline_methods.yaml",
        ["output_dir=/tmp/rl_variants_plan", "stages=[sft, reward, eval]"],
    )
    assert not any(o.startswith("rl_variants=") for o in stage_overrides(q, "eval"))
    with pytest.raises(ConfigError, match="names must be unique"):
        load_recipe(PipelineRecipe, repo / "recipes/demo/pipeline_methods.yaml", ["rl_variants=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="letters, digits"):
        load_recipe(PipelineRecipe, repo / "recipes/demo/pipeline_methods.yaml", ["rl_variants=[{name: 'a/b'}]"])
