"""Shared fixtures: the demo assets are built once per test session into a temp directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    from rlhf.demo.assets import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo") / "assets")


def demo_overrides(assets: Path, out: Path) -> list[str]:
    """Point a demo recipe at test-local assets and output, quick settings, no wandb."""
    return [
        f"demo_assets={assets}",
        f"model.name_or_path={assets / 'base'}",
        f"data.sources.0.path={assets / 'data' / 'sft.jsonl'}",
        f"output_dir={out}",
        "tracking.wandb=false",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
