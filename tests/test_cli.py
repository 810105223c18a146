"""The `rlhf` command as a user meets it: cheap import, clear errors, resolved recipes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from rlhf.cli import main


def test_import_rlhf_is_cheap():
    code = (
        "import sys, rlhf, rlhf.config, rlhf.cli, rlhf.data.prepare, rlhf.demo.task, rlhf.distributed; "
        "heavy = [m for m in ('deepspeed', 'wandb', 'torch', 'torch.distributed', 'transformers') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_key_exits_2_with_suggestion(capsys):
    rc = main(["sft", "--config", str(REPO / "recipes/demo/sft.yaml"), "train.max_step=20"])
    assert rc == 2
    assert "unknown key 'train.max_step'. Did you mean 'max_steps'?" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_model_dir_is_a_handoff_error(tmp_path, capsys):
    rc = main(
        [
            "sft",
            "--config",
            str(REPO / "recipes/demo/sft.yaml"),
            "demo_assets=null",
            f"model.name_or_path={tmp_path / 'nothing'}",
            f"output_dir={tmp_path}",
        ]
    )
    assert rc == 2
    assert "is not a directory (expected a local HuggingFace model directory or a hub id" in capsys.readouterr().err


def test_config_prints_resolved_recipe(capsys):
    assert main(["sft", "--config", str(REPO / "recipes/demo/sft.yaml"), "train.max_steps=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "zero_stage: 0" in out


def test_console_script_and_launcher_flag(tmp_path):
    exe = REPO / ".venv/bin/rlhf"
    if not exe.exists():
        pytest.skip("console script not installed in .venv")
    proc = subprocess.run(
        [str(exe), "sft", "--config", str(REPO / "recipes/demo/sft.yaml"), "--dry-run", "--local_rank=0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "output_dir: runs/demo" in proc.stdout


def test_label_without_its_extra_says_what_to_install(monkeypatch, capsys):
    """The labelling app's web packages are the optional `label` extra: without them `rlhf label`
    names the missing package and the install command instead of an ImportError traceback."""
    import importlib.util

    from rlhf.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["label", "stats", "--db", "nowhere.sqlite"]) == 2
    err = capsys.readouterr().err
    assert "fastapi is not installed" in err and "pip install -e '.[label]'" in err
