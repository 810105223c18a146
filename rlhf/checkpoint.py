"""Stage outputs and their manifests: what was trained, from what, on what, with what result.

`rlhf_manifest.json` is written last, atomically: a directory with a manifest is a complete
stage output, one without is not. The next stage reads it before spending any compute.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf.errors import HandoffError  # re-exported here for existing imports

MANIFEST = "rlhf_manifest.json"
PACKAGES = ("rlhf", "torch", "transformers", "trl", "peft", "deepspeed", "datasets", "accelerate", "wandb")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(start: Path | None = None) -> dict[str, Any]:
    """Commit and dirtiness of the checkout the code runs from (None outside a git checkout)."""
    cwd = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            != ""
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def parent_ref(directory: str | Path) -> dict[str, Any]:
    """How a manifest points at its parent: path, stage, and a hash of the parent's manifest."""
    path = Path(directory) / MANIFEST
    raw = path.read_bytes()
    parent = json.loads(raw)
    return {
        "path": str(Path(directory).resolve()),
        "stage": parent.get("stage"),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "finished_at": parent.get("finished_at"),
    }


def write_manifest(
    out_dir: Path,
    *,
    stage: str,
    recipe: dict,
    started_at: str,
    parents: list[dict] | None = None,
    datasets: dict | None = None,
    metrics: dict | None = None,
    **extra: Any,
) -> dict:
    manifest = {
        "stage": stage,
        "format_version": 1,
        "started_at": started_at,
        "finished_at": now(),
        "recipe": recipe,
        "parents": parents or [],
        "datasets": datasets or {},
        "metrics": metrics or {},
        "versions": package_versions(),
        "git": git_state(),
        **extra,
    }
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(
    directory: str | Path, expect_stage: str | tuple[str, ...] | None = None, needed_by: str = "this stage"
) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise HandoffError(f"{needed_by} needs {directory!s}, which does not exist (run its stage first)")
    if not path.is_file():
        raise HandoffError(
            f"{directory!s} has no {MANIFEST}: it is not a finished stage output "
            "(the stage was interrupted, or the directory was not written by rlhf)"
        )
    manifest = json.loads(path.read_text())
    allowed = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
    if allowed and manifest.get("stage") not in allowed:
        raise HandoffError(
            f"{needed_by} expects a {' or '.join(repr(a) for a in allowed)} output, but "
            f"{directory!s} is a '{manifest.get('stage')}' output"
        )
    return manifest


def latest_checkpoint(directory: Path) -> Path | None:
    """Newest complete HF-trainer checkpoint (`checkpoint-N` with its trainer_state.json)."""
    if not directory.is_dir():
        return None
    found = []
    for p in directory.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None
