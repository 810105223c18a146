"""A stage launched by a run exits when the run is killed with SIGKILL (rlhf/lifeline.py), and runs
on when it was not launched by a run on this host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlhf import lifeline

# The stage stand-in: watches like `rlhf.cli.main`, says its pid, then works for a minute.
STAGE = textwrap.dedent(
    """
    import os, sys, time
    from rlhf import lifeline
    watching = lifeline.watch_from_env()
    print(f"{os.getpid()} {watching}", flush=True)
    time.sleep(60)
    """
)

# The run stand-in: launches the stage as `rlhf pipeline` / `rlhf rounds` do, then waits.
RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from rlhf.pipeline import run_logged
    run_logged([sys.executable, "-c", sys.argv[1]], Path(sys.argv[2]))
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes: it is not running
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_stage_exits_when_its_run_is_killed(tmp_path):
    run = subprocess.Popen([sys.executable, "-c", RUN, STAGE, str(tmp_path / "stage.log")], stdout=subprocess.PIPE)
    line = run.stdout.readline().decode().split()
    stage_pid, watching = int(line[0]), line[1]
    assert watching == "True" and _alive(stage_pid)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(stage_pid), "the stage kept running after its run was killed"


def test_a_stage_not_launched_here_is_not_watched(monkeypatch):
    monkeypatch.delenv(lifeline.ENV, raising=False)
    assert lifeline.watch_from_env() is False  # run by hand
    mine = lifeline.launched_env({})[lifeline.ENV].split(":", 1)[1]
    monkeypatch.setenv(lifeline.ENV, f"another-node:{mine}")
    assert lifeline.watch_from_env() is False  # the pid of another host's process means nothing here
    monkeypatch.setenv(lifeline.ENV, "garbage")
    assert lifeline.watch_from_env() is False


def _stage_with(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, lifeline.ENV: value}
    return subprocess.run([sys.executable, "-c", STAGE], env=env, capture_output=True, text=True, timeout=60)


def test_a_stage_whose_run_is_already_gone_stops_at_once():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, _, started = lifeline.launched_env({})[lifeline.ENV].split(":")
    out = _stage_with(f"{host}:{dead.pid}:{started}")
    assert out.returncode == lifeline.EXIT_CODE and "rerun it to resume" in out.stderr
    # a live process that is not the run (its pid reused): the start time tells them apart
    out = _stage_with(f"{host}:{os.getpid()}:{int(started) + 1}")
    assert out.returncode == lifeline.EXIT_CODE


def test_the_cli_watches_before_anything_else(monkeypatch):
    from rlhf import cli

    calls = []
    monkeypatch.setattr(lifeline, "watch_from_env", lambda: calls.append(1) or False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == [1]
