"""The critic as a value head on the actor's trunk (ppo.critic_trunk=shared).

A separate critic is a second model of the policy's size: one more forward pass to score each
rollout, and one more forward and backward pass, all-reduce and optimizer step per mini-batch. A
linear head on the actor's last hidden states gives the values from the forward pass the actor
makes anyway, and one backward of (policy loss + value_loss_coef x value loss) trains both (the
layout of the original PPO, and of TRL's early value-head models). Hand-written because TRL's
value-head wrapper is gone from its current releases, and ours must keep the actor an ordinary
causal LM (generation, the adapter-disabled reference, export, undo all use it as one).

The head is a submodule of the actor's module, so the actor's DeepSpeed engine optimises it,
checkpoints it and undoes it with the rest; export leaves it out (`without_value_head`).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.errors import HandoffError
from rlhf.sampling import entropy_from_logits, logprobs_of, response_logits
from rlhf.stages.ppo.undo import base_optimizer

NAME = "value_head"


def attach(policy: nn.Module) -> nn.Linear:
    """Add a zero-initialised (hidden -> 1) head to `policy` (a causal LM or a PeftModel around
    one) as its `value_head` submodule, trainable. Zero weights: the first values are 0, and no
    gradient reaches the trunk through the head until it has learned something."""
    lm_head = policy.get_output_embeddings()  # what the head shares: the LM head's input
    like = lm_head.weight
    head = nn.Linear(lm_head.in_features, 1, dtype=like.dtype, device=like.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    policy.add_module(NAME, head)
    return head


def head_of(policy: nn.Module) -> nn.Module:
    """The value head `attach` added (through a DeepSpeed engine's `.module` too)."""
    module = getattr(policy, "module", policy)
    head = module._modules.get(NAME)
    if head is None:
        raise RuntimeError(f"{type(module).__name__} has no value head (ppo.critic_trunk=shared attaches one)")
    return head


def without_value_head(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A state dict for export: the causal LM's own weights, the value head's left out."""
    if state is None:
        return None
    return {k: v for k, v in state.items() if not (k == NAME or k.startswith(NAME + "."))}


def outputs_with_values(
    policy,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One forward pass of the actor -> log-probs (B, R), entropies (B, R) or None, values (B, R).

    Inputs are (B, P+R) with the response in the last R columns, as for `sampling.policy_outputs`,
    whose log-probs these are exactly. values[:, t] is the head on the last hidden state of the
    position before response token t: the state a separate critic values at the same index.
    """
    logits, hidden = response_logits(
        policy, input_ids, attention_mask, position_ids, response.shape[1], temperature, with_hidden=True
    )
    values = head_of(policy)(hidden).squeeze(-1).float()
    logp = logprobs_of(logits, response)
    return logp, (entropy_from_logits(logits) if with_entropy else None), values


@torch.no_grad()
def reset(engine) -> None:
    """A fresh critic on a carried actor (continue_from.actor without continue_from.critic): the
    head back to zeros, and its optimizer state forgotten. Raises where that state cannot be told
    apart (ZeRO-1/2 and bf16 master weights keep all parameters in flat buffers)."""
    params = list(head_of(engine).parameters())
    opt = base_optimizer(engine)
    own = {id(p) for group in opt.param_groups for p in group["params"]}
    if not all(id(p) in own for p in params) and any(opt.state.values()):
        raise HandoffError(
            "continue_from carried the actor's optimizer state, which holds the shared value head's "
            "inside flat buffers (ZeRO-1/2 or bf16 master weights) that cannot be reset alone: set "
            "continue_from.critic=true (keep the head) or continue_from.optimizer=false"
        )
    for p in params:
        p.zero_()
        opt.state.pop(p, None)
    if hasattr(engine.optimizer, "refresh_fp32_params"):  # master copies follow the module's weights
        engine.optimizer.refresh_fp32_params()
