"""PPO maths against numbers worked out by hand, including all-masked and single-token cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.sampling import entropy_from_logits, logprobs_of
from rlhf.stages.ppo.losses import (
    KLController,
    RunningMoments,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol
    )


def test_masked_stats():
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    close(masked_mean(x, m), 2.0)
    close(masked_var(x, m), 1.0)
    close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]])
    close(masked_whiten(x, m, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_all_masked_and_single_token_give_zeros_not_nan():
    x, none = T([[5.0, 6.0]]), T([[0.0, 0.0]])
    assert masked_mean(x, none).item() == 0.0
    assert masked_var(x, none).item() == 0.0
    close(masked_whiten(x, none), [[0.0, 0.0]])
    one = T([[1.0, 0.0]])
    assert masked_var(x, one).item() == 0.0
    assert torch.isfinite(masked_whiten(x, one)).all()


def test_kl_estimators():
    logp, logq = T([[math.log(0.5)]]), T([[math.log(0.25)]])
    close(kl_penalty(logp, logq, "k1"), [[math.log(2)]])
    close(kl_penalty(logp, logq, "k3"), [[-0.5 + math.log(2)]])
    assert (kl_penalty(torch.randn(4, 5), torch.randn(4, 5), "k3") >= -1e-6).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, logq, "k2")


def test_token_rewards_put_the_score_on_the_last_response_token():
    scores = T([1.0, 2.0, 3.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(token_rewards(scores, kl, mask, kl_coef=0.5), [[-0.05, -0.1, 0.85], [1.75, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_gae_by_hand():
    r, v, m = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.5)
    close(adv, [[0.04 + 0.45 * 0.165, 0.165, 0.3]])


def test_gae_stops_at_the_end_of_each_sequence():
    r, v, m = T([[0.0, 1.0, 7.0]]), T([[0.5, 0.6, 9.0]]), T([[1.0, 1.0, 0.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.0]])  # padding's reward and value never leak back
    close(ret, [[1.0, 1.0, 0.0]])
    adv, ret = gae(T([[2.0, 0.0]]), T([[0.5, 3.0]]), T([[1.0, 0.0]]), 1.0, 0.95)  # single token
    close(adv, [[1.5, 0.0]])
    adv, ret = gae(T([[2.0, 0.0]]), T([[0.5, 3.0]]), T([[0.0, 0.0]]), 1.0, 0.95)  # all masked
    close(adv, [[0.0, 0.0]])
    close(ret, [[0.0, 0.0]])


def test_policy_loss_by_hand():
    old = T([[0.0, 0.0]])
    new = T([[math.log(1.5), math.log(0.5)]])
    out = policy_loss(new, old, advantages=T([[1.0, 1.0]]), mask=T([[1.0, 1.0]]), clip=0.2)
    close(out.loss, (-1.2 - 0.5) / 2)  # ratio 1.5 clipped to 1.2; ratio 0.5 keeps -0.5 (the max)
    close(out.clip_fraction, 0.5)
    close(out.approx_kl, ((1 / 1.5 - 1 + math.log(1.5)) + (2 - 1 + math.log(0.5))) / 2, tol=1e-5)
    close(out.ratio_mean, 1.0)
    neg = policy_loss(new, old, advantages=T([[-1.0, -1.0]]), mask=T([[1.0, 1.0]]), clip=0.2)
    close(neg.loss, (1.5 + 0.8) / 2)  # pessimistic branch for negative advantages
    masked = policy_loss(new, old, T([[1.0, 1.0]]), T([[0.0, 0.0]]), 0.2)
    assert masked.loss.item() == 0.0 and masked.approx_kl.item() == 0.0


def test_policy_loss_gradient_vanishes_when_clipped():
    new = T([[math.log(1.5)]]).requires_grad_()
    policy_loss(new, T([[0.0]]), T([[1.0]]), T([[1.0]]), 0.2).loss.backward()
    assert new.grad.abs().item() == 0.0  # outside the trust region nothing pushes further


def test_value_loss_by_hand():
    loss, frac = value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), T([[1.0]]), clip=0.2)
    close(loss, 0.5 * 1.69)  # clipped value 0.7 is further from the return: max picks it
    close(frac, 1.0)
    loss, frac = value_loss(T([[1.0]]), T([[0.5]]), T([[2.0]]), T([[1.0]]), clip=None)
    close(loss, 0.5)


def test_entropy_and_logprobs():
    uniform = torch.zeros(1, 1, 4)
    close(entropy_from_logits(uniform), [[math.log(4)]])
    logits = torch.log(T([[[0.1, 0.2, 0.7]]]))
    close(logprobs_of(logits, T([[2]])), [[math.log(0.7)]])


def test_explained_variance():
    ret, m = T([[1.0, 2.0, 3.0]]), T([[1.0, 1.0, 1.0]])
    close(explained_variance(ret, ret, m), 1.0)
    close(explained_variance(torch.full_like(ret, 2.0), ret, m), 0.0)


def test_adaptive_kl_controller():
    c = KLController(0.1, target=6.0, horizon=100)
    c.update(current_kl=9.0, n_steps=10)  # error clipped to +0.2
    close(c.value, 0.1 * (1 + 0.2 * 10 / 100))
    c.update(current_kl=6.0 * 0.9, n_steps=10)  # error -0.1
    close(c.value, 0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    restored = KLController(0.0)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()


def test_running_moments_match_batch_statistics():
    rm = RunningMoments()
    rm.update(T([1.0, 2.0, 3.0]))
    rm.update(T([4.0, 5.0]))
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(math.sqrt(2.5))
    rm.update(T([]))
    assert rm.count == 5
