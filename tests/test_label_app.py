"""The labelling app through its HTTP interface (FastAPI's TestClient): auth, isolation between
annotators, escaping, bad input, durability, and the export feeding the reward stage."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from conftest import REPO
from label_helpers import make_project
from rlhf.cli import main
from rlhf.config import load_recipe
from rlhf.label import project, store
from rlhf.label.server import create_app


@pytest.fixture()
def app(tmp_path):
    db = make_project(tmp_path, overlap=2, prompt_text=None)
    engine = store.connect(str(db))
    tokens = {name: store.add_annotator(engine, name, is_admin=(name == "admin")) for name in ("ann", "ben", "admin")}
    client = TestClient(create_app(str(db)))
    return client, tokens, db, engine


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def count_labels(db) -> int:
    with sqlite3.connect(db) as c:  # a separate connection: sees only what was committed
        return c.execute("select count(*) from labels").fetchone()[0]


def test_every_endpoint_but_login_needs_a_token(app):
    client, tokens, _, _ = app
    assert client.get("/").status_code == 200
    for method, path in (("get", "/label"), ("get", "/admin"), ("get", "/api/next"), ("get", "/api/labels")):
        assert getattr(client, method)(path).status_code == 401, path
        assert getattr(client, method)(path, headers=bearer("not-a-token")).status_code == 401, path
    assert client.post("/api/labels", json={"pair_id": 1, "choice": "left"}).status_code == 401
    assert client.post("/label", data={"pair_id": 1, "choice": "left"}).status_code == 401
    assert client.post("/skip", data={"pair_id": 1}).status_code == 401
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    assert client.get("/admin", headers=bearer(tokens["ann"])).status_code == 403
    assert client.get("/admin", headers=bearer(tokens["admin"])).status_code == 200


def test_login_cookie_label_form_and_progress(app):
    client, tokens, db, _ = app
    r = client.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    page = client.get("/label")
    assert "you labelled <strong>0</strong>" in page.text
    pair_id = client.get("/api/next").json()["pair"]["pair_id"]
    r = client.post("/label", data={"pair_id": pair_id, "choice": "left", "strength": "3", "comment": "clear"},
                    follow_redirects=False)
    assert r.status_code == 303 and count_labels(db) == 1  # committed before the answer
    assert "you labelled <strong>1</strong>" in client.get("/label").text


def test_annotators_cannot_read_or_overwrite_each_others_labels(app):
    client, tokens, db, _ = app
    pair = client.get("/api/next", headers=bearer(tokens["ann"])).json()["pair"]
    assert client.post("/api/labels", json={"pair_id": pair["pair_id"], "choice": "left", "strength": 2},
                       headers=bearer(tokens["ann"])).status_code == 201
    # ann cannot label the same pair again (no overwrite of the acknowledged label)
    again = client.post("/api/labels", json={"pair_id": pair["pair_id"], "choice": "right"},
                        headers=bearer(tokens["ann"]))
    assert again.status_code == 409 and "already" in again.json()["detail"]
    # ben sees only his own labels, and his label on the same pair is his own row
    assert client.get("/api/labels", headers=bearer(tokens["ben"])).json()["labels"] == []
    assert client.post("/api/labels", json={"pair_id": pair["pair_id"], "choice": "tie"},
                       headers=bearer(tokens["ben"])).status_code == 201
    mine = client.get("/api/labels", headers=bearer(tokens["ann"])).json()["labels"]
    assert [(row["pair_id"], row["strength"]) for row in mine] == [(pair["pair_id"], 2)]
    with sqlite3.connect(db) as c:
        rows = c.execute("select a.name, l.choice from labels l join annotators a on a.id = l.annotator_id "
                         "order by a.name").fetchall()
    assert [r[0] for r in rows] == ["ann", "ben"] and rows[1][1] == "tie"


def test_sides_are_decided_by_the_server(app):
    client, tokens, db, engine = app
    pair = client.get("/api/next", headers=bearer(tokens["ann"])).json()["pair"]
    raw = store.pair(engine, pair["pair_id"])
    with sqlite3.connect(db) as c:
        texts = dict(c.execute("select id, text from candidates").fetchall())
    client.post("/api/labels", json={"pair_id": pair["pair_id"], "choice": "left"}, headers=bearer(tokens["ann"]))
    with sqlite3.connect(db) as c:
        choice, left_id = c.execute("select choice, left_id from labels").fetchone()
    assert texts[left_id] == pair["left"]  # what was on the left is what the label records
    assert choice == ("a" if left_id == raw["a_id"] else "b")


def test_prompts_and_responses_are_escaped(tmp_path):
    db = make_project(tmp_path, n_prompts=1, prompt_text="<script>alert('x')</script> review the pizza")
    token = store.add_annotator(store.connect(str(db)), "ann")
    page = TestClient(create_app(str(db))).get("/label", headers=bearer(token)).text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; review the pizza" in page


def test_malformed_and_oversized_requests_write_nothing(app):
    client, tokens, db, _ = app
    h = bearer(tokens["ann"])
    pair_id = client.get("/api/next", headers=h).json()["pair"]["pair_id"]
    bad = [({"pair_id": pair_id, "choice": "maybe"}, 422), ({"pair_id": pair_id}, 422),
           ({"pair_id": pair_id, "choice": "left", "strength": 9}, 422),
           ({"pair_id": pair_id, "choice": "left", "comment": "x" * 2001}, 422),
           ({"pair_id": 10**6, "choice": "left"}, 404)]
    for body, status in bad:
        r = client.post("/api/labels", json=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert "detail" in r.json()
    r = client.post("/api/labels", content=b"{" + b" " * 70_000 + b"}", headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["detail"]
    r = client.post("/api/labels", content=b"not json", headers={**h, "content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/label", data={"pair_id": pair_id, "choice": "sideways"}, headers=h)
    assert r.status_code == 422 and "invalid label" in r.json()["detail"]
    assert count_labels(db) == 0


def test_skip_moves_on_and_all_done(tmp_path):
    db = make_project(tmp_path, n_prompts=2)
    token = store.add_annotator(store.connect(str(db)), "ann")
    client = TestClient(create_app(str(db)))
    h = bearer(token)
    first = client.get("/api/next", headers=h).json()["pair"]["pair_id"]
    client.post("/skip", data={"pair_id": first}, headers=h)
    second = client.get("/api/next", headers=h).json()["pair"]["pair_id"]
    assert second != first
    client.post("/api/labels", json={"pair_id": second, "choice": "right"}, headers=h)
    assert client.get("/api/next", headers=h).json()["pair"] is None
    assert "All done" in client.get("/label", headers=h).text


def test_overlap_serves_each_pair_to_k_annotators_and_stats(app, capsys):
    client, tokens, db, engine = app
    for name in ("ann", "ben"):
        h = bearer(tokens[name])
        while (nxt := client.get("/api/next", headers=h).json()["pair"]) is not None:
            choice = "left" if name == "ann" or nxt["pair_id"] % 3 else "tie"
            client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": choice, "strength": 3}, headers=h)
    # overlap 2: both labelled all 6 pairs, and the admin has nothing left
    assert client.get("/api/next", headers=bearer(tokens["admin"])).json()["pair"] is None
    s = project.stats(engine)
    assert s["labels"] == 12 and s["overlapping_pairs"] == 6
    assert {n: a["labels"] for n, a in s["annotators"].items()} == {"ann": 6, "ben": 6}
    assert 0.0 <= s["raw_agreement"] <= 1.0 and s["tie_rate"] == pytest.approx(2 / 12)
    assert main(["label", "stats", "--db", str(db)]) == 0
    assert "12 labels on 6 of 6 pairs" in capsys.readouterr().out


def test_export_majority_vote_in_the_reward_format(app, tmp_path, capsys):
    from rlhf.config import DataConfig, DataSource
    from rlhf.data.formats import normalize_preference
    from rlhf.data.prepare import prepare_splits

    client, tokens, db, engine = app
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0  # empty project
    assert "wrote 0 preference pairs" in capsys.readouterr().out and out.read_text() == ""
    pairs = []
    h = bearer(tokens["ann"])
    while (nxt := client.get("/api/next", headers=h).json()["pair"]) is not None:
        pairs.append(nxt)
        client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": "left", "strength": 3}, headers=h)
        if len(pairs) == 4:
            break  # partly labelled
    client.post("/api/labels", json={"pair_id": pairs[0]["pair_id"], "choice": "right", "strength": 1},
                headers=bearer(tokens["ben"]))  # 1 vs 1 on the first pair: a tie
    client.post("/api/labels", json={"pair_id": pairs[1]["pair_id"], "choice": "both_bad"},
                headers=bearer(tokens["ben"]))  # left vs both_bad on the second: a draw -> tie
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "wrote 4 preference pairs" in said and "2 unlabelled" in said
    by_pair = {r["provenance"]["pair_id"]: r for r in rows}
    assert by_pair[pairs[0]["pair_id"]]["tie"] is True and by_pair[pairs[1]["pair_id"]]["tie"] is True
    clear = by_pair[pairs[2]["pair_id"]]
    assert clear["tie"] is False and clear["chosen"] == pairs[2]["left"] and clear["rejected"] == pairs[2]["right"]
    assert clear["margin"] == pytest.approx(1.0)  # strength 3 -> 0.5 x (3 - 1)
    assert clear["provenance"]["annotators"] == ["ann"] and clear["provenance"]["chosen_source"] in ("m1", "m2")
    # the reward stage reads the export as it is: 2 clear pairs and 2 ties
    cfg = DataConfig(sources=[DataSource(path=str(out))], validation_fraction=0.0, bad_rows="error")
    got = prepare_splits(cfg, normalize_preference).train
    assert len(got) == 4 and sum(p["tie"] for p in got) == 2
    assert main(["label", "export", "--db", str(db), "--out", str(out), "--ties", "drop"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_cli_errors_are_clear(tmp_path, capsys):
    db = make_project(tmp_path)
    assert main(["label", "add-annotator", "ann", "--db", str(db)]) == 0
    assert main(["label", "add-annotator", "ann", "--db", str(db)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["label", "stats", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no labelling database" in capsys.readouterr().err
    assert main(["label", "init", "--db", str(db), "--candidates", str(tmp_path / "candidates.jsonl")]) == 2
    assert "exists" in capsys.readouterr().err


def test_init_from_two_policies_with_active_sampling(sft_dir, reward_dir, demo_assets, tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    assert main(["label", "init", "--db", str(db), "--prompts", str(demo_assets / "data/heldout_prompts.jsonl"),
                 "--policy", str(sft_dir), "--policy-b", str(demo_assets / "base"), "--samples", "2",
                 "--reward-model", str(reward_dir), "--max-new-tokens", "16"]) == 0
    assert "24 prompts" in capsys.readouterr().out
    with sqlite3.connect(db) as c:
        sources = {r[0] for r in c.execute("select distinct source from candidates")}
        prios = [r[0] for r in c.execute("select priority from pairs order by priority")]
        settings = json.loads(c.execute("select settings from candidates limit 1").fetchone()[0])
    assert sources == {str(sft_dir), str(demo_assets / "base")}
    assert len(prios) >= 20 and all(0 <= p <= 0.5 for p in prios)  # |P(a > b) - 1/2|
    assert settings["max_new_tokens"] == 16
    token = store.add_annotator(store.connect(str(db)), "ann")
    first = TestClient(create_app(str(db))).get("/api/next", headers=bearer(token)).json()["pair"]["pair_id"]
    with sqlite3.connect(db) as c:
        least_certain = c.execute("select id from pairs order by priority, id limit 1").fetchone()[0]
    assert first == least_certain


def test_reward_stage_trains_on_the_export(demo_assets, sft_dir, tmp_path):
    """Candidates from the demo's preference pairs, labelled through the API as the annotator
    stand-in judged them, exported, and trained on by the reward stage with no conversion."""
    from rlhf.config import GenerationSettings, RewardRecipe
    from rlhf.stages.reward import run_reward

    prefs = [json.loads(line) for line in (demo_assets / "data/preferences.jsonl").read_text().splitlines()[:160]]
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": p["prompt"], "response": r, "model": m}) + "\n"
                             for i, p in enumerate(prefs)
                             for r, m in ((p["chosen"], f"c{i}"), (p["rejected"], f"r{i}"))))
    db = tmp_path / "labels.sqlite"
    # one pair per distinct prompt in the file: candidates are grouped by prompt, paired two by two
    project.init_project(str(db), prompts_path=None, policy=None, policy_b=None, samples=2,
                         candidates_path=str(cands), overlap=1, reward_model=None, gen=GenerationSettings())
    engine = store.connect(str(db))
    token = store.add_annotator(engine, "ann")
    client = TestClient(create_app(str(db)))
    h = bearer(token)
    chosen_texts = {p["chosen"] for p in prefs}
    n = 0
    while (nxt := client.get("/api/next", headers=h).json()["pair"]) is not None:
        choice = "left" if nxt["left"] in chosen_texts else "right"
        assert client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": choice, "strength": 2},
                           headers=h).status_code == 201
        n += 1
    out = tmp_path / "prefs.jsonl"
    assert project.export(engine, out)["written"] == n and n >= 60
    recipe = load_recipe(RewardRecipe, REPO / "recipes/demo/reward.yaml", [
        f"model.name_or_path={sft_dir}", f"data.sources.0.path={out}", "data.bad_rows=error", "demo_assets=null",
        f"output_dir={tmp_path / 'run'}", "tracking.wandb=false", "train.num_epochs=1", "train.micro_batch_size=8",
        "train.eval_steps=4", "train.save_steps=4"])
    done = run_reward(recipe)
    m = json.loads((done / "rlhf_manifest.json").read_text())
    assert m["stage"] == "reward" and m["metrics"]["validation"]["pairs"] >= 5
