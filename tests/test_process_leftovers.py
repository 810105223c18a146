"""What a killed process leaves behind must not block or fill the machine for the next stage:
torch's JIT-build lock of DeepSpeed's CPU op (a stage waits on it forever) and the run's lifeline
(tests/test_lifeline.py)."""

from __future__ import annotations

import os
import time

from rlhf import distributed


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    nested = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"  # torch's default layout
    fresh = tmp_path / "other_op" / "lock"  # a build running now
    for p in (stale, nested, fresh):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    old = time.time() - distributed.STALE_BUILD_LOCK_SECONDS - 60
    for p in (stale, nested):
        os.utime(p, (old, old))
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()  # the build itself stays
    removed = distributed.remove_stale_build_locks()
    assert sorted(removed) == sorted([str(stale), str(nested)])
    assert not stale.exists() and not nested.exists() and fresh.exists()
    assert (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()
    assert distributed.remove_stale_build_locks() == []
