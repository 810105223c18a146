"""The labelling app on PostgreSQL (the team setup): the same code through a SQLAlchemy URL.
A throwaway server is started from Debian's postgresql package (scripts/test.sh installs it as
root); without it these tests are skipped, and SQLite is tested everywhere else."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from conftest import free_port

BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not BIN or shutil.which("runuser") is None or os.geteuid() != 0,
                                 reason="needs Debian's postgresql package and root (scripts/test.sh installs it)")]


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
    r = as_postgres(f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
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

    rows = [{"prompt": f"write a review of thing {i} .", "response": r, "model": m}
            for i in range(n) for r, m in ((f"great {i} .", "m1"), (f"awful {i} .", "m2"))]
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    project.init_project(url, prompts_path=None, policy=None, policy_b=None, samples=2, candidates_path=str(cands),
                         overlap=overlap, reward_model=None, gen=GenerationSettings())


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
            assert client.post("/api/labels", json={"pair_id": nxt["pair_id"], "choice": "left", "strength": 2},
                               headers=h).status_code == 201
        again = client.post("/api/labels", json={"pair_id": 1, "choice": "right"}, headers=h)
        assert again.status_code == 409
    s = project.stats(engine)
    assert s["labels"] == 8 and s["overlapping_pairs"] == 4
    counts = project.export(engine, tmp_path / "prefs.jsonl")
    assert counts["written"] == 4


def test_concurrent_load_on_postgres(pg_url, tmp_path):
    from test_label_load import start_server, stop

    url = fresh(pg_url, "labels_load")
    init(url, tmp_path, n=30, overlap=10)
    port = free_port()
    server = start_server(url, port)
    try:
        proc = subprocess.run([sys.executable, "scripts/label_load.py", "--db", url, "--url",
                               f"http://127.0.0.1:{port}", "--clients", "10", "--labels", "20", "--timeout", "90",
                               "--acked", str(tmp_path / "acked.jsonl")], capture_output=True, text=True,
                              timeout=200, cwd=os.path.dirname(os.path.dirname(__file__)))
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as c:
        n = c.execute(sqlalchemy.text("select count(*) from labels")).scalar()
        dup = c.execute(sqlalchemy.text("select count(*) from (select pair_id, annotator_id from labels "
                                        "group by 1, 2 having count(*) > 1) d")).scalar()
        stored = dict(c.execute(sqlalchemy.text("select id, pair_id from labels")).all())
    acked = [json.loads(line) for line in (tmp_path / "acked.jsonl").read_text().splitlines()]
    assert n == len(acked) == 200 and dup == 0
    assert all(stored[a["label_id"]] == a["pair_id"] for a in acked)
