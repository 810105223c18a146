"""The invariants a PPO-family loop must keep, on full fine-tuning, LoRA and bf16 autocast alike.

- the first mini-batch of a step has a probability ratio of 1 (nothing was updated yet);
- KL to the reference is 0 before the first update (the actor starts as the reference);
- sampled tokens come from softmax(logits / T) of the model that scores them;
- the reward is read where, and on the rendering that, reward training used (pad == eos too);
- the same text renders to the same ids in SFT, reward, PPO prompts and PPO-ptx.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REPO, ppo_overrides
from rlhf import autocast
from rlhf.config import GenerationSettings, load_recipe
from rlhf.config_rl import PPORecipe
from rlhf.errors import ConfigError, HandoffError
from rlhf.sampling import (
    generate,
    left_pad,
    policy_outputs,
    positions,
    render_conversation,
    render_for_loss,
    render_prompt,
    response_mask_of,
    score_responses,
    score_sequences,
)
from rlhf.stages.ppo import engines, rollout
from rlhf.stages.ppo import trainer as ppo
from rlhf.stages.ppo.update import ppo_update, ptx_batch, ptx_stream_index

PROMPTS = [[{"role": "user", "content": f"tell me about the {x} ."}] for x in ("pizza", "movie", "hotel", "book")] * 4

VARIANTS = {
    "full": [],
    # LoRA's default adapter dropout (0.05) is what broke the ratio before dropout was disabled for RL.
    "lora": ["peft.enabled=true", "peft.r=8", "peft.alpha=16", "peft.dropout=0.05"],
    "bf16-autocast": ["model.autocast=bf16"],
    # LoRA's relatives: the reference is the actor with these adapters switched off too (IA3 starts
    # at scale 1, LoHa with one factor at 0), and module dropout must be off for ratio 1.
    "ia3": ["peft.enabled=true", "peft.method=ia3"],
    "loha": ["peft.enabled=true", "peft.method=loha", "peft.r=4", "peft.alpha=8", "peft.dropout=0.05"],
}
# fp32: the same rows through the same weights; only batch composition differs between rollout and
# update. bf16 autocast rounds activations to 8 bits of mantissa, so "1 within rounding".
RATIO_TOL = {"full": 1e-5, "lora": 1e-5, "bf16-autocast": 5e-2, "ia3": 1e-5, "loha": 1e-5}


def _recipe(demo_assets, sft_dir, reward_dir, tmp_path, *extra) -> PPORecipe:
    return load_recipe(
        PPORecipe,
        REPO / "recipes/demo/ppo.yaml",
        ppo_overrides(demo_assets, sft_dir, reward_dir, tmp_path) + list(extra),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_first_minibatch_ratio_is_one_and_step0_kl_is_zero(demo_assets, sft_dir, reward_dir, tmp_path, variant):
    # lr 1e-2 moves the policy far on purpose (the mini-batch KL guard is off so every update applies).
    r = _recipe(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "ppo.ppo_epochs=1",
        "train.learning_rate=1e-2",
        "ppo.max_minibatch_kl=null",
        *VARIANTS[variant],
    )
    tok, _ = ppo.check_handoff(r)
    m = engines.build_models(r, tok)
    # attn_implementation auto: eager for bf16 compute on a CPU, sdpa in fp32, all models alike
    kernels = {autocast.attention_of(x) for x in (m.actor.module, m.critic.module, m.reward)}
    assert kernels == {"eager" if variant == "bf16-autocast" else "sdpa"}, (variant, kernels)
    assert m.frozen_bf16 is (variant == "bf16-autocast")  # the frozen weights stored as autocast casts them
    ro = rollout.make_rollout(m, r, PROMPTS, (0.0, 1.0), 0.05, {})
    mask = ro.response_mask.bool()
    # KL to the reference before any update: the actor *is* the reference (or the adapter is zero).
    assert ro.kl[mask].abs().max().item() <= RATIO_TOL[variant], variant
    # Step 1 moves the weights (LoRA's B leaves 0, so adapter dropout now matters); step 2's first
    # mini-batch must still see ratio 1: rollout and update compute the same function.
    for step in (0, 1):
        stats = ppo_update(m, r, ro, step=step)
        assert stats["skipped_minibatches"] == 0
        assert stats["initial_max_abs_log_ratio"] <= RATIO_TOL[variant], (variant, step, stats)
        ro = rollout.make_rollout(m, r, PROMPTS, (0.0, 1.0), 0.05, {})


def test_dropout_is_disabled_in_every_rl_model(demo_assets, sft_dir, reward_dir, tmp_path):
    r = _recipe(demo_assets, sft_dir, reward_dir, tmp_path, *VARIANTS["lora"])
    m = engines.build_models(r, ppo.check_handoff(r)[0])
    for model in (m.actor.module, m.critic.module):
        rates = [mod.p for mod in model.modules() if isinstance(mod, torch.nn.Dropout)]
        assert rates and all(p == 0.0 for p in rates)  # LoRA's dropout modules exist, and are off
    assert all(mod.p == 0.0 for mod in m.reward.modules() if isinstance(mod, torch.nn.Dropout))
    kept = _recipe(demo_assets, sft_dir, reward_dir, tmp_path, *VARIANTS["lora"], "model.disable_dropout=false")
    m = engines.build_models(kept, ppo.check_handoff(kept)[0])
    assert any(mod.p == 0.05 for mod in m.actor.module.modules() if isinstance(mod, torch.nn.Dropout))


def test_samples_come_from_softmax_of_the_scoring_logits(sft_dir):
    """A checkpoint whose generation_config.json changes the distribution (repetition penalty,
    no-repeat n-grams, top-k, as real checkpoints ship) must not change how rollouts are drawn:
    the logits each token was drawn from equal the scorer's logits / T exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_dir)
    model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    model.generation_config.repetition_penalty = 1.8
    model.generation_config.no_repeat_ngram_size = 2
    model.generation_config.top_k = 5
    gen = GenerationSettings(max_new_tokens=12, temperature=0.7)
    ids, mask = left_pad([render_prompt(tok, p) for p in PROMPTS[:8]], tok.pad_token_id)
    torch.manual_seed(0)
    response, drawn_from = generate(model, ids, mask, gen, tok.eos_token_id, tok.pad_token_id, return_scores=True)
    resp_mask = response_mask_of(response, tok.eos_token_id)
    full = torch.cat([ids, response], 1)
    attn = torch.cat([mask, resp_mask], 1)
    logp, _ = policy_outputs(model, full, attn, positions(attn), response, gen.temperature)
    sampled = torch.log_softmax(drawn_from.float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    on = resp_mask.bool()
    assert torch.isfinite(drawn_from[on]).all(), "a logits processor masked tokens out (top-k / no-repeat)"
    torch.testing.assert_close(sampled[on], logp[on], atol=1e-4, rtol=1e-4)
    assert model.generation_config.repetition_penalty == 1.8, "the checkpoint's own settings are restored"


def test_rl_refuses_truncated_sampling(demo_assets, sft_dir, reward_dir, tmp_path):
    with pytest.raises(ConfigError, match="top_p / generation.top_k truncate"):
        _recipe(demo_assets, sft_dir, reward_dir, tmp_path, "generation.top_p=0.9")


CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture()
def pad_is_eos_reward(demo_assets, tmp_path):
    """The demo tokenizer with a ChatML-style template (a newline after the end token, as SmolLM2 and
    Qwen have) and pad == eos, and a scalar-head model that reads its score before that pad id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    tok.chat_template = CHATML
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        demo_assets / "base", num_labels=1, pad_token_id=tok.pad_token_id
    ).eval()
    return tok, model


def test_reward_is_read_where_reward_training_read_it_when_pad_is_eos(pad_is_eos_reward):
    tok, model = pad_is_eos_reward
    prompt = [{"role": "user", "content": "tell me about the pizza ."}]
    reply = "the pizza was great ."
    trained_on = render_conversation(tok, prompt + [{"role": "assistant", "content": reply}])
    assert trained_on[-2:] == [tok.eos_token_id, tok("\n")["input_ids"][-1]]  # ... <|end|> \n
    sampled = tok(reply)["input_ids"] + [tok.eos_token_id]  # what the policy emits: the reply, then eos
    in_training = score_sequences(model, [trained_on], tok.pad_token_id)
    in_rollout = score_responses(model, tok, [prompt], [sampled], "cpu")
    torch.testing.assert_close(in_rollout, in_training)
    # Scoring the raw rollout ids would read the token *before* the eos (pad == eos), another number.
    raw = score_sequences(model, [render_prompt(tok, prompt) + sampled], tok.pad_token_id)
    assert not torch.allclose(raw, in_training)


def test_score_position_handoff_refuses_a_pad_mismatch(demo_assets, reward_dir, sft_dir, tmp_path):
    from rlhf import handoff
    from rlhf.models import load_tokenizer

    bad = tmp_path / "reward"
    shutil.copytree(reward_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["pad_token_id"] = load_tokenizer(str(sft_dir)).eos_token_id
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HandoffError, match="reads its score before pad id"):
        handoff.reward_model(bad, load_tokenizer(str(sft_dir)), "policy", needed_by="test")


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_one_rendering_for_reward_prompts_and_ptx(demo_assets, template):
    """Multi-turn rows: the prompt is an exact token prefix of the conversation, the reward model's
    ids are the conversation's, and the ptx labels cover exactly the final reply."""
    from transformers import AutoTokenizer

    from rlhf.stages.reward import _to_dataset

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    if template == "plain":
        tok.chat_template = None
    convo = [
        {"role": "user", "content": "tell me about the pizza ."},
        {"role": "assistant", "content": "the pizza was fine ."},
        {"role": "user", "content": "and the movie ?"},
        {"role": "assistant", "content": "the movie was great ."},
    ]
    ids, mask = render_for_loss(tok, convo)
    prompt_len = len(render_prompt(tok, convo[:-1]))
    assert ids[:prompt_len] == render_prompt(tok, convo[:-1])
    assert tok.decode(ids[prompt_len:], skip_special_tokens=True).strip() == "the movie was great ."
    trained = tok.decode([t for t, k in zip(ids, mask) if k], skip_special_tokens=True)
    # with a template every reply is trained on; without one, only the final reply
    assert trained == ("the pizza was fine .the movie was great ." if template == "chat" else "the movie was great .")
    pair = {
        "prompt": convo[:-1],
        "chosen": convo[-1:],
        "rejected": [{"role": "assistant", "content": "bad ."}],
        "margin": 0.0,
    }
    assert _to_dataset([pair], tok, use_margin=False)[0]["chosen_ids"] == ids
    batch = ptx_batch(tok, [convo], "cpu")
    labels = batch["labels"][0]
    assert labels[: len(ids)].tolist() == [t if k else -100 for t, k in zip(ids, mask)]
    assert labels[prompt_len : len(ids)].tolist() == ids[prompt_len:]


def test_ptx_stream_positions_never_collide():
    seen = {
        ptx_stream_index(s, e, k, ppo_epochs=4, minibatches=150)
        for s in range(30)
        for e in range(4)
        for k in range(150)
    }
    assert len(seen) == 30 * 4 * 150  # the old step*1000 + epoch*100 + k repeated past 100 mini-batches


def test_plain_rendering_keeps_the_prompt_a_prefix_across_a_trailing_space(demo_assets):
    """Without a template, prompt and reply are tokenized apart: a prompt ending in a space cannot
    merge with the reply's first token, so the reply's tokens are always found."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets / "base")
    tok.chat_template = None
    convo = [{"role": "user", "content": "the pizza was "}, {"role": "assistant", "content": "great ."}]
    ids, mask = render_for_loss(tok, convo)
    assert ids[: len(render_prompt(tok, convo[:1]))] == render_prompt(tok, convo[:1])
    assert tok.decode([t for t, k in zip(ids, mask) if k]) == "great .<|end|>"


def test_a_ptx_row_the_template_cannot_mask_fails_before_any_model_loads(demo_assets, sft_dir, reward_dir, tmp_path):
    from transformers import AutoTokenizer

    from rlhf.errors import DataError

    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rows = tmp_path / "ptx.jsonl"
    rows.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a ?"},
                    {"role": "assistant", "content": "b ."},
                    {"role": "user", "content": "c ?"},
                    {"role": "assistant", "content": "d ."},
                ]
            }
        )
        + "\n"
    )
    r = _recipe(
        demo_assets,
        sft_dir,
        reward_dir,
        tmp_path,
        "ppo.ptx_coef=0.5",
        f"ptx_data={{sources: [{{path: {rows}}}], validation_fraction: 0.0}}",
    )
    with pytest.raises(DataError, match="ptx_data example 0 .*renders an earlier part"):
        ppo.prepare_data(r, tok, {"reward_stats": {"mean": 0.0, "std": 1.0}})
