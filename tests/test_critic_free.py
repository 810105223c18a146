"""Critic-free estimators in the full loop (GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO): invariants,
exact resume, LoRA, no critic built; and rewards from Python functions: isolation, mixing, guards."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from conftest import REPO, ppo_overrides
from rlhf.checkpoint import MANIFEST
from rlhf.config import load_recipe
from rlhf.config_rl import PPORecipe
from rlhf.errors import ConfigError
from rlhf.rewards.functions import RewardFunctions
from rlhf.stages.ppo import engines, rollout, scoring, undo
from rlhf.stages.ppo import trainer as ppo
from rlhf.stages.ppo.trainer import PPOAborted, run_ppo
from rlhf.stages.ppo.update import ppo_update
from rlhf.tracking import METRICS_FILE, read_jsonl

CRITIC_FREE = {
    "grpo": ["ppo.advantage_estimator=grpo", "ppo.rollouts_per_prompt=4"],
    "dr_grpo": ["ppo.advantage_estimator=dr_grpo", "ppo.rollouts_per_prompt=4"],
    "rloo": ["ppo.advantage_estimator=rloo", "ppo.rollouts_per_prompt=4"],
    "reinforce_pp": ["ppo.advantage_estimator=reinforce_pp"],
    "reinforce_pp_baseline": ["ppo.advantage_estimator=reinforce_pp_baseline", "ppo.rollouts_per_prompt=2"],
    "gspo": ["ppo.advantage_estimator=grpo", "ppo.rollouts_per_prompt=4", "ppo.importance_ratio=sequence"],
}
PROMPTS = [[{"role": "user", "content": f"tell me about the {x} ."}] for x in ("pizza", "movie", "hotel", "book")]

FUNCTIONS = textwrap.dedent("""
    import math, os, time

    def length(prompt, response, **fields):
        return float(len(response.split()))

    def fails_on_long_prompts(prompt, response, **fields):
        if len(prompt) > 32:
            raise ValueError("too long")
        return 1.0

    def raises(prompt, response, **fields):
        raise RuntimeError("broken")

    def nan(prompt, response, **fields):
        return math.nan

    def hangs(prompt, response, **fields):
        time.sleep(3600)

    def exits(prompt, response, **fields):
        os._exit(7)

    def echo_field(prompt, response, answer=None, **fields):
        return float(answer)

    def noisy(prompt, response, **fields):
        import sys
        print("a function that prints")
        sys.stdin.read()  # and reads stdin: neither may disturb the protocol
        return 2.5
""")


def _recipe(demo_assets, sft_dir, reward_dir, out, *extra) -> PPORecipe:
    return load_recipe(
        PPORecipe, REPO / "recipes/demo/ppo.yaml", ppo_overrides(demo_assets, sft_dir, reward_dir, out) + list(extra)
    )


@pytest.fixture
def functions_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCTIONS)
    return path


@pytest.mark.parametrize("name", list(CRITIC_FREE))
def test_first_minibatch_ratio_is_one_and_no_critic_is_built(demo_assets, sft_dir, reward_dir, tmp_path, name):
    r = _recipe(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "ppo.ppo_epochs=1",
        "train.learning_rate=1e-2",
        "ppo.max_minibatch_kl=null",
        *CRITIC_FREE[name],
    )
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    assert m.critic is None
    prompts = [p for p in PROMPTS for _ in range(r.ppo.rollouts_per_prompt)] * (16 // (4 * r.ppo.rollouts_per_prompt))
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    assert ro.kl[ro.response_mask.bool()].abs().max().item() <= 1e-5
    before = {k: v.detach().clone() for k, v in m.actor.module.state_dict().items()}
    for step in (0, 1):
        stats = ppo_update(m, r, ro, step=step)
        assert stats["skipped_minibatches"] == 0 and "value_loss" not in stats
        assert stats["initial_max_abs_log_ratio"] <= 1e-5, (name, step, stats)
        ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    assert any(not torch.equal(before[k], v) for k, v in m.actor.module.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CRITIC_FREE))
def test_resume_is_exact_for_every_estimator(demo_assets, sft_dir, reward_dir, tmp_path, name):
    clean = run_ppo(_recipe(demo_assets, sft_dir, reward_dir, tmp_path / "clean", *CRITIC_FREE[name]))
    interrupted = _recipe(demo_assets, sft_dir, reward_dir, tmp_path / "resumed", *CRITIC_FREE[name])
    out = run_ppo(interrupted, on_step_end=lambda step, _: step == 3)
    assert not (out / "checkpoints" / "step-3" / "critic").exists()  # nothing to save: no critic
    run_ppo(interrupted)
    a = {r["step"]: r for r in read_jsonl(clean / METRICS_FILE)}
    b = {r["step"]: r for r in read_jsonl(out / METRICS_FILE)}
    for step in (4, 5, 6):
        for key in ("reward_mean", "kl", "policy_loss", "approx_kl", "advantage_mean"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (name, step, key)
    from transformers import AutoModelForCausalLM

    wa = AutoModelForCausalLM.from_pretrained(clean).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize("name", list(CRITIC_FREE))
def test_every_critic_free_estimator_trains_with_lora_and_exports(demo_assets, sft_dir, reward_dir, tmp_path, name):
    out = run_ppo(
        _recipe(
            demo_assets,
            sft_dir,
            reward_dir,
            tmp_path,
            *CRITIC_FREE[name],
            "peft.enabled=true",
            "peft.r=8",
            "peft.alpha=16",
            "train.learning_rate=1e-3",
        )
    )
    rows = read_jsonl(out / METRICS_FILE)
    assert rows and all(r["skipped_minibatches"] == 0 and math.isfinite(r["policy_loss"]) for r in rows)
    assert (out / MANIFEST).is_file() and (out / "adapter").is_dir()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["merged"]
    assert manifest["recipe"]["ppo"]["advantage_estimator"] == CRITIC_FREE[name][0].split("=")[1]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    before = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # the merged adapter moved the weights


def test_reward_function_isolation_raise_nan_hang_and_exit(functions_file):
    specs = [f"{functions_file}:{n}" for n in ("length", "raises", "nan", "hangs", "exits")]
    with RewardFunctions(specs, [5, 5, 5, 0.5, 5]) as rf:
        values, failures = rf.score(["p", "q"], ["one two three", "four"], [{}, {}])
        assert [v[0] for v in values] == [3.0, 1.0]  # the healthy function still scored every row
        assert all(math.isnan(v) for row in values for v in row[1:])
        reasons = {(f.row, f.function.rpartition(":")[2]): f.reason for f in failures}
        assert reasons[(0, "raises")] == "RuntimeError: broken"
        assert reasons[(1, "nan")] == "returned nan"
        assert reasons[(0, "hangs")] == "timed out after 0.5s"
        assert reasons[(1, "exits")] == "the process exited (code 7)"
        assert f"{functions_file}:hangs on row 0" in str(failures[2])
        assert rf.score(["p"], ["x y"], [{}])[0][0][0] == 2.0  # and it still serves after all of that


def test_a_function_that_prints_and_reads_stdin_and_a_file_with_dataclasses(tmp_path, functions_file):
    typed = tmp_path / "typed.py"
    typed.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\n"
        "class Cfg:\n    bonus: float = 1.5\n\ndef reward(prompt, response, **fields):\n"
        "    return Cfg().bonus\n"
    )
    with RewardFunctions([f"{functions_file}:noisy", f"{typed}:reward"], [5, 5]) as rf:
        values, failures = rf.score(["p", "q"], ["a", "b"], [{}, {}])
    assert values == [[2.5, 1.5], [2.5, 1.5]] and not failures


def test_reward_function_that_cannot_load_fails_before_any_model(demo_assets, sft_dir, tmp_path, functions_file):
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        RewardFunctions([f"{functions_file}:nope"], [5])
    with pytest.raises(ConfigError, match="No module named 'no_such_module'"):
        RewardFunctions(["no_such_module:f"], [5])


def test_each_source_is_normalised_before_weighting(demo_assets, sft_dir, reward_dir, tmp_path):
    # a and b are independent signals whose raw scales differ 100x; with equal weights, the row
    # that has only a and the row that has only b must score the same after mixing
    small = tmp_path / "small.py"
    small.write_text(
        "def a(prompt, response, a, b):\n    return a\n\ndef b(prompt, response, a, b):\n    return 100.0 * b\n"
    )
    r = _recipe(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "reward_dir=null",
        "ppo.advantage_estimator=grpo",
        "ppo.rollouts_per_prompt=4",
        f"reward_functions=[{{function: '{small}:a'}}, {{function: '{small}:b'}}]",
    )
    code = scoring.CodeRewards.start(r)
    try:
        fields = [{"a": 1, "b": 1}, {"a": 0, "b": 1}, {"a": 1, "b": 0}, {"a": 0, "b": 0}]
        out = code(PROMPTS, ["x"] * 4, fields)
    finally:
        code.close()
    assert out.raw[:, 1].tolist() == [100.0, 100.0, 0.0, 0.0]
    assert out.mixed[1].item() == pytest.approx(out.mixed[2].item(), abs=1e-6)
    assert out.mixed[0] > out.mixed[1] > out.mixed[3]
    unnormalised = out.raw.sum(1)
    assert unnormalised[1] > 50 * unnormalised[2]  # without normalisation b would drown a


def test_rewards_from_functions_alone_drop_failed_rows_and_train(demo_assets, sft_dir, tmp_path, functions_file):
    r = _recipe(
        demo_assets,
        sft_dir,
        sft_dir,
        tmp_path,
        "reward_dir=null",
        *CRITIC_FREE["grpo"],
        f"reward_functions=[{{function: '{functions_file}:length'}}, "
        f"{{function: '{functions_file}:fails_on_long_prompts', weight: 0.5}}]",
    )
    out = run_ppo(r)
    rows = read_jsonl(out / METRICS_FILE)
    assert len(rows) == 6 and all(math.isfinite(x["policy_loss"]) for x in rows)
    failed = sum(x["reward_function_failures"] for x in rows)
    dropped = sum(x["dropped_rows"] for x in rows)
    assert failed > 0 and failed == dropped  # every failed row left the update, and only those
    manifest = json.loads((out / MANIFEST).read_text())
    assert [p["path"] for p in manifest["parents"]] == [str(sft_dir)]  # no reward model parent


def test_a_function_failing_on_every_row_aborts_after_max_bad_steps(demo_assets, sft_dir, tmp_path, functions_file):
    r = _recipe(
        demo_assets,
        sft_dir,
        sft_dir,
        tmp_path,
        "reward_dir=null",
        *CRITIC_FREE["rloo"],
        f"reward_functions=[{{function: '{functions_file}:raises'}}]",
        "ppo.max_bad_steps=2",
    )
    with pytest.raises(PPOAborted, match="2 consecutive PPO steps"):
        run_ppo(r)


def test_reward_functions_receive_the_rows_other_fields(demo_assets, sft_dir, tmp_path, functions_file):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            f'{{"prompt": "tell me about the {x} .", "answer": {i}}}\n'
            for i, x in enumerate(["pizza", "movie", "hotel", "book"])
        )
    )
    r = _recipe(
        demo_assets,
        sft_dir,
        sft_dir,
        tmp_path,
        "reward_dir=null",
        f"prompts.sources.0.path={data}",
        *CRITIC_FREE["grpo"],
        f"reward_functions=[{{function: '{functions_file}:echo_field', normalize: false}}]",
    )
    tok, manifest = ppo.check_handoff(r)
    rows = ppo.prepare_data(r, tok, manifest).prompts.train
    assert sorted(row["fields"]["answer"] for row in rows) == [0, 1, 2, 3]
    code = scoring.CodeRewards.start(r)
    try:
        out = code([row["messages"] for row in rows], ["x"] * 4, [row["fields"] for row in rows])
    finally:
        code.close()
    assert out.raw[:, 0].tolist() == [float(row["fields"]["answer"]) for row in rows]


@pytest.mark.slow
def test_resume_with_reward_functions_restores_their_normalisers(
    demo_assets, sft_dir, reward_dir, tmp_path, functions_file
):
    mixed = [*CRITIC_FREE["rloo"], f"reward_functions=[{{function: '{functions_file}:length', weight: 0.5}}]"]
    clean = run_ppo(_recipe(demo_assets, sft_dir, reward_dir, tmp_path / "clean", *mixed))
    interrupted = _recipe(demo_assets, sft_dir, reward_dir, tmp_path / "resumed", *mixed)
    out = run_ppo(interrupted, on_step_end=lambda step, _: step == 3)
    state = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["reward_function_normalisers"][0]["count"] == 3 * 16  # every response of 3 steps
    run_ppo(interrupted)
    a = {r["step"]: r for r in read_jsonl(clean / METRICS_FILE)}
    b = {r["step"]: r for r in read_jsonl(out / METRICS_FILE)}
    for step in (4, 5, 6):
        for key in ("reward_mean", "score_mean", "policy_loss", "reward_fn/length"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_the_minibatch_kl_guard_stops_the_step_before_its_optimizer_step(demo_assets, sft_dir, reward_dir, tmp_path):
    r = _recipe(demo_assets, sft_dir, reward_dir, tmp_path, *CRITIC_FREE["grpo"])
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    prompts = [p for p in PROMPTS for _ in range(4)]
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    before = {k: v.detach().clone() for k, v in m.actor.module.state_dict().items()}
    # log new/old = 2 on every token: mean ratio e^2 = 7.4 passes ratio_threshold (10), but the
    # approx KL e^-2 - 1 + 2 = 1.14 exceeds max_minibatch_kl (1.0)
    ro.logprobs = ro.logprobs - 2.0
    stats = ppo_update(m, r, ro, step=0)
    assert stats["kl_guard_stop"] == 1.0 and stats["skipped_minibatches"] == 1
    assert all(torch.equal(before[k], v) for k, v in m.actor.module.state_dict().items())
    assert stats["kl_rollback"] == 0.0  # nothing was applied, so nothing to take back
    assert stats["guard_approx_kl"] == pytest.approx(math.exp(-2) - 1 + 2, rel=1e-4)  # the KL that stopped it
    ok = ppo_update(m, r, rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {}), step=1)
    assert ok["kl_guard_stop"] == 0.0 and ok["skipped_minibatches"] == 0  # a healthy batch passes
    assert ok["kl_rollback"] == 0.0 and ok["final_approx_kl"] < r.ppo.max_minibatch_kl


def _optimizer_state(engine) -> dict:
    opt = undo.base_optimizer(engine)
    return {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(opt.param_groups[0]["params"])}


def _weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _one_minibatch_grpo(demo_assets, sft_dir, reward_dir, tmp_path, *extra):
    """GRPO with one mini-batch per PPO epoch, as in the SmolLM2 run at lr 3e-4 that kl_rollback
    guards against: (recipe, models)."""
    r = _recipe(demo_assets, sft_dir, reward_dir, tmp_path, *CRITIC_FREE["grpo"], "train.micro_batch_size=16", *extra)
    tok, _ = ppo.check_handoff(r)
    return r, engines.build_models(r, tok)


# 2 epochs: caught by the next mini-batch; 1: by the check after the last update. ZeRO-2 keeps fp32
# master partitions apart from the module's weights: both must be put back.
@pytest.mark.parametrize("epochs,zero", [(2, 0), (1, 0), (1, 2)])
def test_an_update_that_throws_the_policy_past_the_kl_guard_is_taken_back(
    demo_assets, sft_dir, reward_dir, tmp_path, epochs, zero
):
    r, m = _one_minibatch_grpo(
        demo_assets, sft_dir, reward_dir, tmp_path, f"ppo.ppo_epochs={epochs}", f"deepspeed.zero_stage={zero}"
    )
    prompts = [p for p in PROMPTS for _ in range(4)]
    healthy = ppo_update(m, r, rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {}), step=0)
    assert healthy["kl_rollback"] == 0.0 and healthy["final_approx_kl"] < r.ppo.max_minibatch_kl
    weights, moments = _weights(m.actor), _optimizer_state(m.actor)
    master = [p.detach().clone() for g in undo.base_optimizer(m.actor).param_groups for p in g["params"]]
    assert moments[0]  # Adam has state now: the undo must put back the moments as well as the weights
    for group in undo.base_optimizer(m.actor).param_groups:
        group["lr"] = 3.0  # one update at this rate throws a tiny model far (the schedule resets it after)
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    stats = ppo_update(m, r, ro, step=1)
    assert stats["kl_rollback"] == 1.0
    if epochs == 1:
        assert not stats["final_approx_kl"] <= r.ppo.max_minibatch_kl and stats["kl_guard_stop"] == 0.0
    else:
        assert stats["kl_guard_stop"] == 1.0 and "final_approx_kl" not in stats
    assert all(torch.equal(weights[k], v) for k, v in m.actor.module.state_dict().items())
    after = _optimizer_state(m.actor)
    assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in moments[i])
    now = [p for g in undo.base_optimizer(m.actor).param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(master, now))
    for group in undo.base_optimizer(m.actor).param_groups:
        group["lr"] = 1e-3
    ok = ppo_update(m, r, rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {}), step=2)
    assert ok["kl_rollback"] == 0.0  # and training goes on from the restored weights
    assert not all(torch.equal(weights[k], v) for k, v in m.actor.module.state_dict().items())


def test_without_kl_rollback_the_update_stays(demo_assets, sft_dir, reward_dir, tmp_path):
    r, m = _one_minibatch_grpo(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "ppo.ppo_epochs=1",
        "train.learning_rate=3.0",
        "ppo.kl_rollback=never",
    )
    weights = _weights(m.actor)
    stats = ppo_update(
        m, r, rollout.make_rollout(m, r, [p for p in PROMPTS for _ in range(4)], (0.0, 1.0), 0.05, {}), 0
    )
    assert stats["kl_rollback"] == 0.0 and "final_approx_kl" not in stats
    assert not all(torch.equal(weights[k], v) for k, v in m.actor.module.state_dict().items())


def test_kl_rollback_settings_are_checked(demo_assets, sft_dir, reward_dir, tmp_path):
    with pytest.raises(ConfigError, match="zero_stage 3"):
        _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "ppo.kl_rollback=always", "deepspeed.zero_stage=3")
    with pytest.raises(ConfigError, match="max_minibatch_kl"):
        _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "ppo.kl_rollback=always", "ppo.max_minibatch_kl=null")
    z3 = _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "deepspeed.zero_stage=3")
    assert z3.ppo.kl_rollback == "auto" and not z3.ppo.rolls_back(3) and z3.ppo.rolls_back(2)


def test_recipes_refuse_impossible_reward_setups(demo_assets, sft_dir, reward_dir, tmp_path):
    with pytest.raises(ConfigError, match="no reward"):
        _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "reward_dir=null")
    with pytest.raises(ConfigError, match="critic from the reward model"):
        _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "reward_dir=null", "reward_functions=[{function: 'a:b'}]")
