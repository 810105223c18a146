"""Score token sequences with a scalar-head model (the reward model, later the critic's init).

Shared by the reward stage (validation metrics, reward statistics) and PPO (rollout scoring).
Sequences are sorted by length before batching so padding stays small; the scores come back in
the caller's order.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu",
                    batch_size: int = 64) -> torch.Tensor:
    """Scalar score of each sequence: list of N token-id lists -> (N,) float32 on CPU.

    Right padding with an attention mask: a sequence-classification head reads the last
    non-padding token. Every rank must call this with the same sequences under ZeRO-3, where each
    forward gathers the sharded parameters collectively.
    """
    n = len(sequences)
    out = torch.empty(n, dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(sequences[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out[idx] = logits[:, 0].float().cpu()
    finally:
        model.train(was_training)
    return out
