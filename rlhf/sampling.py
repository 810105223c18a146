"""Running a model: render a chat to token ids, pad, sample, per-token log-probs, reward scores.

One home for everything that turns text into model inputs and model outputs back into numbers,
used by the stages (reward data, RL rollouts, PPO-ptx), evaluation, `rlhf generate` / `chat` and
the labelling app alike. Two promises are kept here, and tested:

- **One rendering.** A conversation becomes token ids in exactly one way (`render_conversation`)
  and a prompt in exactly one way (`render_prompt`), whose ids are a prefix of the
  conversation's. The reward model is trained on `render_conversation` and rollouts are scored on
  it, so the score is read where, and on what, the reward model learned to read it.
- **Samples come from softmax(logits / T).** `generate` samples with only the settings the
  caller passes; nothing from a checkpoint's `generation_config.json` (a repetition penalty, a
  top-k) changes the distribution behind the caller's back, so the log-probs that
  `policy_outputs` computes describe the distribution each token was drawn from.

Layout of a sampled batch: B prompts left-padded to width P, responses right-padded to width R,
so every response starts at column P and response position t is column P + t.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhf.adapters import generation_inputs, is_prompt_tuned, prompt_tuned_inputs
from rlhf.config import GenerationSettings
from rlhf.data.formats import Messages

# Without a chat template the turns of a prompt are joined by a blank line and the reply follows
# the prompt directly (as in prompt + completion SFT), then eos.
PLAIN_TURN_SEPARATOR = "\n\n"


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _plain_prompt(prompt: Messages) -> str:
    """Without a chat template: the prompt turns' text joined by a blank line."""
    return PLAIN_TURN_SEPARATOR.join(m["content"] for m in prompt)


def render_prompt(tokenizer, prompt: Messages) -> list[int]:
    """Prompt turns -> token ids that end where the assistant's reply begins (the generation prompt)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return tokenizer(_plain_prompt(prompt))["input_ids"]


def render_conversation(tokenizer, messages: Messages) -> list[int]:
    """A whole conversation ending in an assistant reply -> token ids, as the reward model and the
    PPO-ptx loss see it (the chat template's full rendering, or prompt text + reply + eos)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    # Prompt and reply tokenized apart and joined, so the prompt's ids are a prefix by construction
    # (tokenizing the joined text could merge tokens across the boundary, e.g. after a trailing space).
    reply = tokenizer(messages[-1]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return render_prompt(tokenizer, messages[:-1]) + reply


def render_for_loss(tokenizer, messages: Messages) -> tuple[list[int], list[int]]:
    """(ids of the conversation, 0/1 mask of the tokens a completion loss trains on), (T,) each.

    With a chat template every assistant reply is trained on (its text and the template's
    end-of-turn tokens), located by rendering each prefix of the conversation: the tokens between
    `render_prompt(turns before the reply)` and `render_conversation(turns up to the reply)`. This
    works for any template, with or without `{% generation %}` markers. Without a template only the
    final reply (and eos) is trained on. Raises ValueError when a prefix does not render to a token
    prefix of the whole (a template that rewrites earlier turns): a mask built from it would cover
    the wrong tokens.
    """
    ids = render_conversation(tokenizer, messages)
    mask = [0] * len(ids)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in replies if tokenizer.chat_template else replies[-1:]:
        start = render_prompt(tokenizer, messages[:i]) if i else []
        upto = render_conversation(tokenizer, messages[: i + 1]) if i + 1 < len(messages) else ids
        if ids[: len(start)] != start or ids[: len(upto)] != upto:
            raise ValueError(
                "the chat template renders an earlier part of the conversation differently once more "
                "turns follow, so reply tokens cannot be located; use loss_on: all"
            )
        mask[len(start) : len(upto)] = [1] * (len(upto) - len(start))
    return ids, mask


def render_response(tokenizer, prompt: Messages, response_ids: list[int]) -> list[int]:
    """A sampled response put back into its conversation and rendered as reward training renders it.

    The response text up to (not including) its first eos becomes the assistant turn: a ChatML
    rollout `... <|im_end|>` is scored as `... <|im_end|>\\n`, exactly the token sequence (and so
    the score position) the reward model was trained on, also when pad equals eos.
    """
    eos = tokenizer.eos_token_id
    body = response_ids[: response_ids.index(eos)] if eos in response_ids else response_ids
    text = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return render_conversation(tokenizer, prompt + [{"role": "assistant", "content": text}])


# --------------------------------------------------------------------------------------------
# Padding and masks
# --------------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids and mask, padded on the left so all prompts end at column P."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids and mask, padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def response_mask_of(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, R) sampled tokens -> (B, R) mask: 1 up to and including the first eos, 0 after it."""
    is_eos = (responses == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos
    return (eos_before == 0).long()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, T) position ids that skip the left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------
# Sampling and log-probs
# --------------------------------------------------------------------------------------------


def generation_config(gen: GenerationSettings, eos_id: int, pad_id: int, greedy: bool = False):
    """A transformers GenerationConfig holding only what the caller asked for; top_k 0 and top_p 1
    are written out, because an unset value would take transformers' default (top_k=50)."""
    from transformers import GenerationConfig

    if greedy:
        return GenerationConfig(
            do_sample=False, max_new_tokens=gen.max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id
        )
    return GenerationConfig(
        do_sample=True,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


@contextlib.contextmanager
def _without_checkpoint_generation_defaults(policy):
    """While sampling, hide the checkpoint's generation_config.json: transformers fills every unset
    field from it (e.g. Qwen2.5's repetition_penalty), which would change the sampling distribution."""
    from transformers import GenerationConfig

    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def generate(
    policy,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationSettings,
    eos_id: int,
    pad_id: int,
    return_scores: bool = False,
    synced: bool = False,
    greedy: bool = False,
):
    """Sample responses with the KV cache; (B, P) -> (B, R) token ids (R <= max_new_tokens).

    With `return_scores`, also the (B, R, V) logits each token was drawn from after every logits
    processor transformers applied (what the invariant tests compare with `policy_outputs`).
    `synced`: every rank keeps stepping until all ranks are done (ZeRO-3 with several ranks, where
    each forward may gather shards collectively and a rank that stopped early would hang the rest).
    `greedy`: the most likely token each step (reference answers), instead of sampling.
    """
    cfg = generation_config(gen, eos_id, pad_id, greedy)
    if return_scores:
        cfg.output_scores, cfg.return_dict_in_generate = True, True
    model, inputs, start = generation_inputs(policy, prompt_ids, prompt_mask)  # prompt / prefix tuning apart
    with _without_checkpoint_generation_defaults(policy):
        out = model.generate(**inputs, generation_config=cfg, synced_gpus=synced)
    if return_scores:
        return out.sequences[:, start:], torch.stack(out.scores, dim=1)
    return out[:, start:]


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the logits, (B, T, V) x (B, T) -> (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def policy_outputs(
    policy,
    input_ids,
    attention_mask,
    position_ids,
    response: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, R) of the response tokens at `temperature` (and entropies (B, R)) under `policy`.

    input_ids / attention_mask / position_ids are (B, P+R) with the response in the last R columns.
    """
    logits, _ = response_logits(policy, input_ids, attention_mask, position_ids, response.shape[1], temperature)
    logp = logprobs_of(logits, response)
    return logp, (entropy_from_logits(logits) if with_entropy else None)


def response_logits(
    policy, input_ids, attention_mask, position_ids, R: int, temperature: float, with_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass -> fp32 logits (B, R, V) / temperature that predict the R response tokens,
    and with `with_hidden` the last hidden states (B, R, H) they came from (else None)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    model = policy
    if is_prompt_tuned(policy):  # learned embeddings first, positions as in training (see adapters)
        embeds, mask = prompt_tuned_inputs(policy, input_ids, attention_mask)
        inputs, model = (
            {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions(mask)},
            policy.get_base_model(),
        )
    # logits_to_keep: the LM head runs on the R + 1 last positions only, never on the prompt (with a
    # 150k vocabulary and long prompts that is most of the logits memory).
    seen: list[torch.Tensor] = []
    # The hidden states are taken as the LM head's own input: the final (normed) states at exactly
    # the positions it reads, whatever the architecture, without output_hidden_states keeping every
    # layer's states alive through a no-grad scoring pass.
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0])) if with_hidden else None
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=R + 1)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits[:, :-1].float() / temperature
    return logits, (seen[-1][:, :-1] if with_hidden else None)


def with_few_shot(prompt: Messages, shots: list[Messages]) -> Messages:
    """Prepend demonstration turns (user, assistant, ...) so a base model sees the task's format."""
    return [turn for shot in shots for turn in shot] + prompt


@dataclass
class Samples:
    """N = prompts x samples responses of one policy, in prompt-major order."""

    prompt_index: list[int]  # (N,) which prompt each response answers
    responses: list[list[int]]  # (N,) response token ids, cut after the first eos
    hit_limit: list[bool]  # (N,) reached max_new_tokens without an eos


@torch.no_grad()
def sample(
    policy,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int,
    gen: GenerationSettings,
    seed: int,
    batch_size: int,
    device,
    greedy: bool = False,
) -> Samples:
    """`n` sampled responses per prompt; seeded, so two runs of the same policy agree (`greedy`:
    the most likely answer instead)."""
    torch.manual_seed(seed)
    flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
    out = Samples([], [], [])
    policy.eval()
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        ids, mask = left_pad([c[1] for c in chunk], tokenizer.pad_token_id)
        resp = generate(
            policy, ids.to(device), mask.to(device), gen, tokenizer.eos_token_id, tokenizer.pad_token_id, greedy=greedy
        ).cpu()
        keep = response_mask_of(resp, tokenizer.eos_token_id)
        for (i, _), row, k in zip(chunk, resp, keep):
            tokens = row[: int(k.sum())].tolist()
            out.prompt_index.append(i)
            out.responses.append(tokens)
            out.hit_limit.append(tokenizer.eos_token_id not in tokens and len(tokens) >= gen.max_new_tokens)
    return out


@torch.no_grad()
def sequence_logprobs(
    model, prompt_ids: list[list[int]], samples: Samples, pad_id: int, temperature: float, batch_size: int, device
) -> list[float]:
    """Sum of log p(response | prompt) under `model` for each sample, (N,)."""
    out: list[float] = []
    model.eval()
    for start in range(0, len(samples.responses), batch_size):
        idx = range(start, min(start + batch_size, len(samples.responses)))
        p_ids, p_mask = left_pad([prompt_ids[samples.prompt_index[i]] for i in idx], pad_id)
        resp = [samples.responses[i] or [pad_id] for i in idx]  # an empty response scores 0 below
        r_ids, _ = right_pad(resp, pad_id)
        r_mask = torch.zeros_like(r_ids)
        for row, i in enumerate(idx):
            r_mask[row, : len(samples.responses[i])] = 1
        ids, attn = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        logp, _ = policy_outputs(
            model, ids.to(device), attn.to(device), positions(attn).to(device), r_ids.to(device), temperature
        )
        out.extend((logp.float().cpu() * r_mask).sum(1).tolist())
    return out


# --------------------------------------------------------------------------------------------
# Reward scores
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def score_sequences(
    model, sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """Scalar score of each rendered sequence: N token-id lists -> (N,) float32 on CPU.

    Right padding with the pad id, exactly as the reward trainer's collator pads, so the
    sequence-classification head reads the same position it read in training (the last token that
    is not the pad id). Sequences are sorted by length so padding stays small; the scores come back
    in the caller's order. Under ZeRO-3 every rank must call this with the same number of batches.
    """
    n = len(sequences)
    out = torch.empty(n, dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            ids, mask = right_pad([sequences[i] for i in idx], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out[idx] = logits[:, 0].float().cpu()
    finally:
        model.train(was_training)
    return out


def score_responses(
    model, tokenizer, prompts: list[Messages], responses: list[list[int]], device, batch_size: int = 64
) -> torch.Tensor:
    """Reward-model scores of sampled responses, (N,): each rendered with its prompt as in reward training."""
    seqs = [render_response(tokenizer, p, r) for p, r in zip(prompts, responses)]
    return score_sequences(model, seqs, tokenizer.pad_token_id, device, batch_size)
