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
import select
import subprocess
import sys
from dataclasses import dataclass

from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")


@dataclass
class Failure:
    row: int  # position in the scored batch
    function: str  # the spec, e.g. rewards.py:exact_answer
    reason: str  # "raised ValueError: ...", "timed out after 30s", "the process exited (code 3)", ...

    def __str__(self) -> str:
        return f"reward function {self.function} on row {self.row}: {self.reason}"


class RewardFunctions:
    """Scores (prompt, response, fields) rows with every function of `specs` in a child process.

    Use as a context manager (or call `close`). `timeouts` are seconds per call, one per function.
    """

    def __init__(self, specs: list[str], timeouts: list[float]):
        self.specs, self.timeouts = list(specs), list(timeouts)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._start()

    # -- the child -----------------------------------------------------------------------------
    def _start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        root = str(__import__("pathlib").Path(__file__).resolve().parents[2])  # so `-m rlhf...` imports this tree
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf.rewards.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=os.getcwd())
        self._send({"functions": self.specs})
        reply = self._receive(timeout=max(60.0, max(self.timeouts, default=0)))
        if reply is None or "error" in reply:
            self.close()
            why = "the process exited or did not answer" if reply is None else reply["error"]
            raise ConfigError(f"cannot load reward functions {self.specs}: {why}"
                              + (f"\n{reply.get('traceback', '')}" if reply else ""))

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        """The next reply; None when the child stayed silent for `timeout` seconds (still running)
        or closed its end (it exited: `proc.returncode` is then set)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
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
            self.proc.kill()
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
            self._send({"j": j, "prompt": prompt, "response": response, "fields": fields})
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

    def score(self, prompts: list[str], responses: list[str], fields: list[dict]
              ) -> tuple[list[list[float]], list[Failure]]:
        """Every function on every row: values[row][function] (nan where it failed), and the failures."""
        values, failures = [], []
        for i, (p, r, f) in enumerate(zip(prompts, responses, fields)):
            row = []
            for j, spec in enumerate(self.specs):
                value, reason = self.call(j, p, r, f)
                row.append(value)
                if reason is not None:
                    failures.append(Failure(i, spec, reason))
            values.append(row)
        return values, failures
