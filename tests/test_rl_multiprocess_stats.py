"""2 processes (gloo) compute the RL statistics exactly as 1 process does on the same global batch:
every advantage estimator (group statistics over whole groups, whitening over the global batch),
the running reward normaliser, and the KL controller's input."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from conftest import free_port
from rlhf.config_rl import PPOSettings
from rlhf.stages.ppo.advantages import ESTIMATORS
from rlhf.stages.ppo.losses import KLController, RunningMoments
from rlhf.stages.ppo.rollout import advantages_and_returns


K = 2  # responses per prompt: each rank holds two whole groups


def _batch():
    g = torch.Generator().manual_seed(0)
    B, R = 8, 6
    values = torch.randn(B, R, generator=g)
    token_kl = torch.randn(B, R, generator=g) * 0.1
    lengths = torch.tensor([6, 3, 1, 5, 6, 2, 4, 6])
    mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    scores = torch.randn(B, generator=g) * 3 + 1
    kl = torch.rand(B, generator=g) * 4  # per-sequence KL of each rollout
    return values, token_kl * mask, mask, scores, kl


def _settings(name: str) -> PPOSettings:
    return PPOSettings(whiten_advantages=True, advantage_estimator=name, rollouts_per_prompt=K)


def _advantages(rows: slice, all_reduce=None) -> dict:
    values, token_kl, mask, scores, _ = _batch()
    return {
        name: advantages_and_returns(
            values[rows], scores[rows], token_kl[rows], mask[rows], _settings(name), kl_coef=0.05, all_reduce=all_reduce
        )
        for name in ESTIMATORS
    }


def _single():
    _, _, _, scores, kl = _batch()
    running = RunningMoments()
    running.update(scores)
    ctl = KLController(0.05, target=1.0, horizon=100)
    ctl.update(kl.mean().item(), len(kl))
    return _advantages(slice(None)), (running.mean, running.std, running.count), ctl.value


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    import torch.distributed as dist

    from rlhf import distributed

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _, _, _, scores, kl = _batch()
        mine = slice(rank * 4, rank * 4 + 4)  # each rank holds half of the global batch
        adv = _advantages(mine, all_reduce=distributed.sum_over_ranks)
        running = RunningMoments()
        running.update(distributed.gather_over_ranks(scores[mine]))
        ctl = KLController(0.05, target=1.0, horizon=100)
        ctl.update(distributed.reduce_floats([kl[mine].mean().item()])[0], 4 * 2)
        out[rank] = (adv, (running.mean, running.std, running.count), ctl.value)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_same_global_batch():
    adv1, norm1, kl_coef1 = _single()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        got = dict(out)
    for name in ESTIMATORS:
        adv2 = torch.cat([got[0][0][name][0], got[1][0][name][0]])
        ret2 = torch.cat([got[0][0][name][1], got[1][0][name][1]])
        torch.testing.assert_close(adv2, adv1[name][0], atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(ret2, adv1[name][1], msg=name)
    for rank in (0, 1):  # every rank holds the global normaliser and coefficient, not its own
        assert got[rank][1][2] == norm1[2] == 8
        assert abs(got[rank][1][0] - norm1[0]) < 1e-9 and abs(got[rank][1][1] - norm1[1]) < 1e-9
        assert abs(got[rank][2] - kl_coef1) < 1e-12
    # and the test can tell: whitening each half on its own gives other advantages
    local = _advantages(slice(0, 4))
    for name in ("gae", "reinforce_pp", "reinforce_pp_baseline"):
        assert not torch.allclose(local[name][0], adv1[name][0][:4], atol=1e-3), name
