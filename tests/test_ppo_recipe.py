"""PPO end to end on the demo task in one process: metrics, export, resume, guards, hand-off."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO, ppo_overrides
from rlhf import autocast
from rlhf.checkpoint import MANIFEST, HandoffError
from rlhf.config import load_recipe
from rlhf.config_rl import PPORecipe
from rlhf.stages.ppo import engines, rollout
from rlhf.stages.ppo import trainer as ppo
from rlhf.stages.ppo.update import ppo_update
from rlhf.stages.ppo.trainer import PPOAborted, run_ppo
from rlhf.tracking import METRICS_FILE, read_jsonl

LOGGED = [
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "response_length",
    "clip_fraction",
    "approx_kl",
    "value_loss",
    "policy_loss",
    "explained_variance",
    "kl_coef",
    "time/generation",
    "time/scoring",
    "time/training",
    "tokens_per_second",
]


def recipe(assets, sft, reward, out, *extra) -> PPORecipe:
    return load_recipe(PPORecipe, REPO / "recipes/demo/ppo.yaml", ppo_overrides(assets, sft, reward, out) + list(extra))


def weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def ppo_run(demo_assets, sft_dir, reward_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    return run_ppo(recipe(demo_assets, sft_dir, reward_dir, out))


def test_metrics_are_logged_and_finite(ppo_run):
    rows = read_jsonl(ppo_run / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for key in LOGGED:
            assert key in r and math.isfinite(r[key]), (r["step"], key, r.get(key))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4), "actor == reference before the first update"
    assert rows[-1]["kl"] != 0.0
    samples = read_jsonl(ppo_run / "samples.jsonl")
    assert {s["step"] for s in samples} == {3, 6} and all({"prompt", "response", "reward"} <= set(s) for s in samples)


def test_export_changed_actor_reloads_and_generates(ppo_run, sft_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before, after = weights(sft_dir), weights(ppo_run)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO did not change the actor"
    assert all(torch.isfinite(v).all() for v in after.values())
    tok = AutoTokenizer.from_pretrained(ppo_run)
    model = AutoModelForCausalLM.from_pretrained(ppo_run)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "tell me about the pizza ."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert model.generate(**ids, max_new_tokens=8, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    m = json.loads((ppo_run / MANIFEST).read_text())
    assert [p["stage"] for p in m["parents"]] == ["sft", "reward"]
    assert m["metrics"]["steps"] == 6
    assert m["metrics"]["bf16_autocast"] is False  # the demo recipe's model.autocast: none, as chosen
    marks = m["metrics"]["memory_marks"]  # the run's memory at its named points, in the order reached
    order = ["start", "models", "generation", "scoring", "training", "checkpoint", "last_step", "export"]
    assert list(marks) == order
    peaks = [marks[k]["peak_mb"] for k in order]
    assert peaks == sorted(peaks) and peaks[-1] <= m["metrics"]["peak_memory_mb"]  # the peak so far only grows
    assert marks["models"]["now_mb"] > marks["start"]["now_mb"]  # four models loaded on the runtime
    if not torch.cuda.is_available():  # on a GPU the measure is torch's allocation, 0 before any model
        assert marks["start"]["now_mb"] > 100


def test_states_are_complete_and_pruned(ppo_run):
    states = sorted(p.name for p in (ppo_run / "checkpoints").iterdir())
    assert states == ["step-3", "step-6"]
    assert (ppo_run / "checkpoints" / "step-6" / "trainer_state.json").is_file()


def test_reference_frozen_actor_moves_in_one_update(demo_assets, sft_dir, reward_dir, tmp_path):
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path)
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    ref_before = {k: v.clone() for k, v in m.reference.state_dict().items()}
    actor_before = {k: v.detach().clone() for k, v in m.actor.module.state_dict().items()}
    prompts = [[{"role": "user", "content": "tell me about the pizza ."}]] * 16
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    stats = ppo_update(m, r, ro, step=0)
    assert stats["skipped_minibatches"] == 0
    assert all(torch.equal(ref_before[k], v) for k, v in m.reference.state_dict().items())
    assert any(not torch.equal(actor_before[k], v) for k, v in m.actor.module.state_dict().items())


def test_skipping_the_one_process_gradient_allreduce_changes_no_weight(demo_assets, sft_dir, reward_dir, tmp_path):
    """One process, ZeRO-0, fp32: the training engine skips DeepSpeed's fallback all-reduce (a
    flatten and copy of every gradient); an update through it equals, bit for bit, one that keeps it."""
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path)
    fp32 = torch.float32
    assert engines.skips_gradient_allreduce(1, 0, False, fp32, False)
    assert not engines.skips_gradient_allreduce(2, 0, False, fp32, False)  # a real reduction
    assert not engines.skips_gradient_allreduce(1, 2, False, fp32, False)  # ZeRO reduces in its optimizer
    assert not engines.skips_gradient_allreduce(1, 0, True, fp32, False)  # bf16 / fp16 engines
    assert not engines.skips_gradient_allreduce(1, 0, False, torch.bfloat16, False)  # a cast on the way
    assert not engines.skips_gradient_allreduce(1, 0, False, fp32, True)  # expert groups
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    after = []
    for keep in (False, True):
        engine = engines.training_engine(engines.load_policy(str(sft_dir), r), r, 1e-3)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = keep  # True: DeepSpeed's own path, for comparison
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        after.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    assert after[0].keys() == after[1].keys()
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
    assert any(not torch.equal(after[0][k], v) for k, v in weights(sft_dir).items()), "the updates changed nothing"


def test_exploding_ratio_and_all_masked_batches_never_reach_the_weights(demo_assets, sft_dir, reward_dir, tmp_path):
    # The KL guard off: it would stop the step at the first mini-batch; this tests the ratio guard.
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path, "ppo.max_minibatch_kl=null")
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    prompts = [[{"role": "user", "content": "tell me about the pizza ."}]] * 16
    ro = rollout.make_rollout(m, r, prompts, (0.0, 1.0), 0.05, {})
    before = {k: v.detach().clone() for k, v in m.actor.module.state_dict().items()}
    ro.logprobs = ro.logprobs - 50.0  # ratio = e^50 on every token
    stats = ppo_update(m, r, ro, step=0)
    assert stats["skipped_minibatches"] == 2 * r.ppo.ppo_epochs
    assert all(torch.equal(before[k], v) for k, v in m.actor.module.state_dict().items())
    ro.logprobs = ro.logprobs + 50.0
    ro.response_mask = torch.zeros_like(ro.response_mask)  # nothing to learn from
    stats = ppo_update(m, r, ro, step=0)
    assert math.isfinite(stats["policy_loss"]) and stats["policy_loss"] == 0.0
    assert all(torch.isfinite(v).all() for v in m.actor.module.state_dict().values())


def test_nan_reward_skips_the_step_and_repeated_nans_abort(demo_assets, sft_dir, reward_dir, tmp_path, monkeypatch):
    real = rollout.score_responses
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(rollout, "score_responses", nan_on_second_call)
    out = run_ppo(recipe(demo_assets, sft_dir, reward_dir, tmp_path / "one", "train.max_steps=3"))
    rows = read_jsonl(out / METRICS_FILE)
    assert rows[1].get("skipped_step") == 1.0 and "skipped_step" not in rows[2]
    assert all(torch.isfinite(v).all() for v in weights(out).values())

    monkeypatch.setattr(rollout, "score_responses", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(PPOAborted, match="2 consecutive PPO steps had NaN/inf"):
        run_ppo(recipe(demo_assets, sft_dir, reward_dir, tmp_path / "two", "ppo.max_bad_steps=2"))


@pytest.mark.slow
def test_resume_continues_as_if_never_stopped(demo_assets, sft_dir, reward_dir, tmp_path):
    clean = run_ppo(recipe(demo_assets, sft_dir, reward_dir, tmp_path / "clean"))
    interrupted = recipe(demo_assets, sft_dir, reward_dir, tmp_path / "resumed")
    out = run_ppo(interrupted, on_step_end=lambda step, _: step == 4)  # stop after step 4 (state saved)
    assert not (out / MANIFEST).exists() and (out / "checkpoints" / "step-4").is_dir()
    run_ppo(interrupted)
    a = {r["step"]: r for r in read_jsonl(clean / METRICS_FILE)}
    b = {r["step"]: r for r in read_jsonl(out / METRICS_FILE)}
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "approx_kl", "kl_coef"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    wa, wb = weights(clean), weights(out)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_handoff_refuses_mismatched_tokenizer(demo_assets, sft_dir, reward_dir, tmp_path):
    import shutil

    bad = tmp_path / "reward_bad_tok"
    shutil.copytree(reward_dir, bad)
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages }}"
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bad / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(HandoffError, match="tokenizers of actor/reference .* and reward model .* differ"):
        run_ppo(recipe(demo_assets, sft_dir, bad, tmp_path / "out"))


def test_handoff_refuses_a_policy_as_reward_model(demo_assets, sft_dir, tmp_path):
    with pytest.raises(HandoffError, match="expects a 'reward' output, but .* is a 'sft' output"):
        run_ppo(recipe(demo_assets, sft_dir, sft_dir, tmp_path))


def test_lora_actor_and_critic_with_adapter_disabled_reference(demo_assets, sft_dir, reward_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r = recipe(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "peft.enabled=true",
        "peft.r=8",
        "peft.alpha=16",
        "train.learning_rate=1e-2",
        "train.max_steps=3",
    )
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    assert m.reference is None, "LoRA PPO must not hold a second copy of the policy"
    trainable = [n for n, p in m.critic.module.named_parameters() if p.requires_grad]
    assert any("lora" in n for n in trainable) and any("score" in n for n in trainable)
    del m
    out = run_ppo(r)
    rows = read_jsonl(out / METRICS_FILE)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4), "adapter-disabled reference == actor at the start"
    assert rows[-1]["kl"] != 0.0 and all(math.isfinite(row["policy_loss"]) for row in rows)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["merged"] is True and manifest["peft"]["base"] == str(sft_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_dir), out / "adapter")
    x = torch.tensor([[2, 10, 20, 30, 1, 3]])
    torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-5, rtol=1e-5)
    sft = AutoModelForCausalLM.from_pretrained(sft_dir)
    assert not torch.allclose(merged(x).logits, sft(x).logits), "LoRA PPO changed nothing"


@pytest.mark.slow
def test_ppo_ptx_end_to_end_with_length_filtered_demonstrations(demo_assets, sft_dir, reward_dir, tmp_path):
    """PPO-ptx: SFT demonstrations mixed into the policy loss; rows over max_length are dropped and
    counted like any stage's data, never truncated."""
    from rlhf.sampling import render_conversation

    ptx = (
        f"ptx_data={{sources: [{{path: {demo_assets / 'data' / 'sft.jsonl'}}}], max_length: 22, "
        "validation_fraction: 0.0}"
    )
    r = recipe(demo_assets, sft_dir, reward_dir, tmp_path, "train.max_steps=2", "ppo.ptx_coef=0.5", ptx)
    rows = read_jsonl(run_ppo(r) / METRICS_FILE)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["ptx_loss"]) and row["ptx_loss"] > 0 for row in rows)
    tok = ppo.load_tokenizer(str(sft_dir))
    data = ppo.prepare_data(r, tok, {"reward_stats": {"mean": 0.0, "std": 1.0}})
    lengths = [len(render_conversation(tok, row)) for row in data.ptx]
    assert data.ptx and max(lengths) <= 22
    full = ppo.prepare_data(
        recipe(
            demo_assets,
            sft_dir,
            reward_dir,
            tmp_path,
            "ppo.ptx_coef=0.5",
            ptx.replace("max_length: 22", "max_length: 512"),
        ),
        tok,
        {"reward_stats": {"mean": 0.0, "std": 1.0}},
    )
    assert len(full.ptx) > len(data.ptx), "no row was long enough to be filtered: the test proves nothing"


def test_handoff_refuses_an_unmerged_lora_sft_output(demo_assets, sft_dir, reward_dir, tmp_path):
    import shutil

    adapter_only = tmp_path / "sft_adapter"
    shutil.copytree(sft_dir, adapter_only)
    manifest = json.loads((adapter_only / MANIFEST).read_text())
    manifest["peft"] = {"type": "lora", "merged": False, "base": str(sft_dir)}
    (adapter_only / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(HandoffError, match="holds an unmerged adapter, which the PPO stage cannot start from"):
        run_ppo(recipe(demo_assets, adapter_only, reward_dir, tmp_path / "out"))


def test_every_user_facing_error_is_one_type_that_the_cli_maps_to_exit_2(demo_assets, sft_dir, tmp_path, capsys):
    from rlhf.cli import main
    from rlhf.errors import RlhfError

    assert issubclass(PPOAborted, RlhfError) and issubclass(HandoffError, RlhfError)
    rc = main(
        [
            "ppo",
            "--config",
            str(REPO / "recipes/demo/ppo.yaml"),
            *ppo_overrides(demo_assets, sft_dir, sft_dir, tmp_path),
        ]
    )
    assert rc == 2 and "expects a 'reward' output" in capsys.readouterr().err


def test_autocast_auto_follows_native_bf16(caplog):
    """`model.autocast: auto` turns bf16 on only where the hardware computes it: emulated bf16 made
    a SmolLM2 PPO step more than 15x slower than fp32 on an AVX2-only CPU."""
    cpu = torch.device("cpu")
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    graviton = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert not autocast.native_bf16(cpu, avx2)
    assert autocast.native_bf16(cpu, sapphire) and autocast.native_bf16(cpu, graviton)
    assert not autocast.native_bf16(cpu, "")  # no flags line at all: say no
    assert autocast.resolve_autocast("bf16", cpu) and not autocast.resolve_autocast("none", cpu)
    with caplog.at_level("INFO", logger="rlhf"):
        chosen = autocast.resolve_autocast("auto", cpu)
    assert chosen == autocast.native_bf16(cpu)  # this machine's own answer, and the log says which
    assert "model.autocast=auto: " + ("bf16" if chosen else "off (no native bf16)") in caplog.text
    assert load_recipe(PPORecipe, REPO / "recipes/smollm2-135m/ppo.yaml").model.autocast == "auto"
