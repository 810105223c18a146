"""Rank helpers and the ONE DeepSpeed-config builder every stage uses.

Scale-out is DeepSpeed's job: we only translate a recipe into a DeepSpeed config dict and read
the environment the `deepspeed` launcher sets (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
This module must stay cheap to import: no deepspeed or torch.distributed at module level.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, DeepSpeedConfig, TrainConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_by_launcher() -> bool:
    """True under `deepspeed`/`torchrun`, which export RANK and WORLD_SIZE to every process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group_env() -> None:
    """Give a single process (`rlhf sft ...` without a launcher) the env a launcher would set.

    DeepSpeed always builds a process group, even for one rank; without these variables it tries
    MPI discovery and fails with an unhelpful message.
    """
    if not launched_by_launcher():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    remove_stale_build_locks()
    global _cleanup_registered
    if not _cleanup_registered:
        import atexit

        atexit.register(remove_shm_buffers)
        _cleanup_registered = True


_cleanup_registered = False


STALE_BUILD_LOCK_SECONDS = 600.0
"""A JIT build of DeepSpeed's CPU op takes under a minute here; a lock this old has no live owner."""


def remove_stale_build_locks(max_age: float = STALE_BUILD_LOCK_SECONDS) -> list[str]:
    """Remove torch's JIT-build lock files (`<torch extensions>/[<variant>/]<op>/lock`) older than
    `max_age` seconds; returns the paths removed.

    DeepSpeed compiles its CPU communication op on first use (and again when its build flags
    change), under a lock file of torch's (`torch.utils.file_baton`) that records no owner. A
    stage killed while it builds leaves that file, and every later stage then sleeps on it forever
    without a word: seen here after a round was stopped during its reward stage's start."""
    import glob
    import logging
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    removed = []
    for path in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        try:
            if time.time() - os.path.getmtime(path) > max_age:
                os.unlink(path)
                removed.append(path)
        except OSError:  # taken by a build that just finished, or not ours to remove
            continue
    for path in removed:
        logging.getLogger("rlhf").warning(
            "removed %s: a build lock left by a process killed while it compiled (it would block this stage)", path
        )
    return removed


def remove_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffers from /dev/shm at exit.

    DeepSpeed's shared-memory communication op (CPU) creates `deepspeed_allreduce_buffer_*` files of
    67 MB per rank and run and never removes them; /dev/shm is RAM, so a machine that runs many
    stages fills up until processes are OOM-killed. Unlinking only removes the names: a rank that
    still has a buffer mapped keeps it until it exits."""
    import glob

    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"))
    if not (addr and port and rank):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:  # already gone
            pass


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device():
    """Where a collective's tensors must live: the current GPU under NCCL, else the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(t):
    """A tensor summed over every rank (a copy; the input itself on a single process). Collective."""
    if not _group_active():
        return t
    import torch.distributed as dist

    out = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def reduce_floats(values: list[float], op: str = "mean") -> list[float]:
    """Plain numbers reduced over every rank: 'mean', 'sum', 'max' or 'min'. Collective."""
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    if not _group_active():
        return t.tolist()
    import torch.distributed as dist

    ops = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = t.to(_comm_device())
    dist.all_reduce(t, op=ops[op])
    t = t.cpu()
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


def gather_over_ranks(t):
    """(N, ...) on each rank -> (world * N, ...) concatenated in rank order, the same on every rank.
    Every rank must pass the same N. Collective."""
    if not _group_active():
        return t
    import torch
    import torch.distributed as dist

    local = t.detach().to(_comm_device()).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(t.device)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def _merge_user_config(built: dict, user: dict) -> dict:
    """User values win; a user "auto" takes the value built from the recipe (HF convention)."""
    out = copy.deepcopy(built)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_user_config(out[key], value)
        elif value == "auto" and key in out:
            continue
        else:
            out[key] = value
    return out


def _zero_section(ds: DeepSpeedConfig, pin: bool) -> dict[str, Any]:
    """The `zero_optimization` block: the stage, its buckets, and where offloaded states live."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": pin, "contiguous_gradients": True, "reduce_bucket_size": 5e7})
    if ds.zero_stage == 3:
        # Gather full weights when saving, so `save_pretrained` writes a usable model from shards.
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return zero


def _precision_sections(train: TrainConfig) -> dict[str, Any]:
    """The `bf16` and `fp16` blocks (fp16 with dynamic loss scaling)."""
    return {
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
    }


def _with_user_file(config: dict[str, Any], config_file: str, num_processes: int) -> dict[str, Any]:
    """Merge the user's DeepSpeed JSON over `config` (its values win, "auto" keeps ours); the
    global batch is recomputed from the merged micro batch and accumulation unless the file sets it."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"deepspeed.config_file {config_file!r} does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_file {config_file!r} is not valid JSON: {e}") from None
    config = _merge_user_config(config, user)
    if "train_batch_size" not in user:  # keep the three batch numbers consistent
        config["train_batch_size"] = (
            config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * num_processes
        )
    return config


def build_deepspeed_config(
    ds: DeepSpeedConfig,
    train: TrainConfig,
    num_processes: int,
    optimizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Translate the recipe's DeepSpeed and batch settings into a DeepSpeed config dict.

    Args:
        ds: ZeRO stage, offload and an optional user JSON whose values win.
        train: micro batch, gradient accumulation, clipping and precision.
        num_processes: data-parallel world size (the launcher's WORLD_SIZE).
        optimizer: AdamW params ({"lr":..., "weight_decay":...}) to let DeepSpeed build the
            optimizer itself. Needed with optimizer offload, where DeepSpeed's CPU Adam does the
            step; otherwise the caller's torch optimizer is used.
    """
    pin = _cuda_available()  # pinned host memory only helps (and only works) with a GPU
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * num_processes,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": _zero_section(ds, pin),
        **_precision_sections(train),
        "steps_per_print": 10**9,  # we log ourselves; DeepSpeed's own prints only add noise
        "wall_clock_breakdown": False,
    }
    if optimizer is not None:
        config["optimizer"] = {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8, **optimizer}}
        config["zero_force_ds_cpu_optimizer"] = ds.offload_optimizer
    if ds.config_file:
        config = _with_user_file(config, ds.config_file, num_processes)
    return config
