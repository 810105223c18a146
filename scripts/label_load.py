"""Load test of the labelling app: many concurrent annotators on loopback, bounded in count and time.

    .venv/bin/python scripts/label_load.py --db runs/label-load/labels.sqlite --url http://127.0.0.1:8765 \\
        [--clients 20 --labels 50 --timeout 120 --acked runs/label-load/acked.jsonl]

Creates `--clients` annotators in the database (load-00, load-01, ...). Each one, in its own thread,
asks for its next pair and labels it, `--labels` times, against a running `rlhf label serve`.
Every acknowledged label (HTTP 201) is appended to `--acked` as soon as the answer arrives, so a
crash test can check afterwards that each one is in the database. Prints the latency
percentiles of the label requests and the throughput, and writes JSON next to `--acked`. Only
talks to the URL it is given, which must be on this machine.
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


def client_loop(url: str, token: str, n: int, deadline: float, acked_file, lock, out: dict, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
        while out["acked"] < n and time.monotonic() < deadline:
            try:
                nxt = http.get("/api/next").json()["pair"]
                if nxt is None:
                    break
                body = {"pair_id": nxt["pair_id"], "choice": rng.choice(["left", "right", "tie", "both_bad"]),
                        "strength": rng.randint(1, 3)}
                t0 = time.perf_counter()
                r = http.post("/api/labels", json=body)
                out["latencies"].append(time.perf_counter() - t0)
            except (httpx.TransportError, ValueError):  # server gone (crash test) or restarting
                out["errors"] += 1
                time.sleep(0.05)
                continue
            if r.status_code == 201:
                out["acked"] += 1
                with lock:
                    acked_file.write(json.dumps({"label_id": r.json()["label_id"], "pair_id": body["pair_id"],
                                                 "token_tail": token[-6:]}) + "\n")
                    acked_file.flush()
            else:
                out["refused"][r.status_code] = out["refused"].get(r.status_code, 0) + 1


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
    from rlhf.label import store

    engine = store.connect(args.db)
    stamp = int(time.time() * 1000) % 10**8
    tokens = [store.add_annotator(engine, f"load-{stamp}-{i:02d}") for i in range(args.clients)]
    acked_path = Path(args.acked or Path(args.db).with_name("acked.jsonl"))
    lock = threading.Lock()
    results = [{"acked": 0, "errors": 0, "refused": {}, "latencies": []} for _ in tokens]
    deadline = time.monotonic() + args.timeout
    t0 = time.perf_counter()
    with acked_path.open("a") as acked:
        threads = [threading.Thread(target=client_loop, args=(args.url, tok, args.labels, deadline, acked, lock, res, i))
                   for i, (tok, res) in enumerate(zip(tokens, results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    lat = [x for r in results for x in r["latencies"]]
    summary = {"clients": args.clients, "labels_per_client": args.labels, "acked": sum(r["acked"] for r in results),
               "errors": sum(r["errors"] for r in results), "seconds": wall,
               "labels_per_second": sum(r["acked"] for r in results) / wall,
               "refused": {str(k): sum(r["refused"].get(k, 0) for r in results) for k in
                           {k for r in results for k in r["refused"]}},
               "latency_ms": {q: 1000 * percentile(lat, p) for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                                                         ("max", 1.0))},
               "latency_mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan")}
    print(f"{summary['acked']} labels acknowledged by {args.clients} clients in {wall:.1f}s "
          f"({summary['labels_per_second']:.0f}/s); {summary['errors']} transport errors; refused {summary['refused']}")
    print("label latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["latency_ms"].items()))
    out = acked_path.with_name("load.json")
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
