"""Single-response labelling (KTO data): an annotator judges one answer good or bad, through the
same app, leases and overlap as pairs; the export feeds the DPO stage's KTO method as it is."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import REPO
from label_helpers import make_project
from rlhf.cli import main
from rlhf.config import load_recipe
from rlhf.label import project, store
from rlhf.label.server import create_app

ORIGIN = {"origin": "http://testserver"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_single_mode_serves_one_response_and_takes_good_or_bad(tmp_path, capsys):
    db = make_project(tmp_path, n_prompts=3, overlap=2, mode="single")
    engine = store.connect(str(db))
    assert store.mode(engine) == "single"
    ann, ben = (store.add_annotator(engine, n) for n in ("ann", "ben"))
    client = TestClient(create_app(str(db)), headers=ORIGIN)
    item = client.get("/api/next", headers=bearer(ann)).json()["pair"]
    assert set(item) == {"pair_id", "prompt", "response", "mode"} and item["mode"] == "single"
    # A pair's choices are refused, with a message saying what this project takes; nothing is stored.
    bad = client.post("/api/labels", json={"pair_id": item["pair_id"], "choice": "left"}, headers=bearer(ann))
    assert bad.status_code == 422 and "choice must be one of good, bad" in bad.text
    judged = {}
    for token, name in ((ann, "ann"), (ben, "ben")):
        while (nxt := client.get("/api/next", headers=bearer(token)).json()["pair"]) is not None:
            good = "great" in nxt["response"]
            if name == "ben" and nxt["pair_id"] == item["pair_id"]:
                good = not good  # one split vote
            r = client.post(
                "/api/labels",
                json={"pair_id": nxt["pair_id"], "choice": "good" if good else "bad"},
                headers=bearer(token),
            )
            assert r.status_code == 201
            judged.setdefault(nxt["pair_id"], []).append(good)
    assert len(judged) == 6 and all(len(v) == 2 for v in judged.values())  # overlap 2, each item once per annotator
    out = tmp_path / "kto.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "wrote 5 judged responses" in said and "left out: 1 split votes" in said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["label"] for r in rows} == {True, False}
    assert all(r["label"] == ("great" in r["completion"]) for r in rows)
    assert rows[0]["provenance"]["annotators"] == ["ann", "ben"]


def test_single_mode_page_has_good_and_bad_buttons(tmp_path):
    db = make_project(tmp_path, n_prompts=1, mode="single")
    engine = store.connect(str(db))
    token = store.add_annotator(engine, "ann")
    client = TestClient(create_app(str(db)), headers=ORIGIN)
    page = client.get("/label", headers=bearer(token)).text
    assert 'data-choice="good"' in page and 'data-choice="bad"' in page and 'data-choice="left"' not in page
    assert 'data-mode="single"' in page and "Is this a good answer" in page


def test_pairs_projects_refuse_good_and_bad(tmp_path):
    db = make_project(tmp_path, n_prompts=1)
    engine = store.connect(str(db))
    token = store.add_annotator(engine, "ann")
    client = TestClient(create_app(str(db)), headers=ORIGIN)
    nxt = client.get("/api/next", headers=bearer(token)).json()["pair"]
    r = client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": "good"}, headers=bearer(token))
    assert r.status_code == 422 and "choice must be one of left, right, tie, both_bad" in r.text


def test_single_mode_refuses_a_second_policy(tmp_path):
    from rlhf.config import GenerationSettings

    with pytest.raises(ValueError, match="single mode judges each answer alone"):
        project.init_project(
            str(tmp_path / "x.sqlite"),
            prompts_path="p",
            policy="a",
            policy_b="b",
            samples=2,
            candidates_path=None,
            overlap=1,
            reward_model=None,
            gen=GenerationSettings(),
            mode="single",
        )


@pytest.mark.slow
def test_kto_stage_trains_on_the_single_mode_export(demo_assets, sft_dir, tmp_path):
    """Responses from the demo's preference pairs, judged through the API (chosen = good), exported
    and trained on by KTO with no conversion and bad rows fatal."""
    from rlhf.config_dpo import DPORecipe
    from rlhf.config import GenerationSettings
    from rlhf.stages.dpo import run_dpo

    prefs = [json.loads(line) for line in (demo_assets / "data/preferences.jsonl").read_text().splitlines()[:60]]
    cands = tmp_path / "cands.jsonl"
    cands.write_text(
        "".join(
            json.dumps({"prompt": p["prompt"], "response": r}) + "\n"
            for p in prefs
            for r in (p["chosen"], p["rejected"])
        )
    )
    db = tmp_path / "labels.sqlite"
    project.init_project(
        str(db),
        prompts_path=None,
        policy=None,
        policy_b=None,
        samples=1,
        candidates_path=str(cands),
        overlap=1,
        reward_model=None,
        gen=GenerationSettings(),
        mode="single",
    )
    engine = store.connect(str(db))
    token = store.add_annotator(engine, "ann")
    client = TestClient(create_app(str(db)))
    chosen = {p["chosen"] for p in prefs}
    while (nxt := client.get("/api/next", headers=bearer(token)).json()["pair"]) is not None:
        choice = "good" if nxt["response"] in chosen else "bad"
        assert (
            client.post(
                "/api/labels", json={"pair_id": nxt["pair_id"], "choice": choice}, headers=bearer(token)
            ).status_code
            == 201
        )
    out = tmp_path / "kto.jsonl"
    counts = project.export(engine, out)
    assert counts["good"] >= 50 and counts["bad"] >= 50
    recipe = load_recipe(
        DPORecipe,
        REPO / "recipes/demo/dpo.yaml",
        [
            f"model.name_or_path={sft_dir}",
            f"data.sources.0.path={out}",
            "data.bad_rows=error",
            "demo_assets=null",
            f"output_dir={tmp_path / 'run'}",
            "tracking.wandb=false",
            "method=kto",
            "loss_type=kto",
            "train.max_steps=4",
            "train.micro_batch_size=8",
            "train.eval_steps=2",
            "train.save_steps=2",
        ],
    )
    m = json.loads((run_dpo(recipe) / "rlhf_manifest.json").read_text())
    assert m["stage"] == "dpo" and m["datasets"]["sources"][0]["bad"] == 0
    assert m["recipe"]["method"] == "kto" and m["metrics"]["global_step"] == 4
