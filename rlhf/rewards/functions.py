"""Call user reward functions so that none of them can hang or kill the run.

Hand-written because the standard pools do not give this: `concurrent.futures.ProcessPoolExecutor`
marks the whole pool broken when one worker dies (`os._exit`) and cannot stop a call that never
returns, and `multiprocessing.Pool` hangs on a dead worker. Here one child process
(`rlhf.rewards.worker`) serves the calls one at a time over pipes; a call that raises, returns a
non-number or NaN, runs past its timeout (the child is killed) or takes the child down (it is
restarted) becomes a NaN score with a reason that names the function and the row, and the run
goes on. The trainer drops such responses from the update (see `rlhf.stages.ppo.scoring`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")


@dataclass
class Failure:
    row: int  # position in the scored batch
    function: str  # the spec, e.g. rewards.py:exact_answer
    reason: str  # "raised ValueError: ...", "timed out after 30s", "the process exited (code 3)", ...

    def __str__(self) -> str:
        return f"reward function {self.function} on row {self.row}: {self.reason}"


# The child must not join the training job's rendezvous or take its GPU through these.
_JOB_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "GROUP_RANK",
)
TIMEOUTS_BEFORE_GIVING_UP = 2  # per function and batch: then its remaining rows fail at once


class RewardFunctions:
    """Scores (prompt, response, fields) rows with every function of `specs` in a child process.

    Use as a context manager (or call `close`). `timeouts` are seconds per call, one per function.
    A function that times out TIMEOUTS_BEFORE_GIVING_UP times in one batch is not called again for
    the rest of that batch, so one that always hangs costs two timeouts per step, not one per row.
    """

    def __init__(self, specs: list[str], timeouts: list[float]):
        self.specs, self.timeouts = list(specs), list(timeouts)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._start()

    # -- the child -----------------------------------------------------------------------------
    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _JOB_ENV}
        env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
        root = str(Path(__file__).resolve().parents[2])  # so `-m rlhf...` imports this tree
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Its own session: a timeout kills the function's own children (e.g. a sandbox) too.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf.rewards.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=os.getcwd(),
            start_new_session=True,
        )
        self._send({"functions": self.specs})
        reply = self._receive(timeout=max(60.0, max(self.timeouts, default=0)))
        if reply is None or "error" in reply:
            self.close()
            why = "the process exited or did not answer" if reply is None else reply["error"]
            raise ConfigError(
                f"cannot load reward functions {self.specs}: {why}"
                + (f"\n{reply.get('traceback', '')}" if reply else "")
            )

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        """The next reply; None when the child stayed silent for `timeout` seconds (still running)
        or closed its end (it exited: `proc.returncode` is then set)."""
        with selectors.DefaultSelector() as sel:  # not select(): it fails on descriptors >= 1024
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return None
        return json.loads(line)

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self._start()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it started
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except OSError:  # the child's end is gone already
                    pass

    def close(self) -> None:
        self._kill()
        self.proc = None

    def __enter__(self) -> "RewardFunctions":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scoring -------------------------------------------------------------------------------
    def call(self, j: int, prompt: str, response: str, fields: dict) -> tuple[float, str | None]:
        """One call of function j: (value, None), or (nan, reason) on any failure."""
        try:
            request = json.dumps({"j": j, "prompt": prompt, "response": response, "fields": fields})
        except (TypeError, ValueError) as e:
            return math.nan, f"the row cannot be sent to the function ({e})"
        try:
            self.proc.stdin.write((request + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            reason = f"the process exited (code {self.proc.wait()})"
            self._restart()
            return math.nan, reason
        reply = self._receive(self.timeouts[j])
        if reply is None:
            code = self.proc.returncode
            reason = f"timed out after {self.timeouts[j]:g}s" if code is None else f"the process exited (code {code})"
            self._restart()
            return math.nan, reason
        if "error" in reply:
            return math.nan, reply["error"]
        return reply["value"], None

    def score(
        self, prompts: list[str], responses: list[str], fields: list[dict]
    ) -> tuple[list[list[float]], list[Failure]]:
        """Every function on every row: values[row][function] (nan where it failed), and the failures."""
        values, failures = [], []
        timeouts = [0] * len(self.specs)
        for i, (p, r, f) in enumerate(zip(prompts, responses, fields)):
            row = []
            for j, spec in enumerate(self.specs):
                if timeouts[j] >= TIMEOUTS_BEFORE_GIVING_UP:
                    value, reason = math.nan, f"not called: timed out {timeouts[j]} times in this batch"
                else:
                    value, reason = self.call(j, p, r, f)
                    timeouts[j] += bool(reason and reason.startswith("timed out"))
                row.append(value)
                if reason is not None:
                    failures.append(Failure(i, spec, reason))
            values.append(row)
        return values, failures
