"""Undo one optimizer step of a DeepSpeed training engine: a copy of what the step changes (the
trainable weights, the optimizer's own copy of them and its state), restored in place.

The KL guard (`update.ppo_update`) measures how far the policy has moved only on the forward pass
*after* an update, so without this it can refuse the next update but not take back the one that
threw the policy out of range. Hand-written because neither DeepSpeed nor torch keeps an in-memory
undo: DeepSpeed's checkpoints go through files, far too slow to write before every mini-batch.

Covered: ZeRO stages 0-2, with or without bf16 master weights and optimizer offload. What a step
writes lives in three places, and all three are copied: the module's trainable parameters (under
ZeRO-1/2 views into a flat buffer), the base optimizer's parameters (fp32 master partitions where
DeepSpeed keeps them), and that optimizer's state (Adam moments, step counts). ZeRO-3 is not
covered: its module parameters are partitioned placeholders (`supports` says so). The learning-rate
scheduler is not rewound: an undone step still counts towards the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps the weights, under DeepSpeed's wrappers (ZeRO, bf16)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")
    return opt


def supports(zero_stage: int) -> bool:
    """Whether a step can be undone at this ZeRO stage (not 3: its weights are partitioned away)."""
    return zero_stage < 3


@dataclass
class Snapshot:
    tensors: list[tuple[torch.Tensor, torch.Tensor]]  # (live tensor, copy) for every tensor a step writes
    state: dict[torch.Tensor, dict[str, Any]]  # optimizer state per parameter, copied ({} = none yet)


@torch.no_grad()
def take(engine, into: Snapshot | None = None) -> Snapshot:
    """Copy everything the engine's next optimizer step will change (memory: one more copy of the
    trainable weights and the optimizer state, on their own devices). With `into` (the previous
    snapshot of the same engine) its buffers are written over instead of allocating new ones:
    about 1.6 GB per update for a 135M full fine-tune, where fresh allocations cost page faults."""
    opt = base_optimizer(engine)
    live: dict[int, torch.Tensor] = {}
    for p in engine.module.parameters():
        if p.requires_grad:
            live[id(p)] = p.data
    for group in opt.param_groups:
        for p in group["params"]:
            live[id(p)] = p.data
    tensors = [(t, _copy(t, old)) for t, old in zip(live.values(), _buffers(into, len(live)))]
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            old = into.state.get(p, {}) if into is not None else {}
            state[p] = {k: _copy(v, old.get(k)) if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
    return Snapshot(tensors, state)


def _buffers(into: Snapshot | None, n: int) -> list[torch.Tensor | None]:
    """The previous snapshot's copies to write over, position by position (None: allocate)."""
    if into is None or len(into.tensors) != n:
        return [None] * n
    return [saved for _, saved in into.tensors]


def _copy(t: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """A copy of `t`, written into `buffer` when it fits."""
    if buffer is not None and buffer.shape == t.shape and buffer.dtype == t.dtype and buffer.device == t.device:
        return buffer.copy_(t)
    return t.clone()


def restore(engine, snap: Snapshot) -> None:
    """Put back what `take` copied, in place (every view and reference stays valid)."""
    opt = base_optimizer(engine)
    with torch.no_grad():
        for t, saved in snap.tensors:
            t.copy_(saved)
    for p, saved in snap.state.items():
        current = opt.state.get(p)
        if not saved:
            # No state before the undone step (it was the first). Zeroed in place rather than
            # dropped: DeepSpeed links each weight to these tensors once, after the first step, and
            # AdamW treats step 0 with zero moments exactly as fresh state.
            for k, v in (current or {}).items():
                if torch.is_tensor(v):
                    v.zero_()
                elif isinstance(v, (int, float)):
                    current[k] = type(v)(0)
            continue
        for k, v in saved.items():
            if torch.is_tensor(v) and torch.is_tensor(current.get(k)):
                current[k].copy_(v)
            else:
                current[k] = v.clone() if torch.is_tensor(v) else v
