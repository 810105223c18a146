"""`rlhf.stages.ppo.undo` on a plain module and AdamW: an undone step leaves no trace, so the next
step is exactly the one that would have been taken without it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhf.stages.ppo import undo


def _engine(seed: int = 0):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    module[0].bias.requires_grad_(False)  # frozen weights are not part of a step
    params = [p for p in module.parameters() if p.requires_grad]
    return SimpleNamespace(module=module, optimizer=torch.optim.AdamW(params, lr=0.1))


def _step(engine, x: torch.Tensor, scale: float = 1.0) -> None:
    engine.optimizer.zero_grad()
    (scale * engine.module(x).pow(2).sum()).backward()
    engine.optimizer.step()


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("steps_before", [0, 2])  # the first step undone (no state yet), or a later one
def test_an_undone_step_leaves_no_trace(steps_before):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    a, b = _engine(), _engine()
    for _ in range(steps_before):
        _step(a, x)
        _step(b, x)
    snap = undo.take(a)
    _step(a, x, scale=1e6)  # a wild step
    assert not all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(b)))
    undo.restore(a, snap)
    assert all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(b)))
    _step(a, x)
    _step(b, x)  # the step after the undo equals the one taken without the wild step
    assert all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(b)))
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i])


def test_a_snapshot_reuses_the_previous_ones_buffers_and_still_restores_exactly():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    a, b = _engine(), _engine()
    first = undo.take(a)
    _step(a, x)
    _step(b, x)
    second = undo.take(a, into=first)
    assert all(new is old for (_, new), (_, old) in zip(second.tensors, first.tensors))  # written over
    _step(a, x, scale=1e6)
    undo.restore(a, second)
    assert all(torch.equal(u, v) for u, v in zip(_weights(a), _weights(b)))
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i])


def test_the_base_optimizer_is_found_under_wrappers():
    e = _engine()
    inner = e.optimizer
    wrapped = SimpleNamespace(module=e.module, optimizer=SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner)))
    assert undo.base_optimizer(wrapped) is inner
    with pytest.raises(TypeError, match="no torch optimizer"):
        undo.base_optimizer(SimpleNamespace(module=e.module, optimizer=object()))
    assert undo.supports(2) and not undo.supports(3)
