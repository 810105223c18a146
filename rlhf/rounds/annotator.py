"""Scripted annotators and the labelling app, run beside a round while it waits for labels.

The stand-ins go through the same door as people: HTTP to the app, a bearer token each, the
`/api/next` -> `/api/labels` cycle of the page. So the server's rules (a pair is labelled only
after it was served to you, never twice by you, never more than `overlap` times) hold for them
exactly as for people, and a test of the loop is a test of the app too.

Hand-written on the standard library (urllib), because the loop is a few lines and the app's
own API is the contract.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rlhf.config_rounds import LabelServer, ScriptedAnnotator
from rlhf.label import store
from rlhf.tasks import GRADERS, PARTIAL_CREDIT

log = logging.getLogger("rlhf")

TOKENS_FILE = "scripted_annotators.json"


def judge(rng: random.Random, grade, prompt: str, left: str, right: str, spec: ScriptedAnnotator) -> dict[str, Any]:
    """One label as the API takes it: the side the grader scores higher (flipped `noise` of the
    time), and a strength from the size of the difference. Within `tie_below` it is a tie, except
    that equal scores are told apart by the task's partial credit with `spec.tie_break` (then
    strength 1); unequal scores are never reordered by it."""
    sl, sr = grade(prompt, left, False), grade(prompt, right, False)
    diff = abs(sl - sr)
    if diff <= spec.tie_below:
        partial = PARTIAL_CREDIT.get(spec.task) if spec.tie_break and sl == sr else None
        pl, pr = (partial(prompt, left), partial(prompt, right)) if partial else ((), ())
        if pl == pr:
            return {"choice": "tie"}
        sl, sr, diff = float(pl > pr), float(pr > pl), 0.0
    better = "left" if sl > sr else "right"
    if rng.random() < spec.noise:
        better = "right" if better == "left" else "left"
    return {"choice": better, "strength": 3 if diff >= 50 else 2 if diff >= 20 else 1}


def scripted_tokens(run_dir: Path, engine, spec: ScriptedAnnotator) -> dict[str, str]:
    """name -> token of the run's scripted annotators, made once. The file is written before the
    database rows (mode 0600), so a crash between the two is repaired on the next start."""
    path = run_dir / TOKENS_FILE
    tokens: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    wanted = [f"scripted-{i + 1}" for i in range(spec.annotators)]
    if any(n not in tokens for n in wanted):
        tokens = {n: tokens.get(n) or secrets.token_urlsafe(32) for n in wanted}
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(tokens))
        tmp.replace(path)
    for name, token in tokens.items():
        if store.annotator_for(engine, token) is None:
            store.add_annotator(engine, name, token=token)
    return {n: tokens[n] for n in wanted}


def _call(base: str, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"null")
        except ValueError:  # not JSON (a proxy's error page): keep the status and the text
            return e.code, body[:500].decode("utf-8", "replace")


def label_loop(base: str, name: str, token: str, spec: ScriptedAnnotator, stop: threading.Event) -> None:
    """Label whatever the app serves this annotator until `stop` is set."""
    grade = GRADERS[spec.task]
    rng = random.Random(f"{spec.seed}:{name}")
    while not stop.is_set():
        try:
            status, got = _call(base, token, "GET", "/api/next")
        except OSError as e:  # the server is starting or going away: try again
            log.debug("%s: %s", name, e)
            stop.wait(0.2)
            continue
        if status != 200:
            raise RuntimeError(f"scripted annotator {name}: GET /api/next answered {status}: {got}")
        pair = got["pair"]
        if pair is None:
            stop.wait(0.2)
            continue
        prompt = pair["prompt"][-1]["content"]
        label = {"pair_id": pair["pair_id"], **judge(rng, grade, prompt, pair["left"], pair["right"], spec)}
        status, got = _call(base, token, "POST", "/api/labels", label)
        if status not in (201, 409):  # 409: labelled or full already (a retry after a restart)
            raise RuntimeError(f"scripted annotator {name}: POST /api/labels answered {status}: {got}")
        if spec.delay_seconds:
            stop.wait(spec.delay_seconds)


class LabellingSession:
    """The app (when the recipe serves it) and the scripted annotators (when it has them), in
    threads of this process: they live exactly as long as the round waits, and die with it."""

    def __init__(self, db: str, run_dir: Path, server: LabelServer, spec: ScriptedAnnotator | None, engine):
        self.db, self.run_dir, self.server, self.spec, self.engine = db, run_dir, server, spec, engine
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._uvicorn = None
        self.url: str | None = None

    def __enter__(self) -> LabellingSession:
        if self.server.serve:
            self.url = self._serve()
        if self.spec is not None:
            if self.url is None:
                raise store.LabelError("scripted annotators label through the app: set server.serve=true")
            for name, token in scripted_tokens(self.run_dir, self.engine, self.spec).items():
                self._start(label_loop, self.url, name, token, self.spec, self.stop)
        return self

    def _start(self, fn, *args) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # surfaced by the waiting loop (check)
                self.errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def _serve(self) -> str:
        import uvicorn

        from rlhf.distributed import free_port
        from rlhf.label.server import Settings, create_app, exposure_warning

        port = self.server.port or free_port()
        app = create_app(self.db, Settings(lease_s=self.server.lease_minutes * 60))
        warning = exposure_warning(self.server.host)
        if warning:
            log.warning(warning)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(app, host=self.server.host, port=port, log_level="warning", lifespan="off")
        )
        t = threading.Thread(target=self._uvicorn.run, daemon=True)
        t.start()
        self.threads.append(t)
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not t.is_alive() or time.monotonic() > deadline:
                raise store.LabelError(f"the labelling app did not start on {self.server.host}:{port}")
            time.sleep(0.05)
        return f"http://{self.server.host}:{port}"

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]
        if self._uvicorn is not None and not self.threads[0].is_alive():
            raise store.LabelError("the labelling app stopped while the round waited for labels; rerun to resume")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        for t in self.threads:
            t.join(timeout=30)
