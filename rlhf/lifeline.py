"""A stage dies with the run that launched it.

`rlhf pipeline` and `rlhf rounds` launch each stage as a child (through the deepspeed launcher for
training). If the run itself is killed with SIGKILL, the stage would otherwise keep training, unseen,
until it next writes to its closed output pipe, and a rerun would find it still writing the same
directory (the run lock covers the run process, not its orphans). So the run names itself in the
stage's environment, and the stage watches that process through a pidfd: when it exits, the stage
exits too, and a rerun resumes from the last checkpoint as after any crash.

Hand-written because the standard library already has what it needs (`os.pidfd_open`, Linux 5.3+);
where it is missing the stage simply runs on, as before.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading

ENV = "RLHF_LAUNCHED_BY"
"""'<hostname>:<pid>:<start time>' of the run process that launched this stage."""

EXIT_CODE = 75
"""The stage's exit code when its run is gone (EX_TEMPFAIL: rerun to resume)."""


def _start_time(pid: int | str) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which
    with the pid names one process: a pid can be reused, the pair cannot."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launched_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this process named as the launcher of the child about to start."""
    me = os.getpid()
    return {**env, ENV: f"{socket.gethostname()}:{me}:{_start_time(me)}"}


def watch_from_env() -> bool:
    """In a stage: exit when the run that launched it exits. Returns whether it is watching.

    The hostname guards multi-node runs: a launcher that forwards the environment to another node
    carries a pid that means nothing there. The start time guards against a reused pid (the run
    died while this stage was starting, and another process got its number)."""
    parts = os.environ.get(ENV, "").rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid, started = parts
    if host != socket.gethostname() or not pid.isdigit() or started in ("", "None"):
        return False
    try:
        fd = os.pidfd_open(int(pid))
    except ProcessLookupError:  # gone before this stage got here
        _stop()
    except (AttributeError, OSError):  # no pidfd on this system: run on unwatched
        return False
    if _start_time(pid) != started:  # another process has the run's pid: the run is gone
        _stop()
    threading.Thread(target=_wait, args=(fd,), daemon=True, name="rlhf-lifeline").start()
    return True


def _wait(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # a pidfd turns readable when its process exits
    poller.poll()
    _stop()


def _stop() -> None:
    try:  # the output pipe most likely went with the run
        print(
            "[rlhf] the run that launched this stage has exited; stopping here (rerun it to resume)",
            file=sys.stderr,
            flush=True,
        )
    except OSError:
        pass
    finally:
        os._exit(EXIT_CODE)  # at once, as after a kill: every write the stage makes is atomic or resumable
