"""bf16 autocast outside PPO: the forward wrapper (`rlhf.autocast`), the SFT, reward and DPO
stages' `model.autocast`, and the evaluation's `generation_autocast`."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, SFT_QUICK, demo_overrides, reward_overrides
from rlhf import autocast
from rlhf.checkpoint import MANIFEST
from rlhf.config import RewardRecipe, SFTRecipe, load_recipe
from rlhf.stages import common

CPU = torch.device("cpu")


def tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_labels=1,
        pad_token_id=0,
    )
    return (LlamaForCausalLM if kind == "lm" else LlamaForSequenceClassification)(cfg).eval()


def output_dtypes(model) -> dict[str, torch.dtype]:
    """The dtype each watched module's output had in the last forward pass."""
    seen: dict[str, torch.dtype] = {}
    for name, mod in model.named_modules():
        if name.endswith(("mlp.down_proj", "score", "lm_head")) and not name.endswith("base_layer"):
            mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    return seen


def test_the_wrapper_runs_the_trunk_in_bf16_and_matches_fp32_within_rounding():
    model = tiny("lm")
    ids = torch.randint(1, 64, (3, 9))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
    seen = output_dtypes(model)
    assert not autocast.is_wrapped(model)
    assert autocast.autocast_forward(model, CPU) is model and autocast.is_wrapped(model)
    with torch.no_grad():
        approx = model(input_ids=ids).logits
    assert seen["model.layers.0.mlp.down_proj"] == torch.bfloat16 and seen["lm_head"] == torch.bfloat16
    assert not torch.equal(approx.float(), exact)  # it did compute differently...
    assert torch.allclose(approx.float(), exact, atol=0.05, rtol=0.05)  # ...within bf16 rounding
    forward = model.forward
    autocast.autocast_forward(model, CPU)
    assert model.forward is forward  # idempotent: one wrapper, not two


def test_a_scalar_head_stays_fp32_under_autocast_also_inside_a_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    for model in (tiny("scorer"), get_peft_model(tiny("scorer"), LoraConfig(task_type="SEQ_CLS", r=4))):
        seen = output_dtypes(model)
        autocast.autocast_forward(model, CPU)
        with torch.no_grad():
            score = model(input_ids=torch.randint(1, 64, (2, 7))).logits
        layer = next(k for k in seen if k.endswith("layers.0.mlp.down_proj"))
        assert seen[layer] == torch.bfloat16
        heads = {k: v for k, v in seen.items() if k.endswith("score")}
        assert heads and set(heads.values()) == {torch.float32}, seen
        assert score.dtype == torch.float32


def test_a_wrapped_copy_computes_with_its_own_weights_and_a_bf16_head_does_not_break():
    import copy

    model = autocast.autocast_forward(tiny("scorer"), CPU)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.score.weight.mul_(2.0)  # the copy's head only
        ids = torch.randint(1, 64, (2, 7))
        assert autocast.is_wrapped(twin)
        assert torch.allclose(twin(input_ids=ids).logits, 2 * model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    # Weights stored in bf16 (train.precision: bf16): the head computes in bf16, as it is stored.
    low = autocast.autocast_forward(tiny("scorer").to(torch.bfloat16), CPU)
    with torch.no_grad():
        assert low(input_ids=ids).logits.dtype == torch.bfloat16


def test_common_train_wraps_the_model_and_a_separate_reference_only_when_asked(tmp_path):
    """The HF stages' one entry into training: model.autocast decides, for DPO's reference too."""

    class Trainer:
        def __init__(self):
            self.model, self.ref_model = tiny("lm"), tiny("lm")
            self.args = SimpleNamespace(device=CPU)
            self.state = SimpleNamespace(global_step=1, max_steps=1)
            self.control = SimpleNamespace(should_training_stop=False)

        def train(self, resume_from_checkpoint=None):
            return "trained"

    # attn_implementation auto: eager only for bf16 compute (autocast, or bf16 weights) on rows of at
    # most 256 tokens on a CPU; an explicit kernel is kept as given
    for setting, precision, max_length, attention, wrapped, kernel in (
        ("none", "fp32", 64, "auto", False, "sdpa"),
        ("bf16", "fp32", 64, "auto", True, "eager"),
        ("bf16", "fp32", 512, "auto", True, "sdpa"),
        ("none", "bf16", 64, "auto", False, "eager"),
        ("bf16", "fp32", 64, "sdpa", True, "sdpa"),
    ):
        recipe = SimpleNamespace(
            model=SimpleNamespace(autocast=setting, attn_implementation=attention),
            resume="never",
            train=SimpleNamespace(early_stopping_patience=0, precision=precision),
            data=SimpleNamespace(max_length=max_length),
        )
        trainer = Trainer()
        trainer.model.set_attn_implementation("sdpa")
        result, _ = common.train(trainer, recipe, SimpleNamespace(checkpoints=tmp_path))
        assert result == "trained"
        assert autocast.is_wrapped(trainer.model) is wrapped and autocast.is_wrapped(trainer.ref_model) is wrapped
        assert autocast.attention_of(trainer.model) == autocast.attention_of(trainer.ref_model) == kernel, recipe


def test_attention_kernel_auto_is_eager_only_for_short_bf16_rows_on_a_cpu():
    gpu = torch.device("cuda", 0)
    assert autocast.attention_kernel("auto", CPU, True, 128) == "eager"
    assert autocast.attention_kernel("auto", CPU, True, autocast.EAGER_MAX_TOKENS) == "eager"
    assert autocast.attention_kernel("auto", CPU, True, autocast.EAGER_MAX_TOKENS + 1) == "sdpa"
    assert autocast.attention_kernel("auto", CPU, False, 128) == "sdpa"
    assert autocast.attention_kernel("auto", gpu, True, 128) == "sdpa"
    assert autocast.attention_kernel("flash_attention_2", CPU, True, 128) == "flash_attention_2"
    assert autocast.attention_kernel(None, CPU, True, 128) is None
    # the switch reaches a model inside PEFT's wrapper, and both kernels compute the same function
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("lm"), LoraConfig(r=4, target_modules="all-linear"))
    autocast.use_attention(model, "sdpa")
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).logits
        autocast.use_attention(model, "eager")
        assert autocast.attention_of(model) == "eager"
        eager = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[mask.bool()], sdpa[mask.bool()], atol=1e-5, rtol=1e-5)


def test_model_autocast_is_a_known_key_with_a_checked_value(demo_assets, tmp_path):
    from rlhf.config import ConfigError

    base = REPO / "recipes/demo/sft.yaml"
    assert load_recipe(SFTRecipe, base, demo_overrides(demo_assets, tmp_path)).model.autocast == "none"
    with pytest.raises(ConfigError, match="model.autocast"):
        load_recipe(SFTRecipe, base, demo_overrides(demo_assets, tmp_path) + ["model.autocast=fp8"])
    from rlhf.config_dpo import DPORecipe

    with pytest.raises(ConfigError, match="precompute_ref_log_probs computes the reference"):
        load_recipe(
            DPORecipe,
            REPO / "recipes/smollm2-135m/dpo.yaml",
            ["model.autocast=auto", "precompute_ref_log_probs=true", "peft.enabled=true"],
        )
    from rlhf.config_run import EvalRecipe

    # The SmolLM2 recipes sample under autocast where it is native, and train SFT and reward in fp32.
    assert load_recipe(EvalRecipe, REPO / "recipes/smollm2-135m/eval.yaml").generation_autocast == "auto"


class DtypeWatch:
    """A TrainerCallback that records, while training steps run, the dtype of the outputs of a
    trunk matrix (layer 0's down_proj) and of a scalar head: what the forward really computed in."""

    def __init__(self):
        from transformers import TrainerCallback

        self.seen: dict[str, set] = {"trunk": set(), "head": set()}
        watch = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                for name, mod in model.named_modules():
                    kind = (
                        "trunk"
                        if name.endswith("layers.0.mlp.down_proj")
                        else "head"
                        if name.endswith("score")
                        else None
                    )
                    if kind:
                        mod.register_forward_hook(lambda m, i, o, kind=kind: watch.seen[kind].add(o.dtype))

        self.callback = Callback()


def test_sft_and_reward_train_under_autocast_and_say_so(demo_assets, sft_dir, tmp_path):
    from rlhf.stages.reward import run_reward
    from rlhf.stages.sft import run_sft

    quick = [q for q in SFT_QUICK if not q.startswith("train.max_steps")] + ["train.max_steps=6"]
    watch = DtypeWatch()
    sft = run_sft(
        load_recipe(
            SFTRecipe,
            REPO / "recipes/demo/sft.yaml",
            demo_overrides(demo_assets, tmp_path / "s") + quick + ["model.autocast=bf16"],
        ),
        extra_callbacks=[watch.callback],
    )
    m = json.loads((sft / MANIFEST).read_text())["metrics"]
    assert m["bf16_autocast"] is True and math.isfinite(m["test_loss"])
    assert m["attention"] == "eager"  # attn_implementation auto, bf16 on a CPU, short rows
    assert watch.seen["trunk"] == {torch.bfloat16}, watch.seen
    watch = DtypeWatch()
    reward = run_reward(
        load_recipe(
            RewardRecipe,
            REPO / "recipes/demo/reward.yaml",
            reward_overrides(demo_assets, sft_dir, tmp_path / "r")
            + ["train.max_steps=6", "train.eval_steps=3", "train.save_steps=3", "model.autocast=bf16"],
        ),
        extra_callbacks=[watch.callback],
    )
    r = json.loads((reward / MANIFEST).read_text())["metrics"]
    assert r["bf16_autocast"] is True
    assert watch.seen == {"trunk": {torch.bfloat16}, "head": {torch.float32}}, watch.seen
    assert r["validation"]["pairs"] > 0 and math.isfinite(r["validation"]["mean_margin"])
    # model.autocast: none (the default) leaves every forward in fp32.
    watch = DtypeWatch()
    run_sft(
        load_recipe(SFTRecipe, REPO / "recipes/demo/sft.yaml", demo_overrides(demo_assets, tmp_path / "n") + quick),
        extra_callbacks=[watch.callback],
    )
    assert watch.seen["trunk"] == {torch.float32}, watch.seen


def test_eval_samples_under_autocast_and_scores_without_it(demo_assets, sft_dir, reward_dir, tmp_path, monkeypatch):
    """generation_autocast covers sampling only: the reward model's scores, the KL estimate and the
    forgetting measure are computed as before (seen from inside each call, not from the manifest)."""
    from rlhf.config_run import EvalRecipe
    from rlhf.eval import run as eval_run

    state: dict[str, set] = {}

    def watched(name, fn):
        def call(*args, **kwargs):
            state.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return fn(*args, **kwargs)

        return call

    for name in ("sample", "score_responses", "sequence_logprobs", "nll_per_token"):
        monkeypatch.setattr(eval_run, name, watched(name, getattr(eval_run, name)))

    def run(out, setting):
        state.clear()
        recipe = load_recipe(
            EvalRecipe,
            REPO / "recipes/demo/eval.yaml",
            [
                f"demo_assets={demo_assets}",
                f"base_dir={demo_assets / 'base'}",
                "base_few_shot=0",
                f"sft_dir={sft_dir}",
                "ppo_dir=null",
                f"reward_dir={reward_dir}",
                f"prompts.sources.0.path={demo_assets / 'data/heldout_prompts.jsonl'}",
                f"forgetting_prompts={{path: {demo_assets / 'data/heldout_prompts.jsonl'}}}",
                f"output_dir={out}",
                "tracking.wandb=false",
                "samples_per_prompt=2",
                "generation.max_new_tokens=12",
                f"generation_autocast={setting}",
            ],
        )
        got = eval_run.run_eval(recipe)
        return json.loads((got / MANIFEST).read_text())["metrics"], dict(state)

    m32, seen32 = run(tmp_path / "fp32", "none")
    m16, seen16 = run(tmp_path / "bf16", "bf16")
    assert m32["generation_bf16_autocast"] is False and m16["generation_bf16_autocast"] is True
    assert seen32["sample"] == {False} and seen16["sample"] == {True}
    for name in ("score_responses", "sequence_logprobs", "nll_per_token"):
        assert seen16.get(name) == {False}, (name, seen16)  # called, and outside autocast


def test_frozen_weights_in_bf16_compute_bit_for_bit_as_autocast_casts_them(tmp_path):
    """PPO under autocast stores its frozen linear weights in bf16 (once, instead of a cast at every
    forward pass and generated token): the same numbers, trainable and tied weights untouched."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = get_peft_model(LlamaForCausalLM(cfg).eval(), LoraConfig(r=4, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter, so that it takes part
    ids = torch.randint(1, 64, (3, 9))
    with torch.no_grad(), autocast.context(True, CPU):
        before = model(input_ids=ids).logits
    assert autocast.store_frozen_in_bf16(model) == 2 * 7  # q k v o gate up down, per layer
    with torch.no_grad(), autocast.context(True, CPU):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # trained: fp32 as before
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"] == torch.bfloat16
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight and inner.lm_head.weight.dtype == torch.float32
    with pytest.raises(RuntimeError):  # outside autocast it fails loudly instead of computing differently
        model(input_ids=ids)


def test_a_state_with_bf16_frozen_weights_is_not_resumed_in_fp32(tmp_path):
    from rlhf.errors import HandoffError
    from rlhf.stages.ppo.state import STATE_FILE
    from rlhf.stages.ppo.trainer import frozen_dtype_matches

    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3, "frozen_bf16": True}))
    frozen_dtype_matches(tmp_path, SimpleNamespace(frozen_bf16=True), "fix")  # same run: fine
    with pytest.raises(HandoffError, match="frozen weights .* stored in bf16.*resume with the same"):
        frozen_dtype_matches(tmp_path, SimpleNamespace(frozen_bf16=False), "resume with the same model.autocast")
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 3}))  # older states, or fp32 runs
    frozen_dtype_matches(tmp_path, SimpleNamespace(frozen_bf16=False), "fix")
    frozen_dtype_matches(tmp_path, SimpleNamespace(frozen_bf16=True), "fix")
