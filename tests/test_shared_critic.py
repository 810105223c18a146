"""ppo.critic_trunk=shared: the critic as a value head on the actor's trunk (one model, one
forward pass per mini-batch, one backward), end to end on the demo task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO, ppo_overrides
from rlhf.checkpoint import MANIFEST, HandoffError
from rlhf.config import load_recipe
from rlhf.config_rl import PPORecipe
from rlhf.errors import ConfigError
from rlhf.sampling import policy_outputs, positions
from rlhf.stages.ppo import engines, rollout, value_head
from rlhf.stages.ppo import trainer as ppo
from rlhf.stages.ppo.trainer import run_ppo
from rlhf.stages.ppo.update import ppo_update
from rlhf.tracking import METRICS_FILE, read_jsonl

SHARED = ["ppo.critic_trunk=shared"]


def recipe(assets, sft, reward, out, *extra) -> PPORecipe:
    return load_recipe(
        PPORecipe, REPO / "recipes/demo/ppo.yaml", ppo_overrides(assets, sft, reward, out) + SHARED + list(extra)
    )


@pytest.fixture(scope="module")
def shared_run(demo_assets, sft_dir, reward_dir, tmp_path_factory):
    return run_ppo(recipe(demo_assets, sft_dir, reward_dir, tmp_path_factory.mktemp("shared")))


def _batch(vocab: int = 100):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    return ids, mask, positions(mask), ids[:, 6:]


@pytest.mark.parametrize("lora", [False, True])
def test_one_forward_gives_the_policys_exact_logprobs_and_zero_first_values(demo_assets, sft_dir, reward_dir, lora):
    r = recipe(demo_assets, sft_dir, reward_dir, demo_assets / "unused", *(["peft.enabled=true"] if lora else []))
    policy = engines.with_lora(engines.load_policy(str(sft_dir), r), r, "CAUSAL_LM")
    with pytest.raises(RuntimeError, match="has no value head"):
        value_head.head_of(policy)
    head = value_head.attach(policy)
    assert all(p.requires_grad for p in head.parameters())
    ids, mask, pos, response = _batch()
    with torch.no_grad():
        logp, ent = policy_outputs(policy, ids, mask, pos, response, 0.7, with_entropy=True)
        logp2, ent2, values = value_head.outputs_with_values(policy, ids, mask, pos, response, 0.7, with_entropy=True)
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)
    torch.testing.assert_close(ent2, ent, rtol=0, atol=0)
    assert values.shape == response.shape and torch.count_nonzero(values) == 0, "zero-initialised head"
    # the head reads the hidden state before each response token: a nonzero head shows it
    with torch.no_grad():
        head.bias.fill_(0.5)
        head.weight.normal_()
        _, _, values = value_head.outputs_with_values(policy, ids, mask, pos, response, 0.7)
        inner = policy.get_base_model() if lora else policy
        hidden = getattr(inner, inner.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=pos)
        expect = head(hidden.last_hidden_state[:, 5:-1]).squeeze(-1)
    torch.testing.assert_close(values, expect)
    state = value_head.without_value_head(policy.state_dict())
    assert not any(k.startswith("value_head") for k in state) and len(state) == len(policy.state_dict()) - 2


def test_the_value_loss_reaches_the_trunk_through_the_head(demo_assets, sft_dir, reward_dir):
    """Shared means shared: the value loss's gradient flows into the actor's layers (once the head
    is nonzero), not into the head alone."""
    r = recipe(demo_assets, sft_dir, reward_dir, demo_assets / "unused")
    policy = engines.load_policy(str(sft_dir), r)
    head = value_head.attach(policy)
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(0))
    ids, mask, pos, response = _batch()
    _, _, values = value_head.outputs_with_values(policy, ids, mask, pos, response, 1.0)
    values.square().mean().backward()
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) > 0
    trunk = [p for n, p in policy.named_parameters() if "layers.0." in n and p.grad is not None]
    assert trunk and any(torch.count_nonzero(p.grad) > 0 for p in trunk), "the values were detached from the trunk"


def test_config_errors_name_the_setting(demo_assets, sft_dir, reward_dir, tmp_path):
    base = ppo_overrides(demo_assets, sft_dir, reward_dir, tmp_path)
    with pytest.raises(ConfigError, match="ppo.critic_trunk=shared .* ppo.advantage_estimator=grpo uses no critic"):
        load_recipe(
            PPORecipe,
            REPO / "recipes/demo/ppo.yaml",
            base + SHARED + ["ppo.advantage_estimator=grpo", "ppo.rollouts_per_prompt=4"],
        )
    with pytest.raises(ConfigError, match="ppo.value_loss_coef must be >= 0"):
        load_recipe(PPORecipe, REPO / "recipes/demo/ppo.yaml", base + SHARED + ["ppo.value_loss_coef=-1"])
    with pytest.raises(ConfigError, match="critic is a head on the actor, so carrying it needs continue_from.actor"):
        load_recipe(
            PPORecipe,
            REPO / "recipes/demo/ppo.yaml",
            base + SHARED + [f"continue_from={{path: {tmp_path}, critic: true, actor: false}}"],
        )
    # a shared trunk needs no reward model to start its critic from
    r = load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        base + SHARED + ["reward_dir=null", "reward_functions=[{function: 'rlhf.tasks.arithmetic:reward'}]"],
    )
    assert r.ppo.needs_critic and not r.ppo.separate_critic


def test_one_engine_trains_policy_and_head_together(demo_assets, sft_dir, reward_dir, tmp_path):
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path, "ppo.critic_learning_rate=3e-3")
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    assert m.critic is None and m.shared_critic and m.has_values
    groups = m.actor.optimizer.param_groups
    assert [g["lr"] for g in groups] == [r.train.learning_rate, 3e-3], "the head trains at the critic's rate"
    head = value_head.head_of(m.actor)
    trunk_before = {k: v.detach().clone() for k, v in m.actor.module.state_dict().items() if "value_head" not in k}
    prompts = [[{"role": "user", "content": "tell me about the pizza ."}]] * 16
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    assert torch.count_nonzero(ro.values) == 0, "the rollout's values come from the zero-initialised head"
    assert torch.count_nonzero(ro.returns) > 0
    stats = ppo_update(m, r, ro, step=0)
    assert stats["skipped_minibatches"] == 0 and math.isfinite(stats["value_loss"]) and stats["value_loss"] > 0
    assert stats["initial_max_abs_log_ratio"] == pytest.approx(0.0, abs=1e-5)
    assert torch.count_nonzero(head.weight) > 0, "the value loss trained the head"
    after = m.actor.module.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in trunk_before.items()), "the policy moved"


def test_shared_run_logs_values_exports_a_plain_policy_and_keeps_no_critic(shared_run, sft_dir):
    from transformers import AutoModelForCausalLM

    rows = read_jsonl(shared_run / METRICS_FILE)
    assert len(rows) == 6
    for row in rows:
        for key in ("value_loss", "explained_variance", "policy_loss", "kl"):
            assert math.isfinite(row[key]), (row["step"], key)
    assert rows[0]["explained_variance"] == pytest.approx(0.0, abs=1e-6), "step 1's values come from a zero head"
    state = shared_run / "checkpoints" / "step-6"
    assert json.loads((state / "trainer_state.json").read_text())["value_head"]
    saved = torch.load(state / "actor" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert torch.count_nonzero(saved["value_head.weight"]) > 0, "the head was trained and checkpointed"
    assert (state / "actor").is_dir() and not (state / "critic").exists()
    manifest = json.loads((shared_run / MANIFEST).read_text())
    assert manifest["recipe"]["ppo"]["critic_trunk"] == "shared"
    from safetensors import safe_open

    with safe_open(shared_run / "model.safetensors", "pt") as f:
        assert f.keys() and not any("value_head" in k for k in f.keys()), "export leaves the head out"
    model, info = AutoModelForCausalLM.from_pretrained(shared_run, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    x = torch.tensor([[2, 10, 20, 30, 1, 3]])
    assert not torch.allclose(model(x).logits, sft(x).logits), "PPO changed nothing"
    out = model.generate(x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > x.shape[1]


def test_shared_run_resumes_exactly(demo_assets, sft_dir, reward_dir, shared_run, tmp_path):
    interrupted = recipe(demo_assets, sft_dir, reward_dir, tmp_path / "resumed")
    out = run_ppo(interrupted, on_step_end=lambda step, _: step == 4)
    assert not (out / MANIFEST).exists()
    run_ppo(interrupted)
    a = {r["step"]: r for r in read_jsonl(shared_run / METRICS_FILE)}
    b = {r["step"]: r for r in read_jsonl(out / METRICS_FILE)}
    for step in (5, 6):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "explained_variance"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("keep", [False, True])
def test_continue_from_resets_the_head_unless_it_carries_the_critic(
    demo_assets, sft_dir, reward_dir, shared_run, tmp_path, keep
):
    from safetensors.torch import load_file

    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path, f"continue_from={{path: {shared_run}, critic: {keep}}}")
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    ppo.resume(r, m, tmp_path / "no-states-yet")
    head = value_head.head_of(m.actor)
    lora_free = load_file(shared_run / "model.safetensors")
    carried = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(m.actor.module.state_dict()[carried], lora_free[carried]), "the actor was carried"
    if keep:
        assert torch.count_nonzero(head.weight) > 0, "continue_from.critic keeps the trained head"
    else:
        assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
        assert all(not m.actor.optimizer.state.get(p) for p in head.parameters())


def test_resuming_across_trunk_layouts_fails_clearly(demo_assets, sft_dir, reward_dir, shared_run, tmp_path):
    separate = load_recipe(
        PPORecipe, REPO / "recipes/demo/ppo.yaml", ppo_overrides(demo_assets, sft_dir, reward_dir, tmp_path)
    )
    tok, _ = ppo.check_handoff(separate)
    m = engines.build_models(separate, tok)
    with pytest.raises(HandoffError, match="saved by a run with a shared value head .* resume=never"):
        ppo.resume(separate, m, shared_run / "checkpoints")


def test_continuing_across_trunk_layouts_fails_clearly(demo_assets, sft_dir, reward_dir, shared_run, tmp_path):
    overrides = ppo_overrides(demo_assets, sft_dir, reward_dir, tmp_path) + [f"continue_from={{path: {shared_run}}}"]
    separate = load_recipe(PPORecipe, REPO / "recipes/demo/ppo.yaml", overrides)
    with pytest.raises(HandoffError, match="with a shared value head") as e:
        ppo.continued_state(separate)
    assert f"sft_dir={shared_run}, continue_from.actor=false" in str(e.value)
    same = load_recipe(PPORecipe, REPO / "recipes/demo/ppo.yaml", overrides + SHARED)
    assert ppo.continued_state(same).name == "step-6"


def test_lora_shared_run_trains_adapter_and_head_and_exports_the_merged_policy(
    demo_assets, sft_dir, reward_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    lora = ["peft.enabled=true", "peft.r=8", "peft.alpha=16", "train.learning_rate=1e-2", "train.max_steps=3"]
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path, *lora)
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    trainable = [n for n, p in m.actor.module.named_parameters() if p.requires_grad]
    assert any("lora" in n for n in trainable) and "value_head.weight" in trainable
    assert m.reference is None and m.critic is None
    del m
    out = run_ppo(r)
    rows = read_jsonl(out / METRICS_FILE)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4), "adapter-disabled reference == actor at the start"
    assert all(math.isfinite(row["value_loss"]) and math.isfinite(row["explained_variance"]) for row in rows)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    x = torch.tensor([[2, 10, 20, 30, 1, 3]])
    assert not torch.allclose(model(x).logits, AutoModelForCausalLM.from_pretrained(sft_dir)(x).logits)
