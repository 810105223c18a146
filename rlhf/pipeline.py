"""`rlhf pipeline`: SFT -> reward -> PPO and/or DPO -> evaluation, one command, resumable.

Each training stage runs under the `deepspeed` launcher (processes, nodes, hostfile from the
recipe), so the pipeline scales exactly as the stages do. Every stage recipe is loaded and
checked before anything runs, so a typo in the last stage fails in a second, not after an hour.
A stage whose output has a manifest made by the same resolved recipe is skipped; an interrupted
one resumes from its checkpoints (each stage's `resume: auto`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import lifeline
from rlhf.checkpoint import MANIFEST
from rlhf.config import load_recipe, to_dict
from rlhf.config_run import RECIPES, LauncherConfig, PipelineRecipe
from rlhf.distributed import free_port
from rlhf.errors import ConfigError, HandoffError, RlhfError, StageFailed

TRAINING = ("sft", "reward", "ppo", "dpo")
# Recipe sections that do not change what a stage produces: a rerun with another wandb group or
# resume policy still finds the stage complete.
NOT_OUTCOME = ("tracking", "resume")


@dataclass
class PlannedStage:
    name: str
    recipe_path: str
    overrides: list[str]  # everything passed after --config, wiring first, then the user's
    resolved: dict[str, Any]  # the stage recipe as the stage itself will see it
    label: str = ""  # how logs and messages name it: the stage, or an RL variant's name

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def out(self) -> Path:
        return Path(self.resolved["output_dir"]) / self.name


def stage_overrides(p: PipelineRecipe, stage: str) -> list[str]:
    """Wire each stage to the run directory and to the outputs of the stages before it."""
    out, group = p.output_dir, p.group or Path(p.output_dir).resolve().name
    wiring = {
        "sft": [],
        "reward": [f"model.name_or_path={out}/sft"],
        "ppo": [f"sft_dir={out}/sft", f"reward_dir={out}/reward"],
        "dpo": [f"model.name_or_path={out}/sft"],
        "eval": _eval_wiring(p),
    }[stage]
    user = {
        "sft": p.overrides.sft,
        "reward": p.overrides.reward,
        "ppo": p.overrides.ppo,
        "dpo": p.overrides.dpo,
        "eval": p.overrides.eval,
    }
    return [f"output_dir={out}", f"tracking.group={group}", *wiring, *user[stage]]


def _eval_wiring(p: PipelineRecipe) -> list[str]:
    """Evaluation sees the SFT output, the reward model (when the pipeline trains one) and every
    method's output: PPO, the DPO stage and their variants, side by side."""
    out = p.output_dir
    judge = [f"reward_dir={out}/reward"] if "reward" in p.stages else ["reward_dir=null", "best_of_n=0"]
    compared = []
    if "ppo" in p.stages:
        compared += [{"name": v.name, "path": str(variant_dir(p, v.name) / "ppo")} for v in p.rl_variants]
    if "dpo" in p.stages:
        compared += [{"name": "dpo", "path": f"{out}/dpo"}]
        compared += [{"name": v.name, "path": str(variant_dir(p, v.name) / "dpo")} for v in p.dpo_variants]
    ppo = [f"ppo_dir={out}/ppo"] if "ppo" in p.stages else ["ppo_dir=null"] if p.ppo is None else []
    return [f"sft_dir={out}/sft", *judge, *ppo] + ([_flow("rl_variants", compared)] if compared else [])


def variant_dir(p: PipelineRecipe, name: str) -> Path:
    """Run directory of a variant: its stage output is `<this>/ppo` or `<this>/dpo`."""
    return Path(p.output_dir) / "variants" / name


def _flow(key: str, rows: list[dict[str, str]]) -> str:
    """A `key=[{...}, ...]` override in YAML flow style, each value quoted."""
    return (
        f"{key}=[" + ", ".join("{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in r.items()) + "}" for r in rows) + "]"
    )


def plan(p: PipelineRecipe) -> list[PlannedStage]:
    """Load and validate every stage recipe up front (errors name the stage and the key). RL
    variants run after the PPO stage, each into its own directory, from the same SFT and reward."""
    paths = {"sft": p.sft, "reward": p.reward, "ppo": p.ppo, "dpo": p.dpo, "eval": p.eval}
    variants = {"ppo": p.rl_variants, "dpo": p.dpo_variants}
    runs: list[tuple[str, str, list[str]]] = []
    for stage in p.stages:
        runs.append((stage, stage, stage_overrides(p, stage)))
        runs += [
            (stage, v.name, stage_overrides(p, stage) + [f"output_dir={variant_dir(p, v.name)}", *v.overrides])
            for v in variants.get(stage, [])
        ]
    out = []
    for stage, label, overrides in runs:
        where = stage if label == stage else f"{stage}, variant '{label}'"
        try:
            recipe = load_recipe(RECIPES[stage], paths[stage], overrides)
        except RlhfError as e:
            raise ConfigError(f"pipeline stage '{where}' ({paths[stage]}): {e}") from e
        if stage == "sft" and recipe.peft.enabled and not recipe.peft.mergeable:
            later = [s for s in p.stages if s in ("reward", "ppo", "dpo")]
            if later:
                raise ConfigError(
                    f"pipeline stage 'sft' ({paths['sft']}): peft.method={recipe.peft.method} cannot be merged "
                    f"into the weights, and the {', '.join(later)} stage(s) after it need full weights; use a "
                    "mergeable method (lora, dora, qlora, loha, lokr, ia3) or run SFT and evaluation only"
                )
        out.append(PlannedStage(stage, str(paths[stage]), overrides, json.loads(json.dumps(to_dict(recipe))), label))
    return out


def is_complete(stage: PlannedStage) -> bool:
    """Complete = a manifest written by the same resolved recipe. A training stage's manifest from
    a different recipe is refused rather than overwritten: that output may be worth keeping."""
    path = stage.out / MANIFEST
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    diffs = sorted(_diff(_outcome(manifest.get("recipe", {})), _outcome(stage.resolved)))
    if not diffs:
        return not _stale(stage, manifest)
    if stage.name not in TRAINING:
        return False  # evaluation keeps no state worth protecting: redo it with today's recipe
    shown = "; ".join(diffs[:5]) + (f"; ... {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise HandoffError(
        f"{stage.out} is complete but was made by a different '{stage.name}' recipe ({shown}). "
        f"Delete {stage.out} to redo it, or choose another output_dir."
    )


def _stale(stage: PlannedStage, manifest: dict[str, Any]) -> bool:
    """Whether a parent output changed since this stage consumed it (its manifest hash differs).
    Evaluation is cheap and keeps no state: it is redone. A training stage is refused, because its
    checkpoints were trained from the old parent and resuming them would mix the two."""
    changed = [
        p["path"]
        for p in manifest.get("parents", [])
        if not Path(p["path"], MANIFEST).is_file()
        or hashlib.sha256(Path(p["path"], MANIFEST).read_bytes()).hexdigest() != p["manifest_sha256"]
    ]
    if changed and stage.name in TRAINING:
        raise HandoffError(
            f"{stage.out} was made from an earlier version of {', '.join(changed)}; "
            f"delete {stage.out} to redo it from the current one."
        )
    return bool(changed)


def _outcome(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in NOT_OUTCOME}


def _diff(then: Any, now: Any, where: str = "") -> list[str]:
    """Differences between the recipe an output was made by and today's. A key the old manifest does
    not have is not one: that setting was added to rlhf after the output was made, and its default
    keeps the old behaviour (an upgrade must not invalidate finished stages)."""
    if isinstance(then, dict) and isinstance(now, dict):
        return [d for k in sorted(then) for d in _diff(then[k], now.get(k), f"{where}.{k}" if where else k)]
    if isinstance(then, list) and isinstance(now, list) and len(then) == len(now):
        return [d for i, (a, b) in enumerate(zip(then, now)) for d in _diff(a, b, f"{where}.{i}")]
    return [] if then == now else [f"{where}: {then!r} then, {now!r} now"]


def launch_command(stage: PlannedStage, launcher: LauncherConfig) -> list[str]:
    """Training stages: the `deepspeed` launcher running `python -m rlhf.cli`; evaluation: plain python."""
    args = ["-m", "rlhf.cli", stage.name, "--config", stage.recipe_path, *stage.overrides]
    if stage.name not in TRAINING:
        return [sys.executable, *args]
    found = Path(sys.executable).parent / "deepspeed"
    exe = str(found) if found.exists() else shutil.which("deepspeed")
    if exe is None:
        raise StageFailed("the 'deepspeed' launcher is not on PATH (pip install deepspeed)")
    # --no_local_rank: the rank arrives in LOCAL_RANK; a --local_rank flag would land before the sub-command.
    cmd = [
        exe,
        "--no_local_rank",
        "--num_gpus",
        str(launcher.num_gpus),
        "--num_nodes",
        str(launcher.num_nodes),
        "--master_port",
        str(launcher.master_port or free_port()),
    ]
    if launcher.hostfile:
        cmd += ["--hostfile", launcher.hostfile]
    if launcher.master_addr:
        cmd += ["--master_addr", launcher.master_addr]
    return [*cmd, "--module", *args[1:]]


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, streaming its output to the terminal and to `log_path` as it comes."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        env = lifeline.launched_env(dict(os.environ))  # the stage exits if this process is killed
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk), sys.stdout.flush()
            log.write(chunk)
        return proc.wait()


def run_pipeline(p: PipelineRecipe) -> Path:
    """Run (or skip, or resume) each stage in order; returns the run directory."""
    stages = plan(p)
    run_dir = Path(p.output_dir)
    record: dict[str, Any] = {}
    ran_any = False
    for stage in stages:
        # Evaluation is redone whenever a stage before it ran: its report must cover the new outputs.
        if is_complete(stage) and not (ran_any and stage.name not in TRAINING):
            print(f"[pipeline] {stage.label}: complete in {stage.out}, skipped", flush=True)
            record[stage.label] = {"status": "skipped"}
            continue
        print(f"[pipeline] {stage.label}: running ({stage.recipe_path})", flush=True)
        t0 = time.perf_counter()
        log_path = run_dir / "logs" / f"{stage.label}.log"
        rc = run_logged(launch_command(stage, p.launcher), log_path)
        if rc != 0 or not (stage.out / MANIFEST).is_file():
            raise StageFailed(
                f"stage '{stage.label}' failed (exit code {rc}); see {log_path}. "
                "Rerun the same command to resume it from its last checkpoint."
            )
        ran_any = True
        record[stage.label] = {"status": "ran", "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[pipeline] {stage.label}: done in {record[stage.label]['seconds']:.0f}s -> {stage.out}", flush=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": record, "recipe": to_dict(p)}, indent=2))
    print_summary(run_dir)
    return run_dir


def print_summary(run_dir: Path) -> None:
    report = run_dir / "eval" / "report.json"
    if not report.is_file():
        return
    summary = json.loads(report.read_text())["summary"]
    print(f"\n[pipeline] report: {run_dir / 'eval' / 'report.md'}")
    cols = [
        c
        for c in (
            "reward_mean",
            "win_rate_vs_sft",
            "ground_truth",
            "kl_to_sft",
            "forgetting_ppl_rise",
            "train_seconds",
            "peak_memory_mb",
        )
        if any(c in row for row in summary.values())
    ]
    first = max(8, *(len(n) + 2 for n in summary))
    width = {c: max(18, len(c) + 2) for c in cols}
    print(f"{'model':<{first}}" + "".join(f"{c:>{width[c]}}" for c in cols))
    for name, row in summary.items():
        print(
            f"{name:<{first}}" + "".join(f"{row[c]:>{width[c]}.3f}" if c in row else f"{'-':>{width[c]}}" for c in cols)
        )
