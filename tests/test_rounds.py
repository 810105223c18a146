"""`rlhf rounds` in pieces (fast) and as a user runs it (slow): labelling batches in the label
database, the scripted annotators through the real HTTP app, the carry-over wiring, and a
two-round run killed with SIGKILL while it waits for labels and while it trains, then resumed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from conftest import REPO
from rlhf.checkpoint import MANIFEST
from rlhf.config import ConfigError, load_recipe
from rlhf.errors import HandoffError
from rlhf.config_rounds import LabelServer, RoundsRecipe, ScriptedAnnotator
from rlhf.label import assign, batches, store
from rlhf.rounds import candidates, runner
from rlhf.rounds.annotator import LabellingSession, judge
from rlhf.tasks import GRADERS

PROMPT = [{"role": "user", "content": "write a review of the pizza ."}]
GOOD = "the pizza was great and lovely . i loved it ."
RAMBLE = "the pizza was great and great and great and great and great and great and great and great and"


def _items(n: int, start: int = 0) -> list[batches.PairToLabel]:
    return [batches.PairToLabel(PROMPT, f"{GOOD} {i + start}", f"{RAMBLE} {i + start}", i / 10) for i in range(n)]


def test_a_batch_is_written_once_and_a_closed_batch_is_not_served(tmp_path):
    engine = batches.open_project(str(tmp_path / "labels.sqlite"), overlap=1)
    bid = batches.open_batch(engine, "round-1", "policy-a", _items(3), {"round": 1})
    assert batches.open_batch(engine, "round-1", "policy-a", _items(5), {"round": 1}) == bid  # a rerun: no-op
    assert batches.progress(engine, bid, 1) == (0, 3, 0)
    store.add_annotator(engine, "ann")
    who = 1
    first = assign.next_pair(engine, who)
    assert first is not None and first["pair_id"] in batches.pair_ids(engine, bid)
    assign.add_label(
        engine, pair_id=first["pair_id"], annotator_id=who, choice="a", strength=1, comment="", left_id=first["a_id"]
    )
    assert batches.progress(engine, bid, 1) == (1, 3, 1)
    store.add_annotator(engine, "late")
    held = assign.next_pair(engine, 2)  # served before the batch closes, labelled after
    batches.close_batch(engine, bid)
    assert assign.next_pair(engine, who) is None  # the rest of a closed batch is not served
    assert assign.next_pair(engine, 2) is None  # nor is a lease held across the close
    with pytest.raises(store.PairFull, match="closed"):  # a late label would never be exported: 409
        assign.add_label(
            engine, pair_id=held["pair_id"], annotator_id=2, choice="a", strength=1, comment="", left_id=held["a_id"]
        )
    assert assign.progress(engine, who)["open"] == 0
    bid2 = batches.open_batch(engine, "round-2", "policy-b", _items(2, start=10), {"round": 2})
    nxt = assign.next_pair(engine, who)
    assert nxt is not None and nxt["pair_id"] in batches.pair_ids(engine, bid2)
    out = tmp_path / "round-1.jsonl"
    counts = batches.export_batch(engine, bid, out, min_labels=1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["written"] == 1 and counts["unlabelled"] == 2 and rows[0]["provenance"]["pair_id"] == first["pair_id"]


def test_the_project_refuses_another_overlap(tmp_path):
    batches.open_project(str(tmp_path / "labels.sqlite"), overlap=2)
    with pytest.raises(store.LabelError, match="overlap 2"):
        batches.open_project(str(tmp_path / "labels.sqlite"), overlap=1)


def test_scripted_annotators_label_through_the_http_app_never_twice_never_over_overlap(tmp_path):
    db = str(tmp_path / "labels.sqlite")
    engine = batches.open_project(db, overlap=2)
    bid = batches.open_batch(engine, "round-1", "p", _items(6), {})
    spec = ScriptedAnnotator(task="demo", annotators=3, noise=0.0)
    with LabellingSession(db, tmp_path, LabelServer(), spec, engine) as session:
        deadline = time.monotonic() + 60
        while batches.progress(engine, bid, 2)[0] < 6:
            session.check()
            assert time.monotonic() < deadline, "the scripted annotators did not finish"
            time.sleep(0.1)
        assert session.url and session.url.startswith("http://127.0.0.1:")
    with engine.connect() as c:
        per_pair = dict(c.execute(select(store.labels.c.pair_id, func.count()).group_by(store.labels.c.pair_id)).all())
        per_pair_annotator = (
            c.execute(
                select(func.count())
                .select_from(store.labels)
                .group_by(store.labels.c.pair_id, store.labels.c.annotator_id)
            )
            .scalars()
            .all()
        )
        served = c.execute(select(func.count()).select_from(store.assignments)).scalar()
        names = set(c.execute(select(store.annotators.c.name)).scalars())
    assert set(per_pair.values()) == {2}  # exactly the overlap, never more
    assert set(per_pair_annotator) == {1}  # nobody labelled a pair twice
    assert served >= 12 and names == {"scripted-1", "scripted-2", "scripted-3"}
    out = tmp_path / "x.jsonl"
    batches.export_batch(engine, bid, out, 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["chosen"].startswith(GOOD) for r in rows)  # noise 0: the well-formed one
    # Tokens are kept (0600) so a restarted run signs the same annotators in again.
    tokens = tmp_path / "scripted_annotators.json"
    assert oct(tokens.stat().st_mode & 0o777) == "0o600" and len(json.loads(tokens.read_text())) == 3


def test_judge_follows_the_grader_with_noise_and_strength():
    spec = ScriptedAnnotator(task="demo", noise=0.0)
    grade = GRADERS["demo"]
    rng = random.Random(0)
    prompt = PROMPT[0]["content"]
    assert judge(rng, grade, prompt, GOOD, RAMBLE, spec) == {"choice": "left", "strength": 3}
    assert judge(rng, grade, prompt, RAMBLE, GOOD, spec)["choice"] == "right"
    assert judge(rng, grade, prompt, GOOD, GOOD, spec) == {"choice": "tie"}
    noisy = ScriptedAnnotator(task="demo", noise=0.3)
    flips = sum(judge(rng, grade, prompt, GOOD, RAMBLE, noisy)["choice"] == "right" for _ in range(2000))
    assert 0.25 < flips / 2000 < 0.35


def test_judge_breaks_a_coarse_graders_ties_by_partial_credit():
    """The instruction task's total is a product: both answers below are off topic and score 0, but
    one follows the instruction. A person would prefer it; with tie_break off it stays a tie."""
    from rlhf.tasks import instruct

    prompt = instruct.Prompt("cat", ("exclaim",), "").text
    follows, ignores = "The weather is nice!", "The weather is nice."
    grade = GRADERS["instruct"]
    assert grade(prompt, follows, False) == grade(prompt, ignores, False) == 0.0
    rng = random.Random(0)
    spec = ScriptedAnnotator(task="instruct", noise=0.0)
    assert judge(rng, grade, prompt, ignores, follows, spec) == {"choice": "right", "strength": 1}
    assert judge(rng, grade, prompt, follows, ignores, spec) == {"choice": "left", "strength": 1}
    assert judge(rng, grade, prompt, follows, follows, spec) == {"choice": "tie"}  # nothing tells them apart
    plain = ScriptedAnnotator(task="instruct", noise=0.0, tie_break=False)
    assert judge(rng, grade, prompt, ignores, follows, plain) == {"choice": "tie"}
    # within a wider tie band, unequal scores are a tie, never reordered by partial credit
    two = instruct.Prompt("cat", ("exclaim", "yes"), "").text
    all_off_topic, half_on_topic = "Yes the weather is nice!", "Yes the cat is soft."
    assert (grade(two, all_off_topic, False), grade(two, half_on_topic, False)) == (0.0, 50.0)
    banded = ScriptedAnnotator(task="instruct", noise=0.0, tie_below=50)
    assert judge(rng, grade, two, all_off_topic, half_on_topic, banded) == {"choice": "tie"}
    # a task without partial credit is unchanged: equal scores stay a tie
    assert judge(rng, GRADERS["demo"], PROMPT[0]["content"], GOOD, GOOD, spec) == {"choice": "tie"}


def test_prompts_are_fresh_until_the_pool_is_used_then_wrap():
    pool = [[{"role": "user", "content": f"p{i}"}] for i in range(10)]
    r1, r2, r3 = (candidates.prompts_for_round(pool, k, 4, seed=0) for k in (1, 2, 3))
    seen = [m[0]["content"] for s in (r1, r2) for m in s.prompts]
    assert len(set(seen)) == 8 and not r1.wrapped and not r2.wrapped
    assert r3.wrapped and len(r3.prompts) == 4
    assert candidates.prompts_for_round(pool, 1, 4, seed=1).prompts != r1.prompts  # the seed orders them
    assert candidates.prompts_needed(48, 3, 2) == 144 and candidates.prompts_needed(48, 3, 4) == 72


def test_heldout_split_is_stable_disjoint_and_never_empty():
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "provenance": {"pair_id": i}} for i in range(200)]
    train, held = candidates.split_heldout(rows, 0.25, seed=0)
    assert len(train) + len(held) == 200 and not {id(r) for r in train} & {id(r) for r in held}
    assert 30 < len(held) < 70
    again = candidates.split_heldout(list(reversed(rows)), 0.25, seed=0)[1]
    assert sorted(r["provenance"]["pair_id"] for r in again) == sorted(r["provenance"]["pair_id"] for r in held)
    tiny_train, tiny_held = candidates.split_heldout(rows[:2], 0.01, seed=0)
    assert len(tiny_held) == 1 and len(tiny_train) == 1


def _recipe(tmp_path: Path, **over) -> RoundsRecipe:
    base = {
        "sft_dir": "runs/x/sft",
        "reward": str(REPO / "recipes/demo/reward.yaml"),
        "rl": str(REPO / "recipes/demo/ppo.yaml"),
        "eval": str(REPO / "recipes/demo/eval.yaml"),
        "prompts": {"path": "p.jsonl"},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump({**base, **over}))
    return load_recipe(RoundsRecipe, path)


def test_carry_settings_wire_the_rl_stage(tmp_path):
    prev = Path("run/round-1/ppo")
    r = _recipe(tmp_path)
    first = runner.rl_overrides(r, 1, Path("rm1"), None)
    assert "sft_dir=runs/x/sft" in first and "continue_from=null" in first and "train.seed=43" in first
    second = runner.rl_overrides(r, 2, Path("rm2"), prev)
    carried = json.loads(next(o for o in second if o.startswith("continue_from="))[len("continue_from=") :])
    assert carried == {"path": str(prev), "actor": True, "critic": False, "optimizer": False, "kl_controller": False}
    assert "reward_dir=rm2" in second and "sft_dir=runs/x/sft" in second
    r = _recipe(tmp_path, carry={"critic": "continue", "optimizer": "continue", "kl_controller": "continue"})
    carried = json.loads(runner.rl_overrides(r, 2, Path("rm2"), prev)[-1][len("continue_from=") :])
    assert carried["critic"] and carried["optimizer"] and carried["kl_controller"]
    r = _recipe(tmp_path, carry={"reference": "previous"})
    wired = runner.rl_overrides(r, 2, Path("rm2"), prev)
    assert f"sft_dir={prev}" in wired and "continue_from=null" in wired
    # the user's overrides come first: the wiring wins
    r = _recipe(tmp_path, rl_overrides=["sft_dir=elsewhere", "train.max_steps=3"])
    wired = runner.rl_overrides(r, 1, Path("rm1"), None)
    assert wired.index("sft_dir=elsewhere") < wired.index("sft_dir=runs/x/sft")


def test_reward_sources_are_the_union_of_the_files(tmp_path, demo_assets):
    prefs = demo_assets / "data" / "preferences.jsonl"
    r = _recipe(tmp_path, reward_overrides=[f"data.sources.0.path={prefs}"])
    for k, n in ((1, 3), (2, 5)):
        d = runner.round_dir(r, k)
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(n)))
    initial = sum(1 for line in prefs.read_text().splitlines() if line.strip())
    got = runner.reward_sources(r, 2)
    assert [s["weight"] for s in got] == [float(initial), 3.0, 5.0] and got[0]["path"] == str(prefs)
    r = _recipe(tmp_path, reward_overrides=[f"data.sources.0.path={prefs}"], carry={"reward_model": "continue_new"})
    assert [s["weight"] for s in runner.reward_sources(r, 2)] == [5.0]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"sft": "recipes/demo/sft.yaml"}, "not both"),
        ({"samples_per_prompt": 3}, "even"),
        ({"min_labels": 2}, "min_labels"),
        ({"carry": {"reference": "previous", "critic": "continue"}}, "critic=continue"),
        ({"carry": {"reference": "sideways"}}, "reference"),
        ({"annotator": {"task": "demo", "noise": 0.9}}, "noise"),
        ({"annotator": {"task": "demo"}, "server": {"serve": False}}, "server.serve"),
        ({"labels_per_round": 1}, "labels_per_round must be >= 2, got 1"),
    ],
)
def test_bad_rounds_recipes_say_what_to_fix(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(tmp_path, **over)


def test_a_stage_recipe_that_fails_with_the_rounds_wiring_fails_before_anything_runs(tmp_path):
    r = _recipe(
        tmp_path,
        rl_overrides=["ppo.advantage_estimator=grpo", "ppo.rollouts_per_prompt=4"],
        carry={"critic": "continue"},
    )
    with pytest.raises(ConfigError, match=r"its rl recipe .*no critic to carry"):
        runner.run_rounds(r)
    assert not (tmp_path / "run").exists()


def test_an_edited_stage_recipe_is_refused_on_a_rerun(tmp_path):
    """Editing a stage recipe file between runs of one run directory would make the later rounds
    another experiment; the rerun is refused, naming the key. More rounds are fine."""
    rl = tmp_path / "ppo.yaml"
    rl.write_text((REPO / "recipes/demo/ppo.yaml").read_text())
    r = _recipe(tmp_path, rl=str(rl))
    (tmp_path / "run").mkdir()  # made by the run lock
    runner.check_recipe(r, runner.check_stage_recipes(r))
    recorded = json.loads((tmp_path / "run" / "stage_recipes.json").read_text())
    assert set(recorded) == {"reward", "rl", "eval"} and recorded["rl"]["path"] == str(rl)
    more = _recipe(tmp_path, rl=str(rl), rounds=5)
    runner.check_recipe(more, runner.check_stage_recipes(more))  # same recipes: accepted
    cfg = yaml.safe_load(rl.read_text())
    cfg["ppo"]["kl_coef"] = cfg["ppo"]["kl_coef"] / 2  # any value other than the shipped one
    rl.write_text(yaml.safe_dump(cfg))
    with pytest.raises(HandoffError, match=r"different stage recipes \(rl\.ppo\.kl_coef"):
        runner.check_recipe(r, runner.check_stage_recipes(r))


def test_continue_from_needs_a_finished_rl_run(tmp_path, sft_dir, reward_dir):
    from rlhf.config_rl import PPORecipe
    from rlhf.errors import HandoffError
    from rlhf.stages.ppo.trainer import check_handoff

    recipe = load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        [f"sft_dir={sft_dir}", f"reward_dir={reward_dir}", f"continue_from={{path: {reward_dir}}}"],
    )
    with pytest.raises(HandoffError, match="ppo"):
        check_handoff(recipe)
    with pytest.raises(ConfigError, match="no critic to carry"):
        load_recipe(
            PPORecipe,
            REPO / "recipes/demo/ppo.yaml",
            [
                f"sft_dir={sft_dir}",
                "ppo.advantage_estimator=grpo",
                "ppo.rollouts_per_prompt=4",
                "continue_from={path: x, critic: true}",
            ],
        )


# --------------------------------------------------------------------------------------------
# The whole loop as a user runs it, killed twice and resumed.
# --------------------------------------------------------------------------------------------


def write_rounds(assets: Path, sft: Path, rm: Path, out: Path, path: Path, delay: float) -> Path:
    a = str(assets)
    common = [f"demo_assets={a}", "tracking.wandb=false"]
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "sft_dir": str(sft),
                "initial_reward_dir": str(rm),
                "reward": str(REPO / "recipes/demo/reward.yaml"),
                "rl": str(REPO / "recipes/demo/ppo.yaml"),
                "eval": str(REPO / "recipes/demo/eval.yaml"),
                "prompts": {"path": f"{a}/data/prompts.jsonl"},
                "rounds": 2,
                "labels_per_round": 10,
                "pool_factor": 2,
                "overlap": 2,
                "min_labels": 2,
                "generation": {"max_new_tokens": 16},
                "annotator": {"task": "demo", "annotators": 2, "delay_seconds": delay},
                "poll_seconds": 0.2,
                "reward_overrides": common
                + [
                    f"data.sources.0.path={a}/data/preferences.jsonl",
                    "train.max_steps=8",
                    "train.eval_steps=4",
                    "train.save_steps=4",
                ],
                "rl_overrides": common
                + [
                    f"prompts.sources.0.path={a}/data/prompts.jsonl",
                    "train.max_steps=6",
                    "train.save_steps=2",
                    "ppo.rollout_batch_size=16",
                    "train.micro_batch_size=8",
                    "generation.max_new_tokens=16",
                ],
                "eval_overrides": common
                + [
                    "base_dir=null",
                    f"prompts.sources.0.path={a}/data/heldout_prompts.jsonl",
                    "samples_per_prompt=1",
                    "best_of_n=0",
                ],
            }
        )
    )
    return path


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", "rounds", "--config", str(cfg)],
        cwd=REPO,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL reaches the launcher and the stage too
    )


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _labels(db: Path) -> set[tuple[int, int]]:
    if not db.is_file():
        return set()
    from sqlalchemy.exc import OperationalError

    engine = store.connect(str(db))
    try:
        with engine.connect() as c:
            rows = c.execute(select(store.labels.c.pair_id, store.labels.c.annotator_id))
            return {(r.pair_id, r.annotator_id) for r in rows}
    except OperationalError:  # the run is creating the database right now: no labels yet
        return set()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def killed_and_resumed(demo_assets, sft_dir, reward_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    out, log = tmp / "run", tmp / "rounds.log"
    cfg = write_rounds(demo_assets, sft_dir, reward_dir, out, tmp / "rounds.yaml", delay=0.4)
    db = out / "labels.sqlite"
    # 1. SIGKILL while round 1 waits for labels (some given, not all).
    proc = _start(cfg, log)
    _kill_when(proc, lambda: 0 < len(_labels(db)) < 20, "round 1's first labels")
    before_kill = _labels(db)
    assert not (out / "round-1" / "heldout.jsonl").exists()
    # 2. SIGKILL while round 1's RL trains (a saved state, no manifest yet).
    proc = _start(cfg, log)
    ppo = out / "round-1" / "ppo"
    _kill_when(proc, lambda: (ppo / "checkpoints" / "step-2" / "trainer_state.json").is_file(), "round 1's RL state")
    assert not (ppo / MANIFEST).exists(), "RL finished before the kill; the test did not interrupt training"
    # 3. Resume to the end.
    proc = _start(cfg, log)
    assert proc.wait(timeout=1200) == 0, log.read_text()[-4000:]
    return out, before_kill, log.read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rounds_resume_after_sigkill_with_nothing_lost_or_repeated(killed_and_resumed):
    out, before_kill, text = killed_and_resumed
    assert "resumed PPO from" in text  # the interrupted RL went on from its state
    engine = store.connect(str(out / "labels.sqlite"))
    with engine.connect() as c:
        per_pair = dict(c.execute(select(store.labels.c.pair_id, func.count()).group_by(store.labels.c.pair_id)).all())
        n_batches = c.execute(select(func.count()).select_from(store.batches)).scalar()
        n_pairs = c.execute(select(func.count()).select_from(store.pairs)).scalar()
    labels_now = {(p, a) for p, a in _labels(out / "labels.sqlite")}
    assert before_kill <= labels_now  # every acknowledged label survived the kill
    assert n_batches == 2 and n_pairs == sum(
        json.loads((out / f"round-{k}/round.json").read_text())["batch"]["pairs"] for k in (1, 2)
    )
    assert set(per_pair.values()) == {2} and len(per_pair) == n_pairs  # every pair: exactly the overlap
    for k in (1, 2):
        exported = [json.loads(x) for x in (out / f"round-{k}/labels.jsonl").read_text().splitlines()]
        train = (out / f"round-{k}/train.jsonl").read_text().splitlines()
        held = (out / f"round-{k}/heldout.jsonl").read_text().splitlines()
        assert len(train) + len(held) == len(exported) and held and not set(train) & set(held)


@pytest.mark.slow
@pytest.mark.distributed
def test_round_manifests_link_the_lineage(killed_and_resumed):
    out, _, _ = killed_and_resumed
    r1 = json.loads((out / "round-1/round.json").read_text())
    r2 = json.loads((out / "round-2/round.json").read_text())
    assert r1["policy_before"]["path"] == r1["pairs_from"]["path"]  # round 1 samples the SFT policy
    assert r2["pairs_from"]["path"] == r1["policy"]["path"] == str(out / "round-1/ppo")  # round 2: round 1's policy
    assert r2["reward_model_before"]["path"] == r1["reward_model"]["path"] == str(out / "round-1/reward")
    trained_on = [s["path"] for s in r2["reward_model"]["trained_on"]]
    assert trained_on[-2:] == [str(out / "round-1/train.jsonl"), str(out / "round-2/train.jsonl")]
    assert r2["labels"]["train"]["sha256"]
    # The stages' own manifests agree: round 2's reward model continued round 1's, its RL continued round 1's RL.
    rm2 = json.loads((out / "round-2/reward" / MANIFEST).read_text())
    rl2 = json.loads((out / "round-2/ppo" / MANIFEST).read_text())
    assert [p["path"] for p in rm2["parents"]] == [str(out / "round-1/reward")]
    assert str(out / "round-1/ppo") in [p["path"] for p in rl2["parents"]]
    assert rl2["recipe"]["continue_from"]["path"] == str(out / "round-1/ppo")
    report = json.loads((out / "report.json").read_text())["rounds"]
    assert [row["round"] for row in report] == [0, 1, 2]
    assert all(0 <= row["accuracy_before"] <= 1 and "ground_truth" in row and "kl_to_sft" in row for row in report[1:])
    for row, k in zip(report[1:], (1, 2)):  # the preferences are the round's non-tie labels; its time is recorded
        labels = [json.loads(x) for x in (out / f"round-{k}/labels.jsonl").read_text().splitlines()]
        assert row["preferences"] == sum(not x.get("tie") for x in labels) and row["seconds"] > 0
    md = (out / "report.md").read_text()
    assert (out / "rounds.png").is_file() and "| round |" in md and f"({report[1]['heldout_pairs']})" in md


def test_the_planted_blind_spot_is_absent_from_the_initial_data_and_penalised(demo_assets):
    from rlhf.demo import task
    from rlhf.tasks import BLIND_SPOTS

    repeated = "the pizza was pleasant and pleasant . i loved it ."
    assert task.repeats_a_word(repeated) and not task.repeats_a_word(GOOD)
    assert task.score_no_repeats(PROMPT[0]["content"], repeated) == 50.0
    assert task.score_no_repeats(PROMPT[0]["content"], GOOD) == task.score(PROMPT[0]["content"], GOOD).total == 100.0
    rows = [json.loads(x) for x in (demo_assets / "data" / "preferences.jsonl").read_text().splitlines()]
    distinct = [json.loads(x) for x in (demo_assets / "data" / "preferences_distinct.jsonl").read_text().splitlines()]
    assert any(task.repeats_a_word(r["chosen"]) or task.repeats_a_word(r["rejected"]) for r in rows)
    assert distinct and not any(
        task.repeats_a_word(r["chosen"]) or task.repeats_a_word(r["rejected"]) for r in distinct
    )
    assert len(distinct) > 0.7 * len(rows)  # most pairs stay: only the repeats are gone
    assert BLIND_SPOTS["demo_no_repeats"][1](repeated)
