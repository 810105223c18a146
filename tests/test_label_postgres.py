"""The labelling app on PostgreSQL (the team setup): the same code through a SQLAlchemy URL.
A throwaway server is started from Debian's postgresql package (scripts/test.sh installs it as
root); without it these tests are skipped, and SQLite is tested everywhere else. The overlap is
enforced in PostgreSQL's transactions too (an advisory lock): concurrent labels from separate
engines, the 20 x 50 load, and the load through two kill -9 of the app server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from conftest import free_port
from label_helpers import race_for_pair_one

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not BIN or shutil.which("runuser") is None or os.geteuid() != 0,
        reason="needs Debian's postgresql package and root (scripts/test.sh installs it)",
    ),
]


def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    pytest.importorskip("psycopg")
    import tempfile
    from pathlib import Path

    data = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))  # not under pytest's root-only tmp: postgres must reach it
    shutil.chown(data, "postgres")
    bin_dir, port = BIN[-1], free_port()
    r = as_postgres(f"{bin_dir}/initdb", "-D", str(data), "--auth=trust", "-U", "postgres")
    assert r.returncode == 0, r.stderr
    r = as_postgres(
        f"{bin_dir}/pg_ctl",
        "-D",
        str(data),
        "-l",
        str(data / "log"),
        "-w",
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
        "start",
    )
    assert r.returncode == 0, r.stderr + (data / "log").read_text()
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    as_postgres(f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(data, ignore_errors=True)


def fresh(pg_url: str, name: str) -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sqlalchemy.text(f"drop database if exists {name}"))
        c.execute(sqlalchemy.text(f"create database {name}"))
    engine.dispose()
    return pg_url.rsplit("/", 1)[0] + f"/{name}"


def init(url: str, tmp_path, n: int, overlap: int) -> None:
    from rlhf.config import GenerationSettings
    from rlhf.label import project

    rows = [
        {"prompt": f"write a review of thing {i} .", "response": r, "model": m}
        for i in range(n)
        for r, m in ((f"great {i} .", "m1"), (f"awful {i} .", "m2"))
    ]
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    project.init_project(
        url,
        prompts_path=None,
        policy=None,
        policy_b=None,
        samples=2,
        candidates_path=str(cands),
        overlap=overlap,
        reward_model=None,
        gen=GenerationSettings(),
    )


def test_label_and_export_on_postgres(pg_url, tmp_path):
    from rlhf.label import project, store
    from rlhf.label.server import create_app

    url = fresh(pg_url, "labels_app")
    init(url, tmp_path, n=4, overlap=2)
    engine = store.connect(url)
    tokens = [store.add_annotator(engine, n) for n in ("ann", "ben")]
    client = TestClient(create_app(url))
    for t in tokens:
        h = {"Authorization": f"Bearer {t}"}
        while (nxt := client.get("/api/next", headers=h).json()["pair"]) is not None:
            assert (
                client.post(
                    "/api/labels", json={"pair_id": nxt["pair_id"], "choice": "left", "strength": 2}, headers=h
                ).status_code
                == 201
            )
        again = client.post("/api/labels", json={"pair_id": 1, "choice": "right"}, headers=h)
        assert again.status_code == 409
    s = project.stats(engine)
    assert s["labels"] == 8 and s["overlapping_pairs"] == 4
    counts = project.export(engine, tmp_path / "prefs.jsonl")
    assert counts["written"] == 4


def test_concurrent_labels_never_exceed_the_overlap_on_postgres(pg_url, tmp_path):
    from rlhf.label import store

    url = fresh(pg_url, "labels_race")
    init(url, tmp_path, n=1, overlap=3)
    engine = store.connect(url)
    for i in range(12):
        store.add_annotator(engine, f"a{i}")
    with engine.connect() as c:  # 12 lapsed leases on the one pair: each may label while a place is free
        ids = [r.id for r in c.execute(store.annotators.select())]
    outcomes = race_for_pair_one(url, ids)
    assert sorted(outcomes) == ["full"] * 9 + ["ok"] * 3
    with engine.connect() as c:
        assert len(c.execute(store.labels.select()).all()) == 3


def check_pg(url: str, acked_path) -> int:
    """Every acknowledged label stored, none duplicated, none over the overlap, none unserved."""
    import sqlalchemy

    from test_label_load import OVERLAP

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as c:
        q = lambda sql: c.execute(sqlalchemy.text(sql))  # noqa: E731
        n = q("select count(*) from labels").scalar()
        dup = q(
            "select count(*) from (select pair_id, annotator_id from labels group by 1, 2 having count(*) > 1) d"
        ).scalar()
        over = q(f"select count(*) from (select pair_id from labels group by 1 having count(*) > {OVERLAP}) o").scalar()
        unserved = q(
            "select count(*) from labels l left join assignments s on s.pair_id = l.pair_id "
            "and s.annotator_id = l.annotator_id where s.pair_id is null"
        ).scalar()
        stored = dict(q("select id, pair_id from labels").all())
    engine.dispose()
    acked = [json.loads(line) for line in acked_path.read_text().splitlines()]
    assert dup == 0 and over == 0 and unserved == 0, (dup, over, unserved)
    lost = [a for a in acked if stored.get(a["label_id"]) != a["pair_id"]]
    assert not lost, f"{len(lost)} acknowledged labels lost, e.g. {lost[:3]}"
    return n


def test_concurrent_load_on_postgres(pg_url, tmp_path):
    from test_label_load import CLIENTS, LABELS, OVERLAP, PAIRS, assert_clean, load, start_server, stop

    url = fresh(pg_url, "labels_load")
    init(url, tmp_path, n=PAIRS, overlap=OVERLAP)
    port = free_port()
    server = start_server(url, port)
    try:
        proc = load(url, port, tmp_path / "acked.jsonl")
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(server)
    assert proc.returncode == 0, out[-3000:]
    print(out)  # the latency percentiles and the database checks, for the log
    summary = json.loads((tmp_path / "load.json").read_text())
    assert summary["acked"] == CLIENTS * LABELS and summary["errors"] == 0, summary
    assert_clean(summary)
    assert check_pg(url, tmp_path / "acked.jsonl") == CLIENTS * LABELS


def test_kill_9_twice_during_load_on_postgres(pg_url, tmp_path):
    from test_label_load import CLIENTS, LABELS, OVERLAP, PAIRS, assert_clean, load_through_kills

    url = fresh(pg_url, "labels_kill")
    init(url, tmp_path, n=PAIRS, overlap=OVERLAP)
    acked = tmp_path / "acked.jsonl"
    out, at_kill = load_through_kills(url, free_port(), acked)
    print(out, "acknowledged at each kill:", at_kill)
    n = check_pg(url, acked)
    assert len(at_kill) == 2 and 150 <= at_kill[0] < at_kill[1] < n
    summary = json.loads((tmp_path / "load.json").read_text())
    assert summary["errors"] > 0 and summary["acked"] == CLIENTS * LABELS
    assert_clean(summary)
