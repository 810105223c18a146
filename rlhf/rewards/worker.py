"""The process that runs user reward functions (`python -m rlhf.rewards.worker`).

Protocol, one JSON object per line: the parent sends {"functions": [spec, ...]} first and gets
{"ready": true} or {"error": ...}; then each {"j": index, "prompt", "response", "fields"} gets
{"value": float} or {"error": "Type: message"}. The protocol uses a private copy of stdout, and
fd 1 is pointed at stderr, so a function that prints cannot corrupt the replies.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Callable


def load_function(spec: str) -> Callable:
    """`pkg.module:function` or `path/to/file.py:function` -> the callable; raises ValueError with the reason."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"{spec!r}: write module:function or file.py:function")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{spec!r}: no file {path.resolve()}")
        mod_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module  # dataclasses and pickling look modules up by name
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {target} has no function {name!r}")
    return fn


def _call(fn: Callable, request: dict) -> dict:
    try:
        value = fn(request["prompt"], request["response"], **request["fields"])
    except Exception as e:  # the user's code: report any failure, keep serving
        return {"error": f"{type(e).__name__}: {e}"}
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        try:
            value = value.item()
        except Exception:  # noqa: BLE001 - not a one-element array
            pass
    if not isinstance(value, (int, float)):  # bool is an int: True scores 1.0
        return {"error": f"returned {type(value).__name__}, not a number"}
    try:
        value = float(value)
    except OverflowError:
        return {"error": "returned an integer too large for a float"}
    if not math.isfinite(value):
        return {"error": f"returned {value}"}
    return {"value": value}


def _die_with_parent() -> None:
    """Exit when the training process dies, even by SIGKILL (no orphan keeps the pipe open)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: poll the parent instead
        import threading
        import time

        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    _die_with_parent()
    # The protocol runs on private copies of stdin / stdout: user code that prints goes to stderr,
    # and code that reads stdin reads nothing, instead of corrupting or eating the requests.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    requests = os.fdopen(os.dup(sys.stdin.fileno()), "r")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, sys.stdin.fileno())
    sys.stdout = sys.stderr
    sys.path.insert(0, os.getcwd())

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    first = json.loads(requests.readline())
    try:
        functions = [load_function(s) for s in first["functions"]]
    except Exception as e:  # noqa: BLE001 - import errors of any kind go back to the parent
        reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)})
        return
    reply({"ready": True})
    for line in requests:
        request = json.loads(line)
        reply(_call(functions[request["j"]], request))


if __name__ == "__main__":
    main()
