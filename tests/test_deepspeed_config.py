"""The one DeepSpeed-config builder: ZeRO stages, offload, precision, batches, user JSON."""

from __future__ import annotations

import json

import pytest

from rlhf.config import ConfigError, DeepSpeedConfig, TrainConfig
from rlhf.distributed import build_deepspeed_config


def build(ds=None, train=None, n=1, **kw):
    return build_deepspeed_config(ds or DeepSpeedConfig(), train or TrainConfig(), n, **kw)


def test_batch_sizes_multiply_over_processes():
    cfg = build(train=TrainConfig(micro_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.5), n=8)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 96
    assert cfg["gradient_clipping"] == 0.5


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage):
    zero = build(DeepSpeedConfig(zero_stage=stage))["zero_optimization"]
    assert zero["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_offload():
    zero = build(DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True))["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize(
    "precision, bf16, fp16", [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_precision(precision, bf16, fp16):
    cfg = build(train=TrainConfig(precision=precision))
    assert cfg["bf16"]["enabled"] is bf16 and cfg["fp16"]["enabled"] is fp16


def test_optimizer_section_only_when_asked():
    assert "optimizer" not in build()
    cfg = build(DeepSpeedConfig(zero_stage=2, offload_optimizer=True), optimizer={"lr": 1e-3, "weight_decay": 0.1})
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["optimizer"]["params"]["weight_decay"] == 0.1
    assert cfg["zero_force_ds_cpu_optimizer"] is True


def test_user_json_wins_except_auto(tmp_path):
    user = {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "sub_group_size": 1e9},
        "gradient_clipping": "auto",
        "train_micro_batch_size_per_gpu": 2,
        "flops_profiler": {"enabled": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = build(
        DeepSpeedConfig(zero_stage=1, config_file=str(path)),
        TrainConfig(micro_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.7),
        n=2,
    )
    assert cfg["zero_optimization"]["stage"] == 3  # user wins
    assert cfg["zero_optimization"]["sub_group_size"] == 1e9  # user extra kept
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5e7  # "auto" -> built value
    assert cfg["gradient_clipping"] == 0.7  # "auto" -> built value
    assert cfg["flops_profiler"] == {"enabled": True}
    assert cfg["train_batch_size"] == 2 * 2 * 2  # recomputed from the user's micro batch


def test_user_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build(DeepSpeedConfig(config_file=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build(DeepSpeedConfig(config_file=str(bad)))


def test_config_is_accepted_by_deepspeed():
    """DeepSpeed's own parser takes what we build, for every stage and precision."""
    from deepspeed.runtime.config import DeepSpeedConfig as DSParsed

    for stage in (0, 1, 2, 3):
        cfg = build(DeepSpeedConfig(zero_stage=stage), TrainConfig(micro_batch_size=2, gradient_accumulation_steps=2))
        parsed = DSParsed(cfg)  # world size 1 without a process group
        assert parsed.zero_optimization_stage == stage
        assert parsed.train_batch_size == 4
