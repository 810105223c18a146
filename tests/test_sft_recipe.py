"""SFT end to end on the tiny demo model in one process: outputs, learning, resume, LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import REPO, SFT_QUICK, demo_overrides
from rlhf.checkpoint import MANIFEST
from rlhf.config import SFTRecipe, load_recipe
from rlhf.stages.sft import run_sft
from rlhf.tracking import METRICS_FILE, read_jsonl

QUICK = SFT_QUICK


def recipe(assets: Path, out: Path, *extra: str) -> SFTRecipe:
    return load_recipe(SFTRecipe, REPO / "recipes/demo/sft.yaml", demo_overrides(assets, out) + QUICK + list(extra))


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, the last record winning (a resumed run re-logs some steps)."""
    return {r["step"]: r["loss"] for r in read_jsonl(out / METRICS_FILE) if "loss" in r}


def state_dict(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def sft_run(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return run_sft(recipe(demo_assets, out)), demo_assets


def test_sft_writes_a_complete_hf_directory_with_manifest(sft_run):
    out, assets = sft_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MANIFEST):
        assert (out / name).is_file(), name
    m = json.loads((out / MANIFEST).read_text())
    assert m["stage"] == "sft" and m["parents"] == []
    assert m["recipe"]["train"]["max_steps"] == 60
    assert m["metrics"]["global_step"] == 60
    assert m["datasets"]["sources"][0]["fingerprint"] and m["datasets"]["train"] > 1000
    assert m["versions"]["transformers"] and m["versions"]["trl"]
    assert "commit" in m["git"] and m["started_at"] <= m["finished_at"]


def test_sft_loss_is_finite_and_falls(sft_run):
    out, _ = sft_run
    by_step = losses(out)
    assert all(math.isfinite(v) for v in by_step.values())
    first, last = by_step[1], by_step[60]
    assert last < 0.6 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    evals = [r["eval_loss"] for r in read_jsonl(out / METRICS_FILE) if "eval_loss" in r]
    assert len(evals) == 6 and evals[-1] < evals[0]


def test_sft_changed_the_parameters(sft_run):
    out, assets = sft_run
    before, after = state_dict(assets / "base"), state_dict(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged tensors: {set(before) - set(changed)}"


def test_sft_checkpoint_reloads_and_generates_task_text(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = sft_run
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "tell me about the pizza ."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.startswith("the "), text  # the demonstrations all start this way
    assert gen[0, -1].item() == tok.eos_token_id, "the model should have learned to stop"


class StopAt:
    """Simulates an interruption: stops training after `step` (the last checkpoint is older)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(demo_assets, tmp_path):
    """Stop at step 15 (checkpoint at 10), rerun: steps 11..30 must match a clean run exactly
    (fp32, CPU, same seed): same data order, optimizer state, scheduler and RNG."""
    extra = ["train.max_steps=20", "train.save_steps=10", "train.eval_steps=0", "train.early_stopping_patience=0"]
    clean = run_sft(recipe(demo_assets, tmp_path / "clean", *extra))
    interrupted = recipe(demo_assets, tmp_path / "resumed", *extra)
    out = run_sft(interrupted, extra_callbacks=[StopAt(15)])
    assert not (out / MANIFEST).exists(), "an interrupted stage must not look complete"
    assert (out / "checkpoints" / "checkpoint-10").is_dir()
    run_sft(interrupted)  # the same command again resumes from checkpoint-10
    a, b = losses(clean), losses(out)
    assert sorted(b) == sorted(a) == list(range(1, 21))
    for step in range(11, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert json.loads((out / MANIFEST).read_text())["metrics"]["global_step"] == 20
    sa, sb = state_dict(clean), state_dict(out)
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)


@pytest.mark.slow
def test_lora_trains_adapter_and_merged_export_reloads(demo_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = run_sft(
        recipe(
            demo_assets,
            tmp_path,
            "peft.enabled=true",
            "peft.r=8",
            "peft.alpha=16",
            "train.learning_rate=1e-2",
            "train.max_steps=20",
            "train.eval_steps=0",
            "train.early_stopping_patience=0",
        )
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["peft"]["merged"] is True
    assert (out / "adapter" / "adapter_config.json").is_file()
    by_step = losses(out)
    assert by_step[20] < by_step[1]
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(demo_assets / "base")
    assert not any(k.startswith("base_model") or "lora" in k for k in merged.state_dict())
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert any("q_proj" in k for k in changed), "LoRA deltas were not merged into the weights"
    assert not any("embed" in k or "norm" in k for k in changed), "LoRA must leave non-adapted weights alone"
    # merged model == base + adapter on the same input
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets / "base"), out / "adapter")
    x = torch.tensor([[2, 10, 20, 30, 1, 3]])
    torch.testing.assert_close(merged(x).logits, adapted(x).logits, atol=1e-4, rtol=1e-4)


def test_row_packed_collator_keeps_examples_independent(demo_assets):
    """Two examples packed in one row give the same logits as each run alone: no cross-attention."""
    from transformers import AutoModelForCausalLM

    from rlhf.stages.sft import row_packed_collator

    model = AutoModelForCausalLM.from_pretrained(demo_assets / "base").eval()
    a, b = [2, 40, 41, 42, 1, 3, 50, 51, 1], [2, 60, 61, 1, 3, 70, 1]
    batch = row_packed_collator(pad_token_id=0)(
        [
            {"input_ids": a + b, "seq_lengths": [len(a), len(b)]},
            {"input_ids": b, "seq_lengths": [len(b)]},  # shorter row: padded at the end
        ]
    )
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    assert (batch["labels"][1, len(b) :] == -100).all(), "padding must not be trained on"
    with torch.no_grad():
        # use_cache=False as in training (TrainingArguments.use_cache defaults to False): with a KV
        # cache transformers does not read position_ids as packing.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[0, : len(a)], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, len(a) :], alone_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, : len(b)], alone_b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sft_with_packing_trains(demo_assets, tmp_path):
    out = run_sft(
        recipe(demo_assets, tmp_path, "packing=true", "data.max_length=128", "train.max_steps=10", "train.eval_steps=5")
    )
    m = json.loads((out / MANIFEST).read_text())
    assert m["recipe"]["packing"] is True and m["metrics"]["global_step"] == 10
    by_step = losses(out)
    assert by_step[10] < by_step[1] and all(math.isfinite(v) for v in by_step.values())


def _trained_text(tok, rows, loss_on="completion") -> str:
    """What the SFT stage's own dataset makes TRL train on, decoded from the collated labels."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rlhf.stages.sft import _to_dataset

    model = AutoModelForCausalLM.from_config(
        __import__("transformers").LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    args = SFTConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True, completion_only_loss=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=_to_dataset(rows, tok, loss_on, "train"), processing_class=tok
    )
    labels = next(iter(trainer.get_train_dataloader()))["labels"][0]
    return tok.decode(labels[labels != -100].tolist())


CONVO = [
    {"role": "user", "content": "tell me about the pizza ."},
    {"role": "assistant", "content": "the pizza was great ."},
    {"role": "user", "content": "and the movie ?"},
    {"role": "assistant", "content": "the movie was fine ."},
]


def test_completion_loss_with_a_template_that_has_generation_markers(demo_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    assert "{% generation %}" in tok.chat_template
    assert _trained_text(tok, [CONVO]) == "the pizza was great .<|end|>the movie was fine .<|end|>"
    assert _trained_text(tok, [CONVO], loss_on="all").startswith("<|user|>tell me about the pizza .")


def test_completion_loss_with_a_template_without_markers_and_a_refusal_when_turns_change(demo_assets):
    """Real templates (ChatML here) have no generation markers; the reply tokens are found by
    rendering prefixes. A template that rewrites earlier turns cannot be masked: a clear error."""
    from transformers import AutoTokenizer

    from rlhf.data.io import DataError
    from rlhf.stages.sft import _to_dataset

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert _trained_text(tok, [CONVO]) == "the pizza was great .<|end|>\nthe movie was fine .<|end|>\n"
    # A template that drops earlier replies once a later turn exists (as reasoning templates do).
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(DataError, match="train example 0 .*renders an earlier part of the conversation differently"):
        _to_dataset([CONVO], tok, "completion", "train")
