"""Attention kernels for training, side by side in one run: seconds per forward + backward pass of
a LoRA-wrapped model, per attention kernel (sdpa, eager) and compute dtype (fp32, bf16 autocast).

    .venv/bin/python scripts/bench_attention.py [--model runs/smollm2/model] [--lengths 128 512]
        [--batch 8] [--repeats 5] [--out runs/bench/attention.json]

Why it exists: `attn_implementation: auto` (the default) picks eager attention for bf16 compute on
a CPU and sdpa everywhere else. On the CPUs measured, torch's CPU flash-attention kernel (what sdpa
runs there) has a slow bf16 backward pass; this script shows whether that holds on this machine,
model and shape. Rows alternate kernels within each round so machine noise hits all alike; each
cell is the median over rounds. The batch is random token ids with the first quarter of each row
padded away (left padding, as PPO's rollouts are).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rlhf import autocast
from rlhf.config import PeftConfig
from rlhf.models import load_model


def one_pass(model, ids: torch.Tensor, mask: torch.Tensor, bf16: bool) -> float:
    """Seconds for one forward + backward pass (loss: the mean logit of the last position)."""
    start = time.perf_counter()
    with autocast.context(bf16, torch.device("cpu")):
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    out.logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/smollm2/model")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench/attention.json")
    args = ap.parse_args()
    from peft import get_peft_model

    from rlhf.adapters import adapter_config

    torch.manual_seed(0)
    models = {}
    for kernel in ("sdpa", "eager"):
        base = load_model(args.model, "causal-lm", "fp32", attn_implementation=kernel)
        models[kernel] = get_peft_model(base, adapter_config(PeftConfig(enabled=True), "CAUSAL_LM")).train()
    vocab = models["sdpa"].config.vocab_size
    arms = [(k, bf16) for bf16 in (False, True) for k in models]
    results = []
    for length in args.lengths:
        ids = torch.randint(0, vocab, (args.batch, length))
        mask = torch.ones_like(ids)
        mask[:, : length // 4] = 0
        times: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
        for arm in arms:  # warm-up, not timed
            one_pass(models[arm[0]], ids, mask, arm[1])
        for _ in range(args.repeats):
            for arm in arms:
                times[arm].append(one_pass(models[arm[0]], ids, mask, arm[1]))
        for kernel, bf16 in arms:
            results.append(
                {
                    "length": length,
                    "batch": args.batch,
                    "kernel": kernel,
                    "compute": "bf16 autocast" if bf16 else "fp32",
                    "seconds": statistics.median(times[(kernel, bf16)]),
                    "all_seconds": times[(kernel, bf16)],
                }
            )
    print(f"{'tokens':>12} {'compute':>14} {'sdpa s':>8} {'eager s':>8} {'eager/sdpa':>10}")
    for length in args.lengths:
        for compute in ("fp32", "bf16 autocast"):
            cell = {r["kernel"]: r["seconds"] for r in results if r["length"] == length and r["compute"] == compute}
            shape = f"{args.batch}x{length}"
            print(
                f"{shape:>12} {compute:>14} {cell['sdpa']:8.3f} {cell['eager']:8.3f} "
                f"{cell['eager'] / cell['sdpa']:10.2f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "native_bf16": autocast.native_bf16(torch.device("cpu")),
        "lora": "r16 all-linear",
        "results": results,
    }
    out.write_text(json.dumps(info, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
