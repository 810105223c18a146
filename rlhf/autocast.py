"""bf16 autocast for every stage: where the hardware has it, how to turn it on, and around what.

One home for the `autocast: none | bf16 | auto` setting that the PPO family (`model.autocast`), the
HF-Trainer stages (SFT, reward, DPO: `model.autocast`) and the evaluation (`generation_autocast`)
share. Weights and optimizer states stay in `train.precision` (fp32 by default): autocast only
runs the matrix products in bf16, which is what makes a CPU with avx512_bf16/AMX (or an Ampere+
GPU) about 1.6x faster per forward pass, and what keeps the first PPO ratio at 1 (rollout and
update compute the same way).

Why not `train.precision: bf16` for the HF stages: under DeepSpeed that stores the weights in bf16
(with fp32 master copies in the optimizer), a different recipe from the fp32 run, and HF's
Trainer only autocasts when DeepSpeed is off. Patching the module's `forward` works the same with
and without DeepSpeed, in training and in evaluation, as accelerate does for its mixed precision.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import MethodType

import torch
from torch import nn

log = logging.getLogger("rlhf")

# Modules a scalar-head model (HF `*ForSequenceClassification`) keeps its head under.
SCALAR_HEADS = ("score", "classifier")


def native_bf16(device: torch.device, cpuinfo: str | None = None) -> bool:
    """Whether `device` computes bf16 in hardware: an Ampere+ GPU, or a CPU whose flags list
    avx512_bf16 or amx_bf16 (x86) or bf16 (Arm). Elsewhere torch emulates bf16, far slower than
    fp32. `cpuinfo` is the text of /proc/cpuinfo (read when None; absent off Linux: no)."""
    if device.type == "cuda":  # without including_emulation=False, pre-Ampere GPUs answer True
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.lower().startswith(("flags", "features")) for f in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_autocast(setting: str, device: torch.device, key: str = "model.autocast") -> bool:
    """An `autocast` setting -> whether forward passes run under bf16 autocast ('auto': where the
    device has native bf16; the log says which it chose, naming `key`)."""
    if setting != "auto":
        return setting == "bf16"
    on = native_bf16(device)
    log.info("%s=auto: %s on %s", key, "bf16" if on else "off (no native bf16)", device.type)
    return on


def context(on: bool, device: torch.device):
    """bf16 autocast on `device` when `on`, else nothing."""
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def autocast_forward(module: nn.Module, device: torch.device) -> nn.Module:
    """Run every call of `module` under bf16 autocast, by wrapping its `forward` (in place; returns
    it). Scalar heads (`score`, `classifier`) inside it keep computing in fp32, see `fp32_forward`.
    Idempotent: a module already wrapped is left as it is."""
    if is_wrapped(module):
        return module
    for name, sub in module.named_modules():
        if name.rsplit(".", 1)[-1] in SCALAR_HEADS and not _inside_head(name):
            fp32_forward(sub, device)
    _rebind(module, _forward_under_autocast, device)
    return module


def is_wrapped(module: nn.Module) -> bool:
    """Whether `autocast_forward` wrapped this module (for the manifest: what `auto` chose)."""
    return getattr(module.forward, "__func__", None) is _forward_under_autocast


def fp32_forward(module: nn.Module, device: torch.device) -> nn.Module:
    """Run `module` outside autocast, in its weights' own precision (fp32 in the CPU recipes). For a
    reward model's scalar head: a bf16 score keeps 8 bits of mantissa (steps of 0.03 at a score of
    5), too coarse for the chosen-minus-rejected margins the loss and the accuracy are made of; the
    head is one small matrix, so fp32 there costs nothing measurable. With bf16 or fp16 weights
    (`train.precision`) the input is cast to theirs, the head then computing as it is stored."""
    _rebind(module, _forward_in_weight_dtype, device)
    return module


def _rebind(module: nn.Module, wrapper, device: torch.device) -> None:
    """Make `wrapper` the module's forward, as a method bound to the module (so a deepcopy or a
    pickle of the module carries a wrapper of the copy, not of the original), keeping the forward
    it wraps in `_rlhf_inner_forward` (accelerate keeps its mixed-precision forward the same way)."""
    module._rlhf_inner_forward = module.forward
    module._rlhf_autocast_device = device.type
    module.forward = MethodType(wrapper, module)  # an instance attribute: nn.Module.__call__ finds it first


def _forward_under_autocast(self, *args, **kwargs):
    with torch.autocast(device_type=self._rlhf_autocast_device, dtype=torch.bfloat16):
        return self._rlhf_inner_forward(*args, **kwargs)


def _forward_in_weight_dtype(self, x, *args, **kwargs):
    dtype = next((p.dtype for p in self.parameters() if torch.is_floating_point(p)), torch.float32)
    with torch.autocast(device_type=self._rlhf_autocast_device, enabled=False):
        return self._rlhf_inner_forward(x.to(dtype) if torch.is_floating_point(x) else x, *args, **kwargs)


def _inside_head(name: str) -> bool:
    """Whether a module path lies below a scalar head (PEFT keeps copies of a trained head inside
    its wrapper: `score.modules_to_save.default`, `score.original_module`); only the outermost is
    wrapped, which covers them."""
    return any(part in SCALAR_HEADS for part in name.split(".")[:-1])


# Longest sequence (tokens) for which `attn_implementation: auto` picks eager attention on a CPU in
# bf16. scripts/bench_attention.py, SmolLM2-135M under LoRA, batch 8, forward + backward, on a
# 2-core avx512_bf16 CPU: eager / sdpa 0.88-0.90 at 128 tokens, 0.96 at 224, 0.99 at 320, 1.04 at
# 512 (eager materialises the T x T scores; torch's CPU flash kernel, which sdpa runs, has a slow
# bf16 backward pass, which only dominates at short lengths). In fp32 sdpa wins at every length.
EAGER_MAX_TOKENS = 256


def attention_kernel(setting: str | None, device: torch.device, bf16: bool, max_tokens: int) -> str | None:
    """A recipe's `attn_implementation` -> the kernel to run. 'auto': eager for bf16 compute on a
    CPU with sequences of at most EAGER_MAX_TOKENS, sdpa everywhere else (GPUs, fp32, long rows).
    Any other value (or None: transformers' own default) is kept as the recipe gives it."""
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" and bf16 and max_tokens <= EAGER_MAX_TOKENS else "sdpa"


def use_attention(module: nn.Module, kernel: str | None) -> None:
    """Switch every transformers model inside `module` (through PEFT wrappers, value wrappers,
    DeepSpeed engines) to attention `kernel`, in place. transformers reads the kernel from the
    config at each forward pass, so this works after loading and after engine construction."""
    if kernel is None:
        return
    from transformers import PreTrainedModel

    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and sub.config._attn_implementation != kernel:
            sub.set_attn_implementation(kernel)


def attention_of(module: nn.Module) -> str | None:
    """The attention kernel the first transformers model inside `module` runs (for manifests)."""
    from transformers import PreTrainedModel

    return next((sub.config._attn_implementation for sub in module.modules() if isinstance(sub, PreTrainedModel)), None)


def store_frozen_in_bf16(module: nn.Module) -> int:
    """Store the frozen weights (and biases) of `module`'s linear layers in bf16, in place; returns
    how many layers changed. For modules that run only under bf16 autocast: autocast casts an fp32
    weight to bf16 at every call, and caches the cast only for weights that require grad, so a
    frozen weight (a LoRA base, a reference, a reward model) was cast again for every forward pass
    and every generated token. Stored in bf16 it computes bit for bit the same (the same cast, made
    once) in half the memory. Tied weights (an lm_head sharing the embedding matrix) are left as
    they are, because the embedding lookup is not autocast. A forward pass outside autocast then
    fails on the dtype instead of computing differently."""
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    changed = 0
    for sub in module.modules():
        if type(sub) is not nn.Linear:
            continue
        params = [p for p in (sub.weight, sub.bias) if p is not None]
        if any(p.requires_grad or p.dtype != torch.float32 or uses.get(id(p), 0) > 1 for p in params):
            continue
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        changed += 1
    return changed
