"""Each advantage estimator and loss variant against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.config_rl import PPOSettings
from rlhf.errors import ConfigError
from rlhf.stages.ppo import advantages as A
from rlhf.stages.ppo import losses


def inputs(scores, mask=None, kl=None, k=2, kl_coef=0.0, gamma=1.0, R=1):
    scores = torch.tensor(scores, dtype=torch.float32)
    mask = torch.ones(len(scores), R) if mask is None else torch.tensor(mask, dtype=torch.float32)
    kl = torch.zeros_like(mask) if kl is None else torch.tensor(kl, dtype=torch.float32)
    return A.AdvantageInputs(
        scores=scores, kl=kl * mask, mask=mask, values=None, kl_coef=kl_coef, group_size=k, gamma=gamma
    )


def seq(adv: torch.Tensor) -> list[float]:
    """The advantage each response got (first token)."""
    return adv[:, 0].tolist()


def test_grpo_normalises_within_each_group():
    # group {1, 3}: mean 2, unbiased std sqrt(2); group {2, 2}: std 0 -> advantage 0, not a division by 0
    adv, ret = A.grpo(inputs([1.0, 3.0, 2.0, 2.0]))
    s = math.sqrt(2) + 1e-4
    assert seq(adv) == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], abs=1e-6) and ret is None


def test_dr_grpo_subtracts_the_group_mean_only():
    adv, _ = A.dr_grpo(inputs([1.0, 3.0, 2.0, 2.0]))
    assert seq(adv) == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    adv, _ = A.dr_grpo(inputs([0.0, 100.0]))  # no std division: the scale stays
    assert seq(adv) == pytest.approx([-50.0, 50.0])


def test_rloo_leaves_each_response_out_of_its_own_baseline():
    adv, _ = A.rloo(inputs([1.0, 2.0, 6.0], k=3))
    assert seq(adv) == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    # the KL is folded into the sequence reward first: r = [1 - 0.1 * 0.5, 3] -> +-2.05
    adv, _ = A.rloo(inputs([1.0, 3.0], kl=[[0.2, 0.3], [0.0, 0.0]], kl_coef=0.1, R=2))
    assert adv.flatten().tolist() == pytest.approx([-2.05, -2.05, 2.05, 2.05])


def test_grpo_with_the_kl_in_the_reward_subtracts_it_before_the_group_statistics():
    # r = [1 - 0.5 x (0.2 + 0.8), 3] = [0.5, 3]: Dr. GRPO advantages -+1.25
    x = inputs([1.0, 3.0], kl=[[0.2, 0.8], [0.0, 0.0]], kl_coef=0.5, R=2)
    adv, _ = A.dr_grpo(x)
    assert adv.flatten().tolist() == pytest.approx([-1.25, -1.25, 1.25, 1.25])
    adv, _ = A.grpo(x)  # std of {0.5, 3} is 2.5 / sqrt(2)
    s = 2.5 / math.sqrt(2) + 1e-4
    assert seq(adv) == pytest.approx([-1.25 / s, 1.25 / s], abs=1e-6)


def test_a_dropped_response_is_not_a_group_member():
    mask = [[1.0], [1.0], [0.0]]  # the third response's reward failed: all its tokens dropped
    adv, _ = A.grpo(inputs([1.0, 3.0, math.nan], mask=mask, k=3))  # a failed score is NaN
    s = math.sqrt(2) + 1e-4
    assert seq(adv) == pytest.approx([-1 / s, 1 / s, 0.0], abs=1e-6)
    adv, _ = A.rloo(inputs([1.0, 3.0, math.nan], mask=mask, k=3))
    assert seq(adv) == pytest.approx([-2.0, 2.0, 0.0])
    adv, _ = A.grpo(inputs([1.0, 3.0, 500.0], mask=mask, k=3))
    s = math.sqrt(2) + 1e-4
    assert seq(adv) == pytest.approx([-1 / s, 1 / s, 0.0], abs=1e-6)
    adv, _ = A.rloo(inputs([1.0, 3.0, 500.0], mask=mask, k=3))
    assert seq(adv) == pytest.approx([-2.0, 2.0, 0.0])


def test_returns_to_go_discount():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [5.0, 7.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert A.returns_to_go(rewards, mask, 0.5).tolist() == [[3.0, 4.0, 4.0], [5.0, 0.0, 0.0]]


def test_reinforce_pp_folds_kl_into_token_rewards_and_whitens_the_batch():
    # rewards row 0: [-0.1, -0.2 + 1] -> returns [0.7, 0.8]; row 1: [0, -1] -> [-1, -1]
    # mean -0.125, unbiased var 3.0675 / 3, std 1.011187
    adv, _ = A.reinforce_pp(inputs([1.0, -1.0], kl=[[0.1, 0.2], [0.0, 0.0]], kl_coef=1.0, R=2, k=1))
    assert adv.flatten().tolist() == pytest.approx([0.815874, 0.914766, -0.865320, -0.865320], abs=1e-5)


def test_reinforce_pp_baseline_subtracts_the_group_mean_first():
    adv, _ = A.reinforce_pp_baseline(inputs([1.0, 3.0, 10.0, 10.0]))
    # scores - group mean: [-1, 1, 0, 0]; whitened over the 4 tokens: mean 0, std sqrt(2/3)
    s = math.sqrt(2 / 3)
    assert seq(adv) == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], abs=1e-5)


def test_gae_estimator_is_todays_ppo():
    x = inputs([1.0, -1.0], kl=[[0.1, 0.2], [0.0, 0.0]], kl_coef=0.5, R=2, k=1)
    x.values, x.whiten = torch.tensor([[0.3, 0.1], [0.2, -0.4]]), False
    adv, ret = A.gae(x)
    rewards = losses.token_rewards(x.scores, x.kl, x.mask, 0.5)
    want_adv, want_ret = losses.gae(rewards, x.values, x.mask, 1.0, 0.95)
    assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret)


def test_registry_says_who_needs_a_critic_groups_and_where_kl_goes():
    assert [n for n, e in A.ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert {n for n, e in A.ESTIMATORS.items() if e.needs_groups} == {
        "grpo",
        "dr_grpo",
        "rloo",
        "reinforce_pp_baseline",
    }
    assert A.ESTIMATORS["grpo"].kl_in == "loss" and A.ESTIMATORS["rloo"].kl_in == "reward"
    assert A.ESTIMATORS["dr_grpo"].loss_aggregation == "constant"
    assert A.ESTIMATORS["grpo"].loss_aggregation == "sequence_mean"


def test_aggregations():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert losses.aggregate(x, mask, "token_mean").item() == pytest.approx(2.0)  # 6 / 3 tokens
    assert losses.aggregate(x, mask, "sequence_mean").item() == pytest.approx(2.25)  # (1.5 + 3) / 2
    assert losses.aggregate(x, mask, "constant", max_tokens=4).item() == pytest.approx(0.75)  # 6 / (2 x 4)


def test_gspo_sequence_ratio_is_clipped_per_response():
    old = torch.zeros(2, 2)
    new = torch.tensor([[0.2, 0.4], [0.1, 0.1]])  # sequence log ratios 0.3 and 0.1
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    out = losses.policy_loss(new, old, adv, torch.ones(2, 2), clip=0.2, ratio_level="sequence")
    # row 0: max(-e^0.3, -1.2) = -1.2; row 1: max(e^0.1, e^0.1) = 1.10517
    assert out.loss.item() == pytest.approx((-1.2 + math.exp(0.1)) / 2, abs=1e-5)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_kl_in_the_loss_is_k3_to_the_reference():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = logp - 0.1  # log p - log ref = 0.1 on each token: k3 = e^-0.1 - 1 + 0.1
    out = losses.policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), clip=0.2, ref_logprobs=ref, kl_coef=2.0)
    k3 = math.exp(-0.1) - 1 + 0.1
    assert out.kl_loss.item() == pytest.approx(k3, abs=1e-6)
    assert out.loss.item() == pytest.approx(2.0 * k3, abs=1e-6)


def test_settings_refuse_what_an_estimator_cannot_do():
    with pytest.raises(ConfigError, match="rollouts_per_prompt >= 2"):
        PPOSettings(advantage_estimator="grpo")
    with pytest.raises(ConfigError, match="multiple of ppo.rollouts_per_prompt"):
        PPOSettings(advantage_estimator="grpo", rollouts_per_prompt=3, rollout_batch_size=32)
    with pytest.raises(ConfigError, match="GSPO"):
        PPOSettings(importance_ratio="sequence")
    with pytest.raises(ConfigError, match="GSPO"):
        PPOSettings(advantage_estimator="reinforce_pp", importance_ratio="sequence")
    with pytest.raises(ConfigError, match="must be > 0"):
        PPOSettings(advantage_estimator="grpo", rollouts_per_prompt=4, sequence_clip_ratio=-1.0)
    with pytest.raises(ConfigError, match="rollouts_per_prompt must be >= 1"):
        PPOSettings(rollouts_per_prompt=0)
    s = PPOSettings(advantage_estimator="dr_grpo", rollouts_per_prompt=4)
    assert (s.kl_placement, s.aggregation, s.needs_critic) == ("loss", "constant", False)
    assert PPOSettings(advantage_estimator="grpo", rollouts_per_prompt=4, kl_in="reward").kl_placement == "reward"
