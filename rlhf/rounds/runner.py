"""`rlhf rounds`: iterative RLHF, one command, resumable at any point.

Round 0 trains the initial reward model on the reward recipe's own data and evaluates the SFT
policy. Round k (1..rounds):

1. samples candidate pairs from round k-1's policy on fresh prompts, keeping those the current
   reward model is least sure about;
2. opens them as a batch in the run's label database (one transaction);
3. waits for the labels (the app and any scripted annotators run meanwhile), with a progress bar;
4. closes and exports the batch, and splits off a held-out part;
5. measures the current reward model's accuracy on the new pairs, before training on them;
6. updates the reward model (carry.reward_model);
7. runs RL from round k-1's policy against it (carry.reference / critic / optimizer / kl_controller);
8. evaluates, measures the updated reward model on the held-out part, and writes round k's
   manifest (its lineage) last.

Every step leaves a durable mark (a database row, a file written atomically, a stage manifest)
and is skipped when its mark exists, so rerunning the command after a crash (kill -9 included)
goes on where it stopped: the stages resume from their last saved state, the labels are in the
database, and nothing is sampled or labelled twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from rlhf.checkpoint import MANIFEST, now, write_json_atomic
from rlhf.config import load_recipe, to_dict
from rlhf.config_rounds import RoundsRecipe
from rlhf.config_run import RECIPES
from rlhf.data.io import read_rows
from rlhf.errors import ConfigError, HandoffError, RlhfError, StageFailed
from rlhf.label import batches
from rlhf.label.project import load_prompts
from rlhf.pipeline import PlannedStage, _diff, _flow, _outcome, is_complete, launch_command, run_logged
from rlhf.rounds import candidates, report
from rlhf.rounds.annotator import LabellingSession

log = logging.getLogger("rlhf")

ROUND_MANIFEST = "round.json"
# Settings that may change between invocations of one run: they do not change what it produced.
MAY_CHANGE = ("rounds", "annotator", "server", "poll_seconds", "launcher")


def round_dir(r: RoundsRecipe, k: int) -> Path:
    return Path(r.output_dir) / f"round-{k}"


def label_db(r: RoundsRecipe) -> str:
    """The run's one label database (every round's batch)."""
    return str(Path(r.output_dir) / "labels.sqlite")


def _say(msg: str) -> None:
    print(f"[rounds] {msg}", flush=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ref(path: str | Path) -> dict[str, Any]:
    """A lineage reference: the directory and the hash of its manifest (what it was when used)."""
    m = Path(path) / MANIFEST
    return {"path": str(path), "manifest_sha256": _sha(m) if m.is_file() else None}


def check_recipe(r: RoundsRecipe, stage_recipes: dict[str, dict[str, Any]]) -> None:
    """A run directory belongs to one recipe: refuse one whose rounds were made differently (more
    rounds, another annotator or server are fine). That includes the stage recipe files: editing,
    say, the RL recipe between rounds would make later rounds a different experiment, and a stage
    that is resumed or skipped would not notice (its wiring, not the file, is what it checks)."""
    run = Path(r.output_dir)
    rounds_recipe = {k: v for k, v in to_dict(r).items() if k not in MAY_CHANGE}
    for path, made, what in (
        (run / "rounds_recipe.json", rounds_recipe, "recipe"),
        # kept apart, so a run begun before these were recorded starts recording them now
        (run / "stage_recipes.json", stage_recipes, "stage recipes"),
    ):
        if not path.is_file():
            write_json_atomic(path, made)
            continue
        diffs = _diff(json.loads(path.read_text()), made)
        if diffs:
            raise HandoffError(
                f"{r.output_dir} holds rounds made by different {what} ({'; '.join(diffs[:5])}); "
                "restore them, use another output_dir, or delete it to start over"
            )


def run_stage(r: RoundsRecipe, name: str, recipe_path: str, overrides: list[str], label: str) -> Path:
    """Run one stage the way the pipeline does (the deepspeed launcher for training), skipped when
    its output is complete; an interrupted one resumes from its checkpoints."""
    resolved = json.loads(json.dumps(to_dict(load_recipe(RECIPES[name], recipe_path, overrides))))
    stage = PlannedStage(name, recipe_path, overrides, resolved, label)
    if is_complete(stage):
        _say(f"{label}: complete in {stage.out}, skipped")
        return stage.out
    _say(f"{label}: running")
    t0 = time.perf_counter()
    log_path = Path(r.output_dir) / "logs" / f"{label}.log"
    rc = run_logged(launch_command(stage, r.launcher), log_path)
    if rc != 0 or not (stage.out / MANIFEST).is_file():
        raise StageFailed(f"{label} failed (exit code {rc}); see {log_path}. Rerun the same command to resume.")
    _say(f"{label}: done in {time.perf_counter() - t0:.0f}s -> {stage.out}")
    return stage.out


def _group(r: RoundsRecipe) -> str:
    return f"tracking.group={Path(r.output_dir).resolve().name}"


def run_round0(r: RoundsRecipe) -> Path:
    """The initial reward model (unless given) and the SFT policy's evaluation."""
    d = round_dir(r, 0)
    if r.sft is not None:
        run_stage(r, "sft", r.sft, [f"output_dir={d}", _group(r)], "round-0/sft")
    if r.initial_reward_dir:
        rm = Path(r.initial_reward_dir)
    else:
        over = [*r.reward_overrides, f"output_dir={d}", _group(r), f"model.name_or_path={r.sft_path}"]
        rm = run_stage(r, "reward", r.reward, over, "round-0/reward")
    run_stage(r, "eval", r.eval, _eval_overrides(r, d, rm, None), "round-0/eval")
    if not (d / ROUND_MANIFEST).is_file():
        write_json_atomic(
            d / ROUND_MANIFEST,
            {
                "round": 0,
                "finished_at": now(),
                "policy": _ref(r.sft_path),
                "reward_model": _ref(rm),
                "eval": _ref(d / "eval"),
            },
        )
    return rm


def _eval_overrides(r: RoundsRecipe, d: Path, rm: Path, policy: Path | None) -> list[str]:
    return [
        *r.eval_overrides,  # first: the wiring below must win
        f"output_dir={d}",
        _group(r),
        f"sft_dir={r.sft_path}",
        f"reward_dir={rm}",
        f"ppo_dir={policy}" if policy else "ppo_dir=null",
        "rl_variants=[]",
    ]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    tmp.replace(path)


def open_round_batch(r: RoundsRecipe, k: int, engine, pool, policy: str, rm: Path) -> int:
    """Step 1-2: sample, select and open round k's batch (or find it open already)."""
    name = f"round-{k}"
    found = batches.batch_id(engine, name)
    if found is not None:
        return found
    per = candidates.prompts_needed(r.labels_per_round, r.pool_factor, r.samples_per_prompt)
    chosen = candidates.prompts_for_round(pool, k, per, r.seed)
    _say(f"{name}: sampling {r.samples_per_prompt} answers to {len(chosen.prompts)} prompts from {policy}")
    pairs, counts = candidates.candidate_pairs(
        policy, str(rm), chosen.prompts, r.samples_per_prompt, r.generation, r.seed + k, r.labels_per_round
    )
    info = {**counts, "prompt_offset": chosen.first, "prompts_wrapped": chosen.wrapped, "policy": policy}
    write_json_atomic(round_dir(r, k) / "candidates.json", info)  # before the batch: a rerun rewrites it the same
    return batches.open_batch(engine, name, policy, pairs, {"round": k, **to_dict(r.generation)})


def wait_for_labels(r: RoundsRecipe, k: int, engine, bid: int) -> None:
    """Step 3: until every pair of the batch has min_labels labels (the app and the scripted
    annotators run meanwhile). Labels are in the database the moment they are acknowledged."""
    from tqdm.auto import tqdm

    done, total, _ = batches.progress(engine, bid, r.min_labels)
    if done >= total:
        return
    db = label_db(r)
    with LabellingSession(db, Path(r.output_dir), r.server, r.annotator, engine) as session:
        where = session.url or f"your own `rlhf label serve --db {db}`"
        _say(f"round-{k}: waiting for labels on {total} pairs at {where}")
        bar = tqdm(total=total, initial=done, desc=f"round-{k} labels", unit="pair")
        while done < total:
            session.check()
            time.sleep(r.poll_seconds)
            new, total, _ = batches.progress(engine, bid, r.min_labels)
            bar.update(new - done)
            done = new
        bar.close()


def export_round(r: RoundsRecipe, k: int, engine, bid: int) -> tuple[list[dict], list[dict]]:
    """Step 4: close the batch, export it, split off the held-out part (files written atomically)."""
    d = round_dir(r, k)
    train_path, held_path = d / "train.jsonl", d / "heldout.jsonl"
    if not held_path.is_file():
        batches.close_batch(engine, bid)
        counts = batches.export_batch(engine, bid, d / "labels.jsonl", r.min_labels)
        _, pairs, n_labels = batches.progress(engine, bid, r.min_labels)  # closed: final, every one exported
        write_json_atomic(d / "export.json", {**counts, "batch_pairs": pairs, "batch_labels": n_labels})
        train, held = candidates.split_heldout(_rows(d / "labels.jsonl"), r.heldout_fraction, r.seed)
        _write_rows(train_path, train)
        _write_rows(held_path, held)  # last: its presence marks the step done
    return _rows(train_path), _rows(held_path)


def measure_before(r: RoundsRecipe, k: int, rm: Path, train: list[dict], held: list[dict]) -> dict[str, Any]:
    """Step 5: the reward model's accuracy on the round's labels before it sees any of them."""
    path = round_dir(r, k) / "drift.json"
    if path.is_file():
        return json.loads(path.read_text())
    acc = candidates.accuracies(str(rm), {"all": train + held, "heldout": held})  # the model loaded once
    out = {"reward_model": _ref(rm), "before_all": acc["all"], "before_heldout": acc["heldout"]}
    write_json_atomic(path, out)
    return out


def _initial_sources(r: RoundsRecipe) -> list[dict[str, Any]]:
    recipe = load_recipe(RECIPES["reward"], r.reward, r.reward_overrides)
    return [to_dict(s) for s in recipe.data.sources]


def reward_sources(r: RoundsRecipe, k: int) -> list[dict[str, Any]]:
    """The data of round k's reward update. Each source's weight is its row count (times the
    recipe's weight for the initial ones), so the stage's mixture is the plain union of the files
    rather than an equal share per file (which would repeat a small round many times)."""
    rounds = [round_dir(r, j) / "train.jsonl" for j in range(1, k + 1)]
    if r.carry.reward_model == "continue_new":
        rounds = rounds[-1:]
    out = []
    if r.carry.reward_model != "continue_new":
        for s in _initial_sources(r):
            n = len(read_rows(s["path"], s.get("split", "train"), s.get("config")))
            out.append({**s, "weight": s.get("weight", 1.0) * max(1, n)})
    out += [{"path": str(p), "weight": float(max(1, len(_rows(p))))} for p in rounds if _rows(p)]
    if not out:
        raise StageFailed(
            f"round {k}: no preference to train the reward model on (carry.reward_model={r.carry.reward_model}, "
            f"and {rounds[-1]} is empty: every pair was identical or a tie); label more pairs, or use continue_all"
        )
    return out


def update_reward(r: RoundsRecipe, k: int, rm: Path, sources: list[dict[str, Any]]) -> Path:
    """Step 6, on `sources` (reward_sources)."""
    d = round_dir(r, k)
    start = r.sft_path if r.carry.reward_model == "retrain_all" else str(rm)
    over = [
        *r.reward_overrides,
        f"output_dir={d}",
        _group(r),
        f"model.name_or_path={start}",
        _flow("data.sources", sources),
    ]
    return run_stage(r, "reward", r.reward, over, f"round-{k}/reward")


def rl_overrides(r: RoundsRecipe, k: int, rm: Path, prev_policy: Path | None) -> list[str]:
    """Step 7's wiring: where the actor starts, which reference it is leashed to, what it carries."""
    d = round_dir(r, k)
    seed = load_recipe(RECIPES["ppo"], r.rl, r.rl_overrides).train.seed + k
    c = r.carry
    if c.reference == "previous":
        # The previous policy's exported weights are both start and reference: nothing else to load
        # of the actor (its adapter, under LoRA, starts at zero on top of them).
        reference = str(prev_policy or r.sft_path)
        carried = {"actor": False, "critic": False, "optimizer": False, "kl_controller": c.kl_controller == "continue"}
    else:
        reference = r.sft_path
        carried = {
            "actor": True,
            "critic": c.critic == "continue",
            "optimizer": c.optimizer == "continue",
            "kl_controller": c.kl_controller == "continue",
        }
    over = [*r.rl_overrides, f"output_dir={d}", _group(r), f"sft_dir={reference}", f"reward_dir={rm}"]
    over.append(f"train.seed={seed}")
    if prev_policy is not None and any(carried.values()):
        return [*over, "continue_from=" + json.dumps({"path": str(prev_policy), **carried})]
    return [*over, "continue_from=null"]


def run_round(r: RoundsRecipe, k: int, engine, pool, policy: Path | None, rm: Path) -> tuple[Path, Path]:
    """Round k from round k-1's policy (None: the SFT model) and reward model; returns the new ones."""
    d = round_dir(r, k)
    if (d / ROUND_MANIFEST).is_file():
        m = json.loads((d / ROUND_MANIFEST).read_text())
        return Path(m["policy"]["path"]), Path(m["reward_model"]["path"])
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = str(policy or r.sft_path)
    bid = open_round_batch(r, k, engine, pool, source, rm)
    wait_for_labels(r, k, engine, bid)
    train, held = export_round(r, k, engine, bid)
    before = measure_before(r, k, rm, train, held)
    _say(
        f"round-{k}: {len(train) + len(held)} labelled pairs; the current reward model agrees with "
        f"{before['before_all']['accuracy']:.3f} of them"
    )
    sources = reward_sources(r, k)
    new_rm = update_reward(r, k, rm, sources)
    new_policy = run_stage(r, "ppo", r.rl, rl_overrides(r, k, new_rm, policy), f"round-{k}/rl")
    run_stage(r, "eval", r.eval, _eval_overrides(r, d, new_rm, new_policy), f"round-{k}/eval")
    after = candidates.accuracy(str(new_rm), held)
    exported = json.loads((d / "export.json").read_text())
    total, n_labels = exported["batch_pairs"], exported["batch_labels"]
    write_json_atomic(
        d / ROUND_MANIFEST,
        {
            "round": k,
            "finished_at": now(),
            "seconds_this_invocation": round(time.perf_counter() - t0, 1),
            "pairs_from": _ref(source),
            "batch": {"name": f"round-{k}", "id": bid, "pairs": total, "labels": n_labels},
            "labels": {
                "train": {"path": str(d / "train.jsonl"), "rows": len(train), "sha256": _sha(d / "train.jsonl")},
                "heldout": {"path": str(d / "heldout.jsonl"), "rows": len(held), "sha256": _sha(d / "heldout.jsonl")},
            },
            "reward_model_before": _ref(rm),
            "reward_model": {**_ref(new_rm), "trained_on": sources},
            "policy_before": _ref(source),
            "policy": _ref(new_policy),
            "carry": to_dict(r.carry),
            "accuracy": {**before, "after_heldout": after},
            "eval": _ref(d / "eval"),
        },
    )
    return new_policy, new_rm


def check_stage_recipes(r: RoundsRecipe) -> dict[str, dict[str, Any]]:
    """Load every stage recipe with a later round's wiring before anything runs, so a key that
    fails (say carry.critic=continue with a critic-free estimator) fails now, not after a round
    of people's labelling. Errors name the recipe. Returns what each file says (without the
    settings that do not change what it makes), for `check_recipe`: the file, not the resolved
    recipe, so that an rlhf upgrade that changes a default does not refuse a run's next round."""
    d, rm, prev = round_dir(r, 2), round_dir(r, 2) / "reward", round_dir(r, 1) / "ppo"
    checks = [
        ("reward", r.reward, [*r.reward_overrides, f"output_dir={d}", f"model.name_or_path={r.sft_path}"]),
        ("ppo", r.rl, rl_overrides(r, 2, rm, prev)),
        ("eval", r.eval, _eval_overrides(r, d, rm, prev)),
    ] + ([("sft", r.sft, [f"output_dir={round_dir(r, 0)}"])] if r.sft else [])
    resolved = {}
    for name, path, over in checks:
        what = "rl" if name == "ppo" else name
        try:
            load_recipe(RECIPES[name], path, over)
            written = yaml.safe_load(Path(path).read_text()) or {}
            resolved[what] = {"path": path, **_outcome(json.loads(json.dumps(written)))}
        except RlhfError as e:
            raise ConfigError(f"rounds recipe: its {what} recipe ({path}): {e}") from e
    return resolved


@contextlib.contextmanager
def run_lock(run: Path):
    """One `rlhf rounds` per run directory at a time: a second one (a rerun while the first still
    trains) is refused instead of racing it for the same checkpoints and batch."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HandoffError(
                f"another `rlhf rounds` is running on {run} (it holds {run / '.lock'}); wait for it or stop it first"
            ) from None
        yield


def run_rounds(r: RoundsRecipe) -> Path:
    """All rounds (skipping finished ones); returns the run directory, with report.md in it."""
    run = Path(r.output_dir)
    stage_recipes = check_stage_recipes(r)
    with run_lock(run):
        return _run_rounds(r, run, stage_recipes)


def _run_rounds(r: RoundsRecipe, run: Path, stage_recipes: dict[str, dict[str, Any]]) -> Path:
    check_recipe(r, stage_recipes)
    engine = batches.open_project(label_db(r), r.overlap)
    rm = run_round0(r)  # first: it may build the data the prompts come from (the demo's assets)
    pool = load_prompts(r.prompts.path, key="prompts.path")
    policy: Path | None = None
    for k in range(1, r.rounds + 1):
        policy, rm = run_round(r, k, engine, pool, policy, rm)
        report.write(run, k)
        _say(f"round-{k}: finished")
    out = report.write(run, r.rounds)
    _say(f"report: {out}")
    return run
