"""Load tokenizers and models the same way in every stage, and check them before training."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

from rlhf.config import ModelConfig, PeftConfig, Precision
from rlhf.errors import HandoffError

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def default_device():
    """The first CUDA device when there is one, else the CPU (single-process tools: eval, generate, label)."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def release_device_memory() -> None:
    """Give the GPU memory of models this process no longer holds back to the device. A run
    process (`rlhf rounds`) samples and scores in itself and then launches training stages as
    other processes: without this, PyTorch's caching allocator would keep that memory reserved
    here for the rest of the run, out of the stages' reach."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:  # cuBLAS keeps its workspaces in the cache, out of empty_cache()'s reach
            clear()
        torch.cuda.empty_cache()


def _require_dir(path: str, what: str) -> str:
    """The local directory to load from: `path` itself, or the cached snapshot of a hub id
    (`rlhf.hub`); a typo fails here with a clear message instead of a hub connection error."""
    from rlhf.hub import local_dir

    return local_dir(str(path), what)


def require_chat_template(tok, path: str) -> None:
    if not tok.chat_template:
        raise HandoffError(
            f"the data is conversational (messages), but the tokenizer at {path!r} has no chat "
            "template; add one to tokenizer_config.json or use prompt/completion strings"
        )


def load_tokenizer(path: str, *, needs_chat_template: bool = False):
    """Load a tokenizer and check what training needs: eos, pad (defaulting to eos), template."""
    from transformers import AutoTokenizer

    path = _require_dir(path, "tokenizer")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token is None:
        raise HandoffError(f"tokenizer at {path!r} has no eos token; generation could never stop")
    if tok.pad_token is None:
        log.warning("tokenizer at %s has no pad token; using its eos token %r for padding", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    if needs_chat_template:
        require_chat_template(tok, path)
    return tok


def tokenizer_signature(tok) -> dict[str, Any]:
    """What must match between models that exchange token ids (policy, reference, reward, critic)."""
    return {
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "bos_token": tok.bos_token,
        "chat_template": tok.chat_template,
        "vocab_sha256": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
    }


ModelKind = Literal["causal-lm", "scorer"]


def adapter_base(path: str | Path) -> str | None:
    """The base model directory of a LoRA adapter directory, or None for a full model."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    manifest = Path(path) / "rlhf_manifest.json"
    if manifest.is_file():  # the stage recorded its base; prefer it (the adapter may hold a relative path)
        base = (json.loads(manifest.read_text()).get("peft") or {}).get("base") or base
    if not base or not Path(base).is_dir():
        raise HandoffError(f"the adapter at {path} needs its base model {base!r}, which is not a local directory")
    return base


def load_model(
    path: str | Path,
    kind: ModelKind,
    precision: Precision = "fp32",
    *,
    model: ModelConfig | None = None,
    lora: PeftConfig | None = None,
    zero_stage: int = 0,
    device=None,
    **hf_kwargs: Any,
):
    """The one way every stage and tool loads a model: a causal LM or a 1-label scorer (reward model,
    critic) from a local HF directory, or from an adapter directory: a mergeable adapter (LoRA and
    its relatives) is merged into its base; one that cannot merge (prompt or prefix tuning) comes
    back as a peft model for inference.

    `model` adds the recipe's loading options (attention kernel, remote code), `lora` its QLoRA
    quantisation (`zero_stage` sets its storage dtype); `hf_kwargs` go to `from_pretrained` (e.g.
    pad_token_id for a new scorer head).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf.adapters import is_mergeable, quantization_config, saved_adapter_type

    path = _require_dir(str(path), "model")
    if adapter_base(path):
        if not is_mergeable(saved_adapter_type(path)):
            return _unmerged_adapter(path, kind, precision, model=model, device=device, **hf_kwargs)
        return merge_adapter(path, kind, precision, model=model, device=device, **hf_kwargs)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, TORCH_DTYPES[precision])}
    if kind == "scorer":
        kwargs["num_labels"] = 1
    if model is not None:
        kwargs["trust_remote_code"] = model.trust_remote_code
        if model.attn_implementation:
            # 'auto' loads with sdpa; the stage switches once it knows its compute dtype and device
            # (rlhf.autocast.attention_kernel)
            kwargs["attn_implementation"] = "sdpa" if model.attn_implementation == "auto" else model.attn_implementation
    quant = quantization_config(lora, precision, zero_stage) if lora is not None else None
    if quant is not None:
        kwargs["quantization_config"] = quant
    cls = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    m = cls.from_pretrained(path, **{**kwargs, **hf_kwargs})
    if quant is not None and zero_stage == 3:
        # prepare_model_for_kbit_training casts every non-4-bit weight to fp32; ZeRO-3 shards
        # parameters of one dtype (the 4-bit storage dtype), so only let gradients reach the inputs.
        m.enable_input_require_grads()
    elif quant is not None:
        from peft import prepare_model_for_kbit_training

        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=bool(model and model.gradient_checkpointing))
    return m.to(device) if device is not None else m


def merge_adapter(
    adapter_dir: str | Path,
    kind: ModelKind,
    precision: Precision = "fp32",
    *,
    model: ModelConfig | None = None,
    device=None,
    **hf_kwargs: Any,
):
    """The one LoRA merge from disk: the unquantised base (merging into a 4-bit base would bake its
    quantisation error into the export) + the adapter in `adapter_dir` -> plain weights."""
    from peft import PeftModel

    base = load_model(adapter_base(adapter_dir), kind, precision, model=model, **hf_kwargs)
    merged = merged_weights(PeftModel.from_pretrained(base, str(adapter_dir)))
    return merged.to(device) if device is not None else merged


def _unmerged_adapter(adapter_dir, kind: ModelKind, precision: Precision, *, model=None, device=None, **hf_kwargs):
    """Base + an adapter that cannot be folded into weights (prompt / prefix tuning), for inference."""
    from peft import PeftModel

    base = load_model(adapter_base(adapter_dir), kind, precision, model=model, **hf_kwargs)
    wrapped = PeftModel.from_pretrained(base, str(adapter_dir))
    return wrapped.to(device) if device is not None else wrapped


def merged_weights(peft_model):
    """A PeftModel's adapters folded into its base weights (in memory); returns the plain model."""
    return peft_model.merge_and_unload()
