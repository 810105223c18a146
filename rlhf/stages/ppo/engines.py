"""The four PPO models and the DeepSpeed engines around them (fewer for critic-free estimators,
for a critic that is a head on the actor (`value_head`), and for rewards from functions alone).

actor (SFT weights, trained) and critic (reward-model weights, trained) are DeepSpeed training
engines; the reference (SFT) and the reward model are frozen and inference-only: partitioned
ZeRO-3 engines when the recipe shards (so a 70B reference never sits whole on one GPU), plain
modules otherwise. Every engine config comes from the one builder in `rlhf.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlhf import autocast, distributed
from rlhf.config_rl import PPORecipe
from rlhf.distributed import build_deepspeed_config, world_size
from rlhf.models import load_model, merged_weights
from rlhf.stages.ppo import value_head

if TYPE_CHECKING:  # annotations only: importing deepspeed or transformers here would slow `import rlhf`
    from deepspeed import DeepSpeedEngine
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("rlhf")


class TokenValues(nn.Module):
    """Per-token values from a sequence-classification model: its backbone's hidden states through
    its scalar head at every position (the head the reward model trained, when initialised from it).
    """

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, T) ids -> (B, T) values."""
        # Under LoRA the adapters sit inside the wrapped model's layers, so its backbone uses them.
        inner = self.scorer.get_base_model() if hasattr(self.scorer, "get_base_model") else self.scorer
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


@dataclass
class Models:
    """The four models of one RL run on this rank."""

    actor: DeepSpeedEngine  # training engine around the policy (a PeftModel under LoRA)
    # training engine around TokenValues (per-token values); None if critic-free or shared (below)
    critic: DeepSpeedEngine | None
    reference: PreTrainedModel | None  # frozen SFT policy; None under LoRA (the adapter-disabled actor)
    reward: PreTrainedModel | None  # frozen scalar-head reward model; None when rewards come from functions only
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    autocast: bool  # forward passes under bf16 autocast (recipe.model.autocast)
    shared_critic: bool = False  # values come from a head on the actor's trunk (ppo.critic_trunk=shared)
    frozen_bf16: bool = False  # frozen linear weights stored in bf16 (autocast.store_frozen_in_bf16)

    @property
    def has_values(self) -> bool:
        """Whether the run has a critic at all: its own model, or a head on the actor."""
        return self.critic is not None or self.shared_critic


def device_of_rank() -> torch.device:
    """This rank's device: its GPU, or the CPU."""
    return torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def compute(m: Models):
    """Context for every forward pass of the run: bf16 autocast when the recipe asks, else nothing.
    Rollout and update both enter it, so they compute log-probs the same way."""
    return autocast.context(m.autocast, m.device)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout to 0: nn.Dropout modules (LoRA's included), the float rates that attention
    implementations read from their module (e.g. Llama's `attention_dropout`), and the per-adapter
    rates LoHa / LoKr keep in dicts (`module_dropout`, `rank_dropout`: whole adapters skipped at
    random in training mode, which would break ratio 1 between rollout and update)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" not in name:
                continue
            if isinstance(value, float):
                setattr(module, name, 0.0)
            elif isinstance(value, dict) and all(isinstance(v, float) for v in value.values()):
                setattr(module, name, dict.fromkeys(value, 0.0))
    return model


def load_policy(path: str, recipe: PPORecipe) -> PreTrainedModel:
    model = load_model(path, "causal-lm", recipe.train.precision, model=recipe.model)
    return _prepared(model, recipe)


def load_scorer(path: str, recipe: PPORecipe, pad_token_id: int) -> PreTrainedModel:
    from transformers import set_seed

    set_seed(recipe.train.seed)  # a critic from SFT gets a fresh head: seeded, so runs repeat
    model = load_model(path, "scorer", recipe.train.precision, model=recipe.model, pad_token_id=pad_token_id)
    return _prepared(model, recipe)


def _prepared(model: PreTrainedModel, recipe: PPORecipe) -> PreTrainedModel:
    if recipe.model.disable_dropout:
        disable_dropout(model)
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_lora(model: nn.Module, recipe: PPORecipe, task_type: str) -> nn.Module:
    """Wrap in the recipe's adapters (LoRA or a mergeable relative) when it asks; a scorer's head is
    trained in full and saved."""
    if not recipe.peft.enabled:
        return model
    from peft import get_peft_model

    from rlhf.adapters import adapter_config

    wrapped = get_peft_model(
        model, adapter_config(recipe.peft, task_type, ["score"] if task_type == "SEQ_CLS" else None)
    )
    return disable_dropout(wrapped) if recipe.model.disable_dropout else wrapped


def build_models(recipe: PPORecipe, tokenizer) -> Models:
    """Load the four models and wrap the trainable ones in DeepSpeed engines."""
    import deepspeed

    distributed.ensure_process_group_env()
    deepspeed.init_distributed(dist_backend=None)
    device = device_of_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    pad = tokenizer.pad_token_id
    policy = with_lora(load_policy(recipe.sft_dir, recipe), recipe, "CAUSAL_LM")
    shared = recipe.ppo.shared_critic
    head = value_head.attach(policy) if shared else None  # after LoRA wrapping: trained in full
    actor = training_engine(
        policy, recipe, recipe.train.learning_rate, head=head, head_learning_rate=recipe.ppo.critic_learning_rate
    )
    critic = None  # critic-free estimators (GRPO, RLOO, REINFORCE++) hold no value model at all
    if recipe.ppo.separate_critic:
        critic_src = recipe.reward_dir if recipe.ppo.critic_init == "reward" else recipe.sft_dir
        scorer = with_lora(load_scorer(critic_src, recipe, pad), recipe, "SEQ_CLS")
        critic = training_engine(TokenValues(scorer), recipe, recipe.ppo.critic_learning_rate)
    # With LoRA the reference is the actor with its adapter disabled: no second copy of the policy.
    reference = None if recipe.peft.enabled else inference_model(load_policy(recipe.sft_dir, recipe), recipe, device)
    reward = None  # rewards from functions alone need no reward model
    if recipe.reward_dir is not None:
        reward = inference_model(load_scorer(recipe.reward_dir, recipe, pad), recipe, device)
    bf16 = autocast.resolve_autocast(recipe.model.autocast, device)
    longest = recipe.prompts.max_length + recipe.generation.max_new_tokens
    kernel = autocast.attention_kernel(
        recipe.model.attn_implementation, device, bf16 or recipe.train.precision == "bf16", longest
    )
    # Every forward pass of the run is under autocast when bf16 is on, so frozen weights can be
    # stored as autocast would cast them (not under ZeRO-3: it partitions parameters of one dtype).
    frozen_bf16 = bf16 and recipe.model.frozen_bf16 and recipe.deepspeed.zero_stage < 3
    for model in (actor.module, critic.module if critic is not None else None, reference, reward):
        if model is not None:  # all four alike: rollout, reference and update compute the same way
            autocast.use_attention(model, kernel)
            if frozen_bf16:
                autocast.store_frozen_in_bf16(model)
    return Models(
        actor, critic, reference, reward, tokenizer, device, bf16, shared_critic=shared, frozen_bf16=frozen_bf16
    )


@contextlib.contextmanager
def as_reference(actor_module: nn.Module, reference: nn.Module | None):
    """Yield the reference policy: the frozen copy, or without one (LoRA) the actor with its
    adapters disabled for the duration."""
    if reference is not None:
        yield reference
    else:
        with actor_module.disable_adapter():
            yield actor_module


def export_policy(engine, recipe: PPORecipe, out) -> dict[str, Any] | None:
    """Collective (every rank calls it): write the trained actor to `out` as a HF directory, ZeRO-3
    shards gathered. Returns the manifest's peft record (None for a full fine-tune)."""
    from rlhf.distributed import is_main

    if not recipe.peft.enabled:
        state = value_head.without_value_head(full_state_dict(engine, recipe.deepspeed.zero_stage))
        if is_main():
            engine.module.save_pretrained(out, state_dict=state)
        return None
    return _export_lora(engine, recipe, out)


def _export_lora(engine, recipe: PPORecipe, out) -> dict[str, Any]:
    """Gather the actor's adapter (ZeRO-3 too) and write it; on the main rank merge it into the SFT
    weights with the one merge every stage uses (adapter kept in `out/adapter`), or keep it alone."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from rlhf.distributed import is_main

    trained = [p for p in engine.module.parameters() if p.requires_grad]  # only the adapter is gathered
    with gathered(engine, recipe.deepspeed.zero_stage, params=trained):
        adapter = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(engine.module).items()}
    info = {"type": recipe.peft.kind, "merged": recipe.peft.merge_on_export, "base": str(recipe.sft_dir)}
    if is_main():
        base = load_model(recipe.sft_dir, "causal-lm", recipe.train.precision, model=recipe.model)
        model = with_lora(base, recipe, "CAUSAL_LM")
        set_peft_model_state_dict(model, adapter)
        target = Path(out) / "adapter" if recipe.peft.merge_on_export else Path(out)
        model.save_pretrained(target)
        if recipe.peft.merge_on_export:
            merged_weights(model).save_pretrained(out)
            info["adapter"] = str(target)
    return info


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has one (CPU and CUDA since torch 2.4): one
    kernel for all tensors instead of a Python loop over them, 5x faster per step on a tiny model."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # e.g. a device without a fused implementation
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def training_engine(
    model: nn.Module,
    recipe: PPORecipe,
    learning_rate: float,
    head: nn.Module | None = None,
    head_learning_rate: float | None = None,
):
    """deepspeed.initialize with AdamW and the recipe's schedule over train.max_steps PPO steps.
    `head` (a submodule of `model`: the shared value head) gets a parameter group of its own at
    `head_learning_rate`; the schedule scales both groups alike."""
    import deepspeed
    from transformers import get_scheduler

    train = replace(recipe.train, learning_rate=learning_rate)
    offload = recipe.deepspeed.offload_optimizer
    config = build_deepspeed_config(
        recipe.deepspeed,
        train,
        world_size(),
        optimizer={"lr": learning_rate, "weight_decay": train.weight_decay} if offload else None,
    )
    config["zero_allow_untested_optimizer"] = True
    params: list = [p for p in model.parameters() if p.requires_grad]
    if head is not None:
        own = {id(p) for p in head.parameters()}
        params = [
            {"params": [p for p in params if id(p) not in own]},
            {"params": list(head.parameters()), "lr": head_learning_rate},
        ]
    optimizer = None if offload else _adamw(params, learning_rate, train.weight_decay)
    # Scheduler steps once per optimizer step: PPO epochs x mini-batches per PPO step.
    minis = recipe.ppo.rollout_batch_size // (train.micro_batch_size * train.gradient_accumulation_steps)
    total = recipe.train.max_steps * recipe.ppo.ppo_epochs * minis
    warmup = int(train.warmup_ratio * total)

    def scheduler(opt):
        return get_scheduler(train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=config
    )
    if skips_gradient_allreduce(
        engine.dp_world_size,
        engine.zero_optimization_stage(),
        engine.fp16_enabled() or engine.bfloat16_enabled(),
        engine.communication_data_type,
        engine.has_moe_layers,
    ):
        # One process at ZeRO-0 in fp32 has nothing to reduce, yet DeepSpeed's fallback all-reduce
        # still flattens every gradient into one buffer and copies it back at each accumulation
        # boundary: 0.17 s per backward of a 21M-parameter model on 2 CPU cores (scripts/bench_ppo.py
        # --shape mid), for the same weights bit for bit (tests/test_ppo_recipe.py checks it). Read
        # from the engine, so that a deepspeed.config_file that changes the stage or precision counts.
        engine.enable_backward_allreduce = False
    return engine


def skips_gradient_allreduce(world: int, zero_stage: int, low_precision: bool, comm_dtype, moe: bool) -> bool:
    """Whether a training engine may skip DeepSpeed's gradient all-reduce, as DeepSpeed's engine
    reports itself: one data-parallel process, ZeRO-0 (ZeRO stages reduce through their
    optimizer), fp32 weights and fp32 communication (no cast on the way), no MoE expert groups.
    One more condition holds for our models and is assumed: every trainable parameter gets a
    gradient in every backward (DeepSpeed's reduction turns a missing one into zeros, which AdamW
    would then decay; without it AdamW skips that parameter)."""
    return world == 1 and zero_stage == 0 and not low_precision and comm_dtype == torch.float32 and not moe


def inference_model(model: nn.Module, recipe: PPORecipe, device: torch.device) -> nn.Module:
    """A frozen model: ZeRO-3 partitioned engine when the recipe shards, else a plain module."""
    model.requires_grad_(False)
    model.eval()
    if recipe.deepspeed.zero_stage != 3:
        return model.to(device)
    import deepspeed

    train = replace(recipe.train, gradient_accumulation_steps=1)
    config = build_deepspeed_config(replace(recipe.deepspeed, offload_optimizer=False), train, world_size())
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.module


def gathered(engine, zero_stage: int, enabled: bool = True, params: list | None = None):
    """Context that materialises full weights once (ZeRO-3) for a whole `generate` call, instead of
    gathering each layer again for every generated token (`enabled=False` keeps the per-layer way).
    `params` limits the gather to those parameters (default: all of the engine's module)."""
    if zero_stage != 3 or not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(
        params if params is not None else list(engine.module.parameters()), modifier_rank=None
    )


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The module's full weights for export (gathered from shards under ZeRO-3); on every rank
    under ZeRO-3 (a collective), returned on the main rank."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
