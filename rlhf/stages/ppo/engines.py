"""The four PPO models and the DeepSpeed engines around them.

actor (SFT weights, trained) and critic (reward-model weights, trained) are DeepSpeed training
engines; the reference (SFT) and the reward model are frozen and inference-only: partitioned
ZeRO-3 engines when the recipe shards (so a 70B reference never sits whole on one GPU), plain
modules otherwise. Every engine config comes from the one builder in `rlhf.distributed`.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rlhf.config import PPORecipe
from rlhf.distributed import build_deepspeed_config, world_size
from rlhf.models import TORCH_DTYPES


class TokenValues(nn.Module):
    """Per-token values from a sequence-classification model: its backbone's hidden states through
    its scalar head at every position (the head the reward model trained, when initialised from it).
    """

    def __init__(self, scorer: nn.Module):
        super().__init__()
        self.scorer = scorer

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, T) ids -> (B, T) values."""
        backbone = getattr(self.scorer, self.scorer.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return self.scorer.score(hidden).squeeze(-1).float()


def _dtype(recipe: PPORecipe):
    return getattr(torch, TORCH_DTYPES[recipe.train.precision])


def load_policy(path: str, recipe: PPORecipe):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _dtype(recipe)}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load_scorer(path: str, recipe: PPORecipe, pad_token_id: int):
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(recipe.train.seed)  # a critic from SFT gets a fresh head: seeded, so runs repeat
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=_dtype(recipe))
    model.config.pad_token_id = pad_token_id
    return model


def training_engine(model: nn.Module, recipe: PPORecipe, learning_rate: float):
    """deepspeed.initialize with AdamW and the recipe's schedule over train.max_steps PPO steps."""
    import deepspeed
    from transformers import get_scheduler

    train = replace(recipe.train, learning_rate=learning_rate)
    offload = recipe.deepspeed.offload_optimizer
    config = build_deepspeed_config(recipe.deepspeed, train, world_size(),
                                    optimizer={"lr": learning_rate, "weight_decay": train.weight_decay} if offload
                                    else None)
    config["zero_allow_untested_optimizer"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if offload else torch.optim.AdamW(params, lr=learning_rate, weight_decay=train.weight_decay)
    # Scheduler steps once per optimizer step: PPO epochs x mini-batches per PPO step.
    minis = recipe.ppo.rollout_batch_size // (train.micro_batch_size * train.gradient_accumulation_steps)
    total = recipe.train.max_steps * recipe.ppo.ppo_epochs * minis
    warmup = int(train.warmup_ratio * total)

    def scheduler(opt):
        return get_scheduler(train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=total)

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                      lr_scheduler=scheduler, config=config)
    return engine


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


def gathered(engine, zero_stage: int):
    """Context that materialises full weights once (ZeRO-3) for a whole `generate` call, instead of
    gathering each layer again for every generated token."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The module's full weights for export (gathered from shards under ZeRO-3); on every rank
    under ZeRO-3 (a collective), returned on the main rank."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
