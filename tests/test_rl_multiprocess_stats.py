"""2 processes (gloo) compute the RL statistics exactly as 1 process does on the same global batch:
advantage whitening, the running reward normaliser, and the KL controller's input."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from conftest import free_port
from rlhf.config_rl import PPOSettings
from rlhf.stages.ppo.losses import KLController, RunningMoments
from rlhf.stages.ppo.rollout import advantages_and_returns


def _batch():
    g = torch.Generator().manual_seed(0)
    B, R = 8, 6
    values = torch.randn(B, R, generator=g)
    rewards = torch.randn(B, R, generator=g) * 0.1
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    scores = torch.randn(B, generator=g) * 3 + 1
    kl = torch.rand(B, generator=g) * 4  # per-sequence KL of each rollout
    return values, rewards, mask, scores, kl


def _single(ppo: PPOSettings):
    values, rewards, mask, scores, kl = _batch()
    adv, ret = advantages_and_returns(values, rewards, mask, ppo)
    running = RunningMoments()
    running.update(scores)
    ctl = KLController(0.05, target=1.0, horizon=100)
    ctl.update(kl.mean().item(), len(kl))
    return adv, ret, (running.mean, running.std, running.count), ctl.value


def _worker(rank: int, port: int, ppo: PPOSettings, out: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    import torch.distributed as dist

    from rlhf import distributed

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        values, rewards, mask, scores, kl = _batch()
        mine = slice(rank * 4, rank * 4 + 4)  # each rank holds half of the global batch
        adv, ret = advantages_and_returns(values[mine], rewards[mine], mask[mine], ppo,
                                          all_reduce=distributed.sum_over_ranks)
        running = RunningMoments()
        running.update(distributed.gather_over_ranks(scores[mine]))
        ctl = KLController(0.05, target=1.0, horizon=100)
        ctl.update(distributed.reduce_floats([kl[mine].mean().item()])[0], 4 * 2)
        out[rank] = (adv, ret, (running.mean, running.std, running.count), ctl.value)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_same_global_batch():
    ppo = PPOSettings(whiten_advantages=True)
    adv1, ret1, norm1, kl_coef1 = _single(ppo)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), ppo, out), nprocs=2, join=True)
        got = dict(out)
    adv2 = torch.cat([got[0][0], got[1][0]])
    ret2 = torch.cat([got[0][1], got[1][1]])
    torch.testing.assert_close(adv2, adv1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ret2, ret1)
    for rank in (0, 1):  # every rank holds the global normaliser and coefficient, not its own
        assert got[rank][2][2] == norm1[2] == 8
        assert abs(got[rank][2][0] - norm1[0]) < 1e-9 and abs(got[rank][2][1] - norm1[1]) < 1e-9
        assert abs(got[rank][3] - kl_coef1) < 1e-12
    # and the test can tell: whitening each half on its own gives other advantages
    values, rewards, mask, _, _ = _batch()
    local = advantages_and_returns(values[:4], rewards[:4], mask[:4], ppo)[0]
    assert not torch.allclose(local, adv1[:4], atol=1e-3)
