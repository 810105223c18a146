"""Load test of the labelling app: many concurrent annotators on loopback, bounded in count and time.

    .venv/bin/python scripts/label_load.py --db runs/label-load/labels.sqlite --url http://127.0.0.1:8765 \\
        [--clients 20 --labels 50 --timeout 120 --acked runs/label-load/acked.jsonl]

Creates `--clients` annotators in the database (load-...-00, -01, ...). Each one, in its own thread,
first tries to label a pair it was never served (the server must refuse it), then asks for its next
pair and labels it, `--labels` times, against a running `rlhf label serve`. Every acknowledged
label (HTTP 201) is appended to `--acked` as soon as the answer arrives, so a crash test can check
afterwards that each one is in the database. At the end it checks the database itself:
- lost: acknowledged labels that are not in it;
- over_overlap: pairs with more labels than the project's overlap;
- not_served: labels for a pair that was never served to their annotator (no assignment row),
  plus probes the server accepted.
Prints those, the latency percentiles of the label requests and the throughput, and writes JSON
(load.json) next to `--acked`. Only talks to the URL it is given, which must be on this machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def new_result() -> dict:
    return {"acked": 0, "errors": 0, "refused": {}, "latencies": [], "probe_accepted": 0}


def probe_unserved(http, n_pairs: int, rng: random.Random, out: dict) -> None:
    """A label for a pair this client was never served: anything but a refusal is a finding."""
    r = http.post("/api/labels", json={"pair_id": rng.randint(1, n_pairs), "choice": "left"})
    out["probe_accepted"] += r.status_code == 201


def label_once(http, rng: random.Random, out: dict, record) -> bool:
    """Ask for a pair and label it; False when nothing is left for this client."""
    nxt = http.get("/api/next").json()["pair"]
    if nxt is None:
        return False
    body = {
        "pair_id": nxt["pair_id"],
        "choice": rng.choice(["left", "right", "tie", "both_bad"]),
        "strength": rng.randint(1, 3),
    }
    t0 = time.perf_counter()
    r = http.post("/api/labels", json=body)
    out["latencies"].append(time.perf_counter() - t0)
    if r.status_code == 201:
        out["acked"] += 1
        record(r.json()["label_id"], body["pair_id"])
    else:
        out["refused"][r.status_code] = out["refused"].get(r.status_code, 0) + 1
    return True


def client_loop(
    url: str, token: str, n: int, n_pairs: int, deadline: float, acked_file, lock, out: dict, seed: int
) -> None:
    import httpx

    rng = random.Random(seed)

    def record(label_id: int, pair_id: int) -> None:
        with lock:
            acked_file.write(json.dumps({"label_id": label_id, "pair_id": pair_id, "token_tail": token[-6:]}) + "\n")
            acked_file.flush()

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
        probed = False
        while out["acked"] < n and time.monotonic() < deadline:
            try:
                if not probed:
                    probe_unserved(http, n_pairs, rng, out)
                    probed = True
                if not label_once(http, rng, out, record):
                    break
            except (httpx.TransportError, ValueError):  # server gone (crash test) or restarting
                out["errors"] += 1
                time.sleep(0.05)


def check_database(engine, acked_path: Path) -> dict[str, int]:
    """What the database says after the load: lost, over-overlap and never-served labels."""
    from sqlalchemy import func, select

    from rlhf.label import store

    acked = [json.loads(line) for line in acked_path.read_text().splitlines()]
    with engine.connect() as c:
        stored = dict(c.execute(select(store.labels.c.id, store.labels.c.pair_id)).all())
        per_pair = select(func.count().label("n")).select_from(store.labels).group_by(store.labels.c.pair_id).subquery()
        over = c.execute(select(func.count()).where(per_pair.c.n > store.overlap(c))).scalar()
        a = store.assignments
        unserved = c.execute(
            select(func.count())
            .select_from(
                store.labels.outerjoin(
                    a, (a.c.pair_id == store.labels.c.pair_id) & (a.c.annotator_id == store.labels.c.annotator_id)
                )
            )
            .where(a.c.pair_id.is_(None))
        ).scalar()
        max_per_pair = c.execute(select(func.max(per_pair.c.n))).scalar() or 0
    return {
        "labels_in_db": len(stored),
        "lost": sum(stored.get(r["label_id"]) != r["pair_id"] for r in acked),
        "over_overlap": int(over),
        "max_labels_per_pair": int(max_per_pair),
        "not_served_in_db": int(unserved),
    }


def summarize(args, results: list[dict], wall: float, db_check: dict[str, int]) -> dict:
    lat = [x for r in results for x in r["latencies"]]
    acked = sum(r["acked"] for r in results)
    return {
        "clients": args.clients,
        "labels_per_client": args.labels,
        "acked": acked,
        "errors": sum(r["errors"] for r in results),
        "seconds": wall,
        "labels_per_second": acked / wall,
        "refused": {
            str(k): sum(r["refused"].get(k, 0) for r in results) for k in {k for r in results for k in r["refused"]}
        },
        "probes_accepted": sum(r["probe_accepted"] for r in results),
        "not_served": db_check["not_served_in_db"] + sum(r["probe_accepted"] for r in results),
        **db_check,
        "latency_ms": {
            q: 1000 * percentile(lat, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "latency_mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--labels", type=int, default=50, help="labels per client")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole load")
    ap.add_argument("--acked", default=None, help="JSONL of acknowledged labels (default: next to the db)")
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load test only targets this machine (127.0.0.1 / localhost)")
    from sqlalchemy import func, select

    from rlhf.label import store

    engine = store.connect(args.db)
    with engine.connect() as c:
        n_pairs = c.execute(select(func.count()).select_from(store.pairs)).scalar()
    stamp = int(time.time() * 1000) % 10**8
    tokens = [store.add_annotator(engine, f"load-{stamp}-{i:02d}") for i in range(args.clients)]
    acked_path = Path(args.acked or Path(args.db).with_name("acked.jsonl"))
    lock = threading.Lock()
    results = [new_result() for _ in tokens]
    deadline = time.monotonic() + args.timeout
    t0 = time.perf_counter()
    with acked_path.open("a") as acked:
        threads = [
            threading.Thread(
                target=client_loop, args=(args.url, tok, args.labels, n_pairs, deadline, acked, lock, res, i)
            )
            for i, (tok, res) in enumerate(zip(tokens, results))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    summary = summarize(args, results, time.perf_counter() - t0, check_database(engine, acked_path))
    print(
        f"{summary['acked']} labels acknowledged by {args.clients} clients in {summary['seconds']:.1f}s "
        f"({summary['labels_per_second']:.0f}/s); {summary['errors']} transport errors; refused {summary['refused']}"
    )
    print("label latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["latency_ms"].items()))
    print(
        f"database: {summary['labels_in_db']} labels, {summary['lost']} acknowledged labels lost, "
        f"{summary['over_overlap']} pairs over the overlap (most on one pair: {summary['max_labels_per_pair']}), "
        f"{summary['not_served']} labels for pairs not served ({summary['probes_accepted']} of "
        f"{args.clients} unserved probes accepted)"
    )
    out = acked_path.with_name("load.json")
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
