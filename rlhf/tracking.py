"""Experiment tracking: wandb (offline unless an API key is configured) and a local JSONL log.

HF-trainer stages report to wandb through transformers' own `report_to="wandb"` integration;
we only set its environment (mode, project, group, run name, directory). The JSONL log is ours,
so metrics survive with the checkpoint even when wandb is off.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rlhf.config import TrackingConfig
from rlhf.distributed import is_main

METRICS_FILE = "metrics.jsonl"


def wandb_mode(tracking: TrackingConfig) -> str:
    if not tracking.wandb or tracking.wandb_mode == "disabled":
        return "disabled"
    if tracking.wandb_mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return tracking.wandb_mode


def setup_wandb_env(tracking: TrackingConfig, run_dir: Path, stage: str) -> list[str]:
    """Export the wandb settings for this stage; returns the `report_to` list for HF trainers."""
    mode = wandb_mode(tracking)
    if mode == "disabled":
        return []
    group = tracking.group or Path(run_dir).resolve().name
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "WANDB_MODE": mode,
            "WANDB_PROJECT": tracking.project,
            "WANDB_RUN_GROUP": group,
            "WANDB_NAME": tracking.run_name or f"{group}-{stage}",
            "WANDB_JOB_TYPE": stage,
            "WANDB_DIR": str(run_dir.resolve()),
            "WANDB_SILENT": os.environ.get("WANDB_SILENT", "true"),
        }
    )
    return ["wandb"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlLog:
    """Append-only metrics log, one JSON object per line, written by the main rank only."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}})
        with self.path.open("a") as f:
            f.write(line + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop rows logged after `step`: a run resumed from the state of `step` logs them again, and
    a metrics log with each step once plots and compares cleanly. Main rank only."""
    path = Path(path)
    if not is_main() or not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines(keepends=True)
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def metrics_callback(path: Path):
    """A transformers TrainerCallback that mirrors every logged dict into the JSONL log."""
    from transformers import TrainerCallback

    log = JsonlLog(path)

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                log.write({"step": state.global_step, "epoch": state.epoch, **logs})

    return JsonlMetrics()


class Tracker:
    """For loops we own (PPO): metrics to the JSONL log always, to wandb when enabled; main rank only."""

    def __init__(self, tracking: TrackingConfig, run_dir: Path, stage: str, out_dir: Path, config: dict):
        self.jsonl = JsonlLog(Path(out_dir) / METRICS_FILE)
        self.samples = JsonlLog(Path(out_dir) / "samples.jsonl")
        self.run = None
        if is_main() and setup_wandb_env(tracking, Path(run_dir), stage):
            import wandb

            self.run = wandb.init(config=config, reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.jsonl.write({"step": step, **metrics})
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        for row in rows:
            self.samples.write({"step": step, "table": name, **dict(zip(columns, row))})
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
