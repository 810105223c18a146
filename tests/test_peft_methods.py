"""Every `peft.method`: the mapping to peft's configs, the refusals, QLoRA's quantization, and SFT
end to end on the demo model for each method (merged export, or an adapter that cannot merge and
still samples, scores and generates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, SFT_QUICK, demo_overrides, ppo_overrides, reward_overrides
from rlhf.adapters import adapter_config, quantization_config
from rlhf.checkpoint import MANIFEST
from rlhf.config import ConfigError, GenerationSettings, PeftConfig, RewardRecipe, SFTRecipe, load_recipe
from rlhf.config_dpo import DPORecipe
from rlhf.config_rl import PPORecipe
from rlhf.errors import HandoffError
from rlhf.stages.sft import run_sft
from rlhf.tracking import METRICS_FILE, read_jsonl

# One of each code path end to end (LoRA itself: tests/test_sft_recipe.py): a LyCORIS method, IA3's
# scaling vectors, and QLoRA's 4-bit base. DoRA and LoKr share these paths (a LoRA flag, LoHa's
# tuner family); their configs are checked above, and docs/peft.md's run trains them on SmolLM2.
MERGEABLE = ["loha", "ia3", "qlora"]
NOT_MERGEABLE = ["prompt_tuning", "prefix_tuning"]


def _has_bitsandbytes() -> bool:
    from importlib import metadata

    try:
        metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_bnb = pytest.mark.skipif(not _has_bitsandbytes(), reason="bitsandbytes is not installed (the [qlora] extra)")


# ---------------------------------------------------------------------------------------------
# The recipe section -> peft's config classes
# ---------------------------------------------------------------------------------------------


def test_each_method_builds_its_peft_config():
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    def cfg(method, **kw):
        return adapter_config(PeftConfig(enabled=True, method=method, r=4, alpha=8, **kw), "CAUSAL_LM", None, "tok/")

    lora, dora = cfg("lora"), cfg("dora")
    assert type(lora) is LoraConfig and not lora.use_dora and (lora.r, lora.lora_alpha) == (4, 8)
    assert type(dora) is LoraConfig and dora.use_dora
    assert type(cfg("qlora")) is LoraConfig  # the quantized base is the difference, not the adapter
    loha, lokr = cfg("loha", dropout=0.1), cfg("lokr")
    assert type(loha) is LoHaConfig and (loha.r, loha.alpha, loha.module_dropout) == (4, 8, 0.1)
    assert type(lokr) is LoKrConfig and lokr.r == 4
    ia3 = cfg("ia3")
    assert type(ia3) is IA3Config and ia3.target_modules is None  # peft's per-architecture IA3 modules
    ia3_named = cfg("ia3", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert set(ia3_named.target_modules) == {"k_proj", "down_proj"} and set(ia3_named.feedforward_modules) == {
        "down_proj"
    }
    pt = cfg("prompt_tuning", num_virtual_tokens=7)
    assert type(pt) is PromptTuningConfig and pt.num_virtual_tokens == 7
    assert (
        str(getattr(pt.prompt_tuning_init, "value", pt.prompt_tuning_init)) == "SAMPLE_VOCAB"
        and pt.tokenizer_name_or_path is None
    )
    pt_text = cfg("prompt_tuning", prompt_init_text="Answer briefly.")
    assert (
        str(getattr(pt_text.prompt_tuning_init, "value", pt_text.prompt_tuning_init)) == "TEXT"
        and pt_text.tokenizer_name_or_path == "tok/"
    )
    prefix = cfg("prefix_tuning", num_virtual_tokens=5)
    assert type(prefix) is PrefixTuningConfig and prefix.num_virtual_tokens == 5
    assert adapter_config(PeftConfig(enabled=False), "CAUSAL_LM") is None


def test_scorer_adapters_train_the_head_in_full():
    from peft import LoHaConfig

    cfg = adapter_config(PeftConfig(enabled=True, method="loha"), "SEQ_CLS", ["score"])
    assert type(cfg) is LoHaConfig and cfg.task_type == "SEQ_CLS" and cfg.modules_to_save == ["score"]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"method": "ia3"}, "peft.method=ia3 needs peft.enabled: true"),
        ({"enabled": True, "method": "ia3", "quantization": "4bit"}, "quantization is for method qlora"),
        ({"enabled": True, "prompt_init_text": "hi"}, "prompt_init_text is used by method prompt_tuning"),
        ({"enabled": True, "method": "prefix_tuning", "num_virtual_tokens": 0}, "num_virtual_tokens must be >= 1"),
        ({"enabled": True, "method": "adalora"}, "adalora"),
        ({"enabled": True, "feedforward_modules": ["down_proj"]}, "feedforward_modules is used by method ia3"),
        (
            {"enabled": True, "method": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
            "must be a subset of peft.target_modules",
        ),
    ],
)
def test_bad_peft_sections_are_errors_that_name_the_key(tmp_path, section, message):
    recipe = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]}, "peft": section}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    with pytest.raises(ConfigError, match=message):
        load_recipe(SFTRecipe, path)


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_packing_is_refused_with_prompt_style_methods(method):
    with pytest.raises(ConfigError, match=f"packing: true cannot be used with peft.method={method}"):
        load_recipe(
            SFTRecipe, REPO / "recipes/demo/sft.yaml", ["packing=true", "peft.enabled=true", f"peft.method={method}"]
        )


def test_pipeline_refuses_a_prompt_tuned_sft_before_stages_that_need_weights(tmp_path):
    from rlhf.config_run import PipelineRecipe
    from rlhf.pipeline import plan

    sft = tmp_path / "sft.yaml"
    sft.write_text((REPO / "recipes/demo/sft.yaml").read_text() + "\npeft: {enabled: true, method: prompt_tuning}\n")
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text((REPO / "recipes/demo/pipeline.yaml").read_text().replace("recipes/demo/sft.yaml", str(sft)))
    p = load_recipe(PipelineRecipe, pipe, [f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="peft.method=prompt_tuning cannot be merged.*reward, ppo stage"):
        plan(p)


def test_legacy_qlora_spelling_is_recorded_as_qlora():
    legacy = PeftConfig(enabled=True, method="lora", quantization="4bit")
    assert legacy.kind == "qlora" and legacy.quant_bits == "4bit" and PeftConfig(enabled=True).kind == "lora"


def test_dropout_inside_loha_adapters_is_switched_off_for_rl(demo_assets):
    """LoHa / LoKr keep their module dropout in a dict per adapter; RL must zero it like nn.Dropout."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.stages.ppo.engines import disable_dropout

    cfg = adapter_config(PeftConfig(enabled=True, method="loha", dropout=0.3), "CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_assets / "base"), cfg)
    rates = [v for m in model.modules() for v in (getattr(m, "module_dropout", None) or {}).values()]
    assert rates and set(rates) == {0.3}
    disable_dropout(model)
    rates = [v for m in model.modules() for v in (getattr(m, "module_dropout", None) or {}).values()]
    assert rates and set(rates) == {0.0}


def test_ia3_with_named_modules_needs_its_feedforward_modules():
    with pytest.raises(ConfigError, match="needs peft.feedforward_modules"):
        adapter_config(PeftConfig(enabled=True, method="ia3", target_modules=["k_proj"]), "CAUSAL_LM")


@pytest.mark.parametrize("method", NOT_MERGEABLE)
@pytest.mark.parametrize(
    "cls, recipe_file, stage",
    [
        (RewardRecipe, "recipes/demo/reward.yaml", "reward stage: its head reads the score"),
        (PPORecipe, "recipes/demo/ppo.yaml", "RL stage: the trained policy is exported"),
        (DPORecipe, "recipes/demo/dpo.yaml", "DPO stage"),
    ],
)
def test_stages_that_need_full_weights_refuse_prompt_style_methods(cls, recipe_file, stage, method):
    with pytest.raises(ConfigError, match=f"peft.method={method} is not supported by the {stage}"):
        load_recipe(cls, REPO / recipe_file, ["peft.enabled=true", f"peft.method={method}"])


@pytest.mark.parametrize(
    "cls, recipe_file", [(PPORecipe, "recipes/demo/ppo.yaml"), (DPORecipe, "recipes/demo/dpo.yaml")]
)
def test_qlora_is_refused_where_the_base_must_stay_full_precision(cls, recipe_file):
    with pytest.raises(ConfigError, match="qlora"):
        load_recipe(cls, REPO / recipe_file, ["peft.enabled=true", "peft.method=qlora"])


@needs_bnb
def test_qlora_quantization_follows_precision_and_zero3_storage():
    q = PeftConfig(enabled=True, method="qlora")
    plain = quantization_config(q, "fp32", zero_stage=2)
    assert plain.load_in_4bit and plain.bnb_4bit_quant_type == "nf4" and plain.bnb_4bit_use_double_quant
    assert plain.bnb_4bit_compute_dtype == torch.float32 and plain.bnb_4bit_quant_storage == torch.uint8
    # ZeRO-3 shards parameters of one floating dtype: the 4-bit weights are stored in it (PEFT's guide)
    z3 = quantization_config(q, "bf16", zero_stage=3)
    assert z3.bnb_4bit_compute_dtype == torch.bfloat16 and z3.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(PeftConfig(enabled=True, method="qlora", quantization="8bit")).load_in_8bit
    assert quantization_config(PeftConfig(enabled=True, method="lora")) is None
    legacy = quantization_config(PeftConfig(enabled=True, method="lora", quantization="4bit"))
    assert legacy.load_in_4bit  # the older spelling of QLoRA keeps working


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package: pip install -e '\.\[qlora\]'"):
        quantization_config(PeftConfig(enabled=True, method="qlora"))


# ---------------------------------------------------------------------------------------------
# SFT end to end on the demo model, one run per method
# ---------------------------------------------------------------------------------------------


def _sft(assets: Path, out: Path, method: str, *extra: str, callbacks=None) -> Path:
    r = load_recipe(
        SFTRecipe,
        REPO / "recipes/demo/sft.yaml",
        demo_overrides(assets, out)
        + SFT_QUICK
        + [
            "peft.enabled=true",
            f"peft.method={method}",
            "train.max_steps=12",
            "train.eval_steps=0",
            "train.early_stopping_patience=0",
        ]
        + ["train.save_steps=12", "train.learning_rate=1e-2", *extra],
    )
    return run_sft(r, extra_callbacks=callbacks)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / METRICS_FILE) if "loss" in r}


class _RecordBaseLayers:
    """A TrainerCallback that records the class names of the q_proj layers being trained."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                outer.kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj.base_layer")}

        self.callback = CB()
        self.kinds: set[str] = set()


@pytest.mark.slow
@pytest.mark.parametrize("method", MERGEABLE)
def test_mergeable_methods_train_and_export_merged_weights(demo_assets, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if method == "qlora" and not _has_bitsandbytes():
        pytest.skip("bitsandbytes is not installed (the [qlora] extra)")
    record = _RecordBaseLayers()
    out = _sft(demo_assets, tmp_path, method, callbacks=[record.callback])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["type"] == method and manifest["peft"]["merged"] is True
    m = manifest["metrics"]
    assert 0 < m["trainable_parameters"] < 0.5 * m["total_parameters"] and m["peak_memory_mb"] > 0
    losses = _losses(out)
    assert losses[12] < losses[1], f"{method} did not learn: {losses[1]:.3f} -> {losses[12]:.3f}"
    if method == "qlora":
        assert record.kinds == {"Linear4bit"}, f"QLoRA trained on {record.kinds}, not a 4-bit base"
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter_keys = ("base_layer", "lora_", "hada_", "lokr_", "ia3_")
    assert not any(a in k for k in merged.state_dict() for a in adapter_keys), "adapter keys left in the export"
    base = AutoModelForCausalLM.from_pretrained(demo_assets / "base")
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed, f"{method}: the merged export equals the base model"
    if method != "qlora":  # QLoRA trained against a 4-bit base; its adapter merges into the full one
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets / "base"), out / "adapter")
        x = torch.tensor([[2, 10, 20, 30, 1, 3]])
        torch.testing.assert_close(merged(x).logits, adapted.eval()(x).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=NOT_MERGEABLE)
def prompt_style_sft(request, demo_assets, tmp_path_factory):
    out = _sft(demo_assets, tmp_path_factory.mktemp(request.param), request.param, "peft.num_virtual_tokens=6")
    return request.param, out


@pytest.mark.slow
def test_prompt_style_methods_export_an_adapter_that_loads_for_inference(prompt_style_sft, demo_assets):
    from peft import PeftModel

    from rlhf.models import load_model

    method, out = prompt_style_sft
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"] == {"type": method, "merged": False, "mergeable": False, "base": str(demo_assets / "base")}
    assert json.loads((out / "adapter_config.json").read_text())["num_virtual_tokens"] == 6
    m = manifest["metrics"]
    assert 0 < m["trainable_parameters"] < 0.05 * m["total_parameters"]
    losses = _losses(out)
    assert losses[12] < losses[1], f"{method} did not learn: {losses[1]:.3f} -> {losses[12]:.3f}"
    assert isinstance(load_model(out, "causal-lm"), PeftModel)


@pytest.mark.slow
def test_prompt_style_adapters_sample_from_the_distribution_they_score(prompt_style_sft):
    """Left-padded prompts of different lengths: the logits each token was drawn from (our
    `generation_inputs`, since peft's own generate is wrong for both methods under transformers 5)
    equal our scoring forward's; on an unpadded row our forward equals peft's own (training) forward,
    and the adapter really changes the distribution (it is not the base model's)."""
    from transformers import AutoTokenizer

    from rlhf.models import load_model
    from rlhf.sampling import generate, left_pad, policy_outputs, positions, render_prompt, response_mask_of

    method, out = prompt_style_sft
    tok = AutoTokenizer.from_pretrained(out)
    model = load_model(out, "causal-lm").eval()
    prompts = [[{"role": "user", "content": "tell me about the pizza ." * k}] for k in (1, 2, 3, 1)]
    gen = GenerationSettings(max_new_tokens=10, temperature=0.8)
    ids, mask = left_pad([render_prompt(tok, p) for p in prompts], tok.pad_token_id)
    assert len(set(mask.sum(1).tolist())) > 1, "the prompts must need different padding"
    torch.manual_seed(0)
    response, drawn_from = generate(model, ids, mask, gen, tok.eos_token_id, tok.pad_token_id, return_scores=True)
    resp_mask = response_mask_of(response, tok.eos_token_id)
    attn = torch.cat([mask, resp_mask], 1)
    logp, _ = policy_outputs(model, torch.cat([ids, response], 1), attn, positions(attn), response, gen.temperature)
    sampled = torch.log_softmax(drawn_from.float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    on = resp_mask.bool()
    torch.testing.assert_close(sampled[on], logp[on], atol=1e-4, rtol=1e-4)
    # One unpadded row through peft's forward, as SFT trained it: the same log-probs as ours.
    row = torch.cat([ids[2:3], response[2:3]], 1)
    R = response.shape[1]
    peft_logits = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[:, -R - 1 : -1].float()
    peft_logp = torch.log_softmax(peft_logits / gen.temperature, -1).gather(-1, response[2:3, :, None])[..., 0]
    torch.testing.assert_close(peft_logp, logp[2:3], atol=1e-4, rtol=1e-4)
    plain = model.get_base_model()  # the same weights without the learned tokens or prefix
    base_logp, _ = policy_outputs(
        plain, torch.cat([ids, response], 1), attn, positions(attn), response, gen.temperature
    )
    assert (base_logp[on] - logp[on]).abs().max() > 1e-2, "the adapter does not change what is sampled"


@pytest.mark.slow
def test_prompt_style_adapters_generate_and_are_refused_where_weights_are_needed(prompt_style_sft, tmp_path):
    from rlhf.export import export
    from rlhf.generate import generate_file
    from rlhf.handoff import merged_adapter

    method, out = prompt_style_sft
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "tell me about the hotel ."}) + "\n")
    gen = GenerationSettings(max_new_tokens=8)
    assert generate_file(str(out), str(prompts), str(tmp_path / "gen.jsonl"), gen, samples=2) == 2
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)
    import io

    from rlhf.generate import chat

    said = io.StringIO()
    chat(str(out), gen, stdin=io.StringIO("tell me about the hotel .\n/quit\n"), stdout=said)
    assert "model> " in said.getvalue()
    with pytest.raises(HandoffError, match=f"holds a {method} adapter, which cannot be merged"):
        merged_adapter(out, json.loads((out / MANIFEST).read_text()), needed_by="the reward stage")
    with pytest.raises(HandoffError, match="cannot be merged into the model's weights"):
        export(out, tmp_path / "exported")


@pytest.mark.slow
def test_reward_model_with_loha_exports_a_merged_scalar_head(demo_assets, sft_dir, tmp_path):
    from rlhf import handoff
    from rlhf.stages.reward import run_reward

    r = load_recipe(
        RewardRecipe,
        REPO / "recipes/demo/reward.yaml",
        reward_overrides(demo_assets, sft_dir, tmp_path)
        + ["train.max_steps=10", "train.eval_steps=5", "train.save_steps=10", "train.learning_rate=5e-3"]
        + ["peft.enabled=true", "peft.method=loha", "peft.r=4", "peft.alpha=8"],
    )
    out = run_reward(r)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["type"] == "loha" and manifest["peft"]["merged"] is True
    handoff.scalar_head(out)
    ppo = load_recipe(PPORecipe, REPO / "recipes/demo/ppo.yaml", ppo_overrides(demo_assets, sft_dir, out, tmp_path))
    from rlhf.stages.ppo import trainer

    trainer.check_handoff(ppo)  # a LoHa-trained reward model is an ordinary reward model downstream
