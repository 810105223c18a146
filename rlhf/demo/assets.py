"""Build the demo's tokenizer, tiny base model and task data locally and deterministically.

No model hub is reachable here, so the demo starts from a model we make: a byte-level BPE
tokenizer trained on the task's corpus (with a chat template and special tokens) and a small
Llama-style network with random weights. Building takes a few seconds; it is done once per
directory (a file lock makes concurrent ranks wait for the first one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf.demo import task

ASSETS_VERSION = 2
MARKER = "ASSETS.json"

# The template marks assistant turns with {% generation %} so TRL can mask everything else out
# of the SFT loss; the end-of-turn token is inside the mark, so the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]

# ~0.9M parameters: big enough to learn the task's grammar, small enough for a 2-core CPU.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(task.corpus(seed), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        model_max_length=TINY_LLAMA["max_position_embeddings"],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_base_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_LLAMA,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=32
    )
    return model


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def assets_ready(out_dir: str | Path) -> bool:
    marker = Path(out_dir) / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("version") == ASSETS_VERSION


def build_demo_assets(out_dir: str | Path, seed: int = 0) -> Path:
    """Write `base/` (tokenizer + random-init model) and `data/*.jsonl` into `out_dir`.

    Returns `out_dir`. Idempotent; built in a temporary directory and renamed, so an interrupted
    build never leaves a half-written directory that looks complete.
    """
    from filelock import FileLock

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if assets_ready(out):
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        tokenizer = build_tokenizer(seed)
        model = build_base_model(tokenizer, seed)
        model.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
        train_prompts, heldout_prompts = task.split_prompts()
        _write_jsonl(tmp / "data" / "sft.jsonl", task.make_sft_rows(seed))
        prefs = task.make_preference_rows(seed)
        _write_jsonl(tmp / "data" / "preferences.jsonl", prefs)
        _write_jsonl(tmp / "data" / "preferences_distinct.jsonl", task.distinct_preference_rows(prefs))
        _write_jsonl(tmp / "data" / "prompts.jsonl", [{"prompt": p} for p in train_prompts])
        _write_jsonl(tmp / "data" / "heldout_prompts.jsonl", [{"prompt": p} for p in heldout_prompts])
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / MARKER).write_text(
            json.dumps(
                {"version": ASSETS_VERSION, "seed": seed, "parameters": n_params, "vocab_size": len(tokenizer)},
                indent=2,
            )
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
