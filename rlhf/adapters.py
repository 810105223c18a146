"""Parameter-efficient methods: the recipe's `peft` section -> a peft config, the QLoRA base's
quantization, and inference on adapters that cannot be merged.

peft owns every method (we never re-implement an adapter); this module only maps our one recipe
section onto peft's per-method config classes, so stages say `adapter_config(recipe.peft, task)`
and never branch on the method themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.config import PeftConfig, Precision
from rlhf.errors import ConfigError

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")

# peft's names for the adapter types a saved adapter_config.json records, for the messages.
NOT_MERGEABLE_PEFT_TYPES = (
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "CPT",
    "ADAPTION_PROMPT",
)


def _lora(peft: PeftConfig, task_type: str, modules_to_save: list[str] | None, **extra: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=peft.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
        **extra,
    )


def _lycoris(cls_name: str):
    """LoHa and LoKr share LyCORIS's fields; dropout is their module dropout (whole adapters
    switched off per step), the closest analogue of LoRA's input dropout."""

    def build(peft: PeftConfig, task_type: str, modules_to_save: list[str] | None):
        import peft as peft_lib

        cls = getattr(peft_lib, cls_name)
        return cls(
            r=peft.r,
            alpha=peft.alpha,
            module_dropout=peft.dropout,
            target_modules=peft.target_modules,
            task_type=task_type,
            modules_to_save=modules_to_save,
        )

    return build


def _ia3(peft: PeftConfig, task_type: str, modules_to_save: list[str] | None):
    from peft import IA3Config

    # 'all-linear' would scale every projection's output; IA3's paper scales keys, values and the
    # feed-forward input, which peft's per-architecture defaults encode (target_modules=None).
    default = peft.target_modules == "all-linear"
    if not default and peft.feedforward_modules is None:
        raise ConfigError(
            "peft.method=ia3 with explicit peft.target_modules needs peft.feedforward_modules "
            "(which of them are feed-forward layers, e.g. [down_proj])"
        )
    return IA3Config(
        target_modules=None if default else peft.target_modules,
        feedforward_modules=None if default else peft.feedforward_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _prompt_tuning(peft: PeftConfig, task_type: str, modules_to_save: list[str] | None, tokenizer_path: str):
    from peft import PromptTuningConfig

    text = peft.prompt_init_text
    return PromptTuningConfig(
        num_virtual_tokens=peft.num_virtual_tokens,
        prompt_tuning_init="TEXT" if text else "SAMPLE_VOCAB",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer_path if text else None,
        task_type=task_type,
    )


def _prefix_tuning(peft: PeftConfig, task_type: str, modules_to_save: list[str] | None):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=peft.num_virtual_tokens, task_type=task_type)


BUILDERS = {
    "lora": _lora,
    "qlora": _lora,  # QLoRA is LoRA; the difference is the quantized base (`quantization_config`)
    "dora": lambda p, t, m: _lora(p, t, m, use_dora=True),
    "loha": _lycoris("LoHaConfig"),
    "lokr": _lycoris("LoKrConfig"),
    "ia3": _ia3,
    "prefix_tuning": _prefix_tuning,
}
"""Method name -> builder(peft, task_type, modules_to_save) of peft's config (prompt tuning apart:
it may need the tokenizer's path)."""


def adapter_config(
    peft: PeftConfig, task_type: str, modules_to_save: list[str] | None = None, tokenizer_path: str | None = None
):
    """peft's config for the recipe's method, or None when peft is off. `task_type` is CAUSAL_LM
    (policies) or SEQ_CLS (scorers; peft then trains and saves the score head in full)."""
    if not peft.enabled:
        return None
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if peft.method == "prompt_tuning":
        return _prompt_tuning(peft, task_type, modules_to_save, tokenizer_path or "")
    return BUILDERS[peft.method](peft, task_type, modules_to_save)


def quantization_config(peft: PeftConfig, precision: Precision = "fp32", zero_stage: int = 0):
    """BitsAndBytes config of the QLoRA base (None when the base is not quantized).

    The compute dtype is the recipe's precision. Under ZeRO-3 the 4-bit weights are stored in that
    dtype too (`bnb_4bit_quant_storage`), as PEFT's DeepSpeed guide requires: ZeRO-3 shards and
    gathers parameters of one floating dtype, and uint8 storage would not be sharded.
    """
    bits = peft.quant_bits
    if bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    require_bitsandbytes(bits)
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision])
    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if zero_stage == 3 else torch.uint8,
    )


def require_bitsandbytes(bits: str) -> None:
    """A clear error when bitsandbytes is missing or too old for this machine. Since 0.48 it has a
    CPU backend (4-bit NF4 and LLM.int8()), so QLoRA also trains without a GPU, slowly."""
    from importlib import metadata

    try:
        version = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"peft.method=qlora ({bits} base) needs the bitsandbytes package: pip install -e '.[qlora]'"
        ) from None
    import torch

    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if not torch.cuda.is_available() and major_minor < (0, 48):
        raise ConfigError(
            f"peft.method=qlora without a GPU needs bitsandbytes >= 0.48 (its CPU backend); "
            f"{version} is installed: pip install -U bitsandbytes"
        )


def saved_adapter_type(path: str | Path) -> str | None:
    """peft's type of the adapter saved in `path` ('LORA', 'PROMPT_TUNING', ...), None if none."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return str(json.loads(cfg.read_text()).get("peft_type") or "LORA")


def is_mergeable(peft_type: str | None) -> bool:
    return peft_type not in NOT_MERGEABLE_PEFT_TYPES


def _peft_type(model) -> str | None:
    cfg = getattr(model, "active_peft_config", None)
    return None if cfg is None else str(getattr(cfg.peft_type, "value", cfg.peft_type))


def is_prompt_tuned(model) -> bool:
    """Whether `model` is a peft model whose adapter is learned input embeddings (prompt tuning)."""
    return _peft_type(model) in ("PROMPT_TUNING", "P_TUNING")


def prompt_tuned_inputs(model, input_ids, attention_mask):
    """The base model's inputs for a prompt-tuned model: the learned embeddings put before the
    token embeddings, their mask positions on. (B, T) ids -> (B, n + T, H) embeddings, (B, n + T) mask.

    Why not peft's own forward and generate: peft drops `position_ids` for prompt tuning, so a
    left-padded row would put its padding between the learned tokens and the text; and with
    transformers 5 its generate re-inserts the learned tokens at every decoding step (it looks for
    the cache under a name transformers no longer uses). Feeding the base model these embeddings,
    with positions from this mask, gives the positions training used (learned tokens, then the
    text) in both sampling and scoring.
    """
    import torch

    embeds = model.get_base_model().get_input_embeddings()(input_ids)
    learned = model.get_prompt(batch_size=input_ids.shape[0]).to(embeds.dtype)
    on = torch.ones(input_ids.shape[0], learned.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([learned, embeds], 1), torch.cat([on, attention_mask], 1)


def generation_inputs(model, prompt_ids, prompt_mask):
    """(what to call `generate` on, its inputs, where the new tokens start in its output).

    A plain or LoRA-style model generates from its ids. A prompt-tuned one generates from
    `prompt_tuned_inputs`. A prefix-tuned one gets its learned keys and values as a prefilled cache:
    peft 0.21's own generate ignores the prefix under transformers 5 (measured: the sampled tokens'
    log-probs equal the base model's), so we hand the cache to the base model ourselves. `n`
    placeholder ids stand for the cached positions (generate reads only ids past the cache), and the
    mask and positions then count the prefix first, as peft's forward does in training.
    """
    import torch

    kind = _peft_type(model)
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        embeds, mask = prompt_tuned_inputs(model, prompt_ids, prompt_mask)
        return model.get_base_model(), {"inputs_embeds": embeds, "attention_mask": mask}, 0
    if kind == "PREFIX_TUNING":
        b, n = prompt_ids.shape[0], model.active_peft_config.num_virtual_tokens
        placeholder = prompt_ids.new_zeros(b, n)
        on = prompt_mask.new_ones(b, n)
        inputs = {
            "input_ids": torch.cat([placeholder, prompt_ids], 1),
            "attention_mask": torch.cat([on, prompt_mask], 1),
            "past_key_values": model.get_prompt(batch_size=b),
        }
        return model.get_base_model(), inputs, n + prompt_ids.shape[1]
    return model, {"input_ids": prompt_ids, "attention_mask": prompt_mask}, prompt_ids.shape[1]


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model, adapters included. peft's own count where it
    applies: it counts a 4-bit base's packed weights (two per stored byte) as the weights they are."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
