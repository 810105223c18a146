"""SFT vs PPO (vs any policy directories) on the demo task's held-out prompts, by the ground-truth
scorer that training never sees.

    .venv/bin/python scripts/compare_demo.py runs/demo/sft runs/demo/ppo [--samples 8] [--out runs/demo/compare.json]

Each policy answers every held-out prompt `--samples` times, sampled at temperature 1 (the policy
as trained), with the same seed. Prints mean ground-truth score (0-100) and its parts, response
length, and the KL to the first directory's policy (the SFT reference) estimated on the samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def sample(model, tok, prompts: list[str], n: int, max_new_tokens: int, seed: int) -> list[list[list[int]]]:
    torch.manual_seed(seed)
    out = []
    for p in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        gen = model.generate(
            **ids,
            do_sample=True,
            top_k=None,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tok.pad_token_id,
        )
        resp = []
        for row in gen[:, ids["input_ids"].shape[1] :].tolist():
            cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            resp.append(row[:cut])
        out.append(resp)
    return out


@torch.no_grad()
def sequence_logprob(model, tok, prompt: str, response: list[int]) -> float:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
    x = torch.tensor([ids + response])
    logp = torch.log_softmax(model(x).logits[0, len(ids) - 1 : -1].float(), -1)
    return logp.gather(-1, torch.tensor(response)[:, None]).sum().item()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.demo import task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policies", nargs="+", help="policy directories; the first is the KL reference")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    _, heldout = task.split_prompts()
    ref_dir = args.policies[0]
    ref = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    results = {}
    for path in args.policies:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        responses = sample(model, tok, heldout, args.samples, args.max_new_tokens, args.seed)
        scores, lengths, kls = [], [], []
        for prompt, resps in zip(heldout, responses):
            for r in resps:
                scores.append(task.score(prompt, tok.decode(r, skip_special_tokens=True)))
                lengths.append(len(r))
                kls.append(sequence_logprob(model, tok, prompt, r) - sequence_logprob(ref, tok, prompt, r))
        results[path] = {
            "ground_truth": statistics.mean(s.total for s in scores),
            "sentiment": statistics.mean(s.sentiment for s in scores),
            "relevance": statistics.mean(s.relevance for s in scores),
            "form": statistics.mean(s.form for s in scores),
            "response_tokens": statistics.mean(lengths),
            "kl_to_reference": statistics.mean(kls),
            "n": len(scores),
            "example": tok.decode(responses[0][0], skip_special_tokens=True),
        }
    print(f"\nheld-out prompts: {len(heldout)} x {args.samples} samples; ground truth 0-100 (training never sees it)")
    print(f"{'policy':<28} {'score':>6} {'sentiment':>9} {'relevance':>9} {'form':>5} {'tokens':>6} {'KL':>6}")
    for path, r in results.items():
        print(
            f"{path[-28:]:<28} {r['ground_truth']:>6.1f} {r['sentiment']:>9.3f} {r['relevance']:>9.3f} "
            f"{r['form']:>5.2f} {r['response_tokens']:>6.1f} {r['kl_to_reference']:>6.2f}"
        )
    for path, r in results.items():
        print(f"  {path}: {r['example']!r}")
    if len(results) > 1:
        first, last = list(results.values())[0], list(results.values())[-1]
        print(f"change from first to last: {last['ground_truth'] - first['ground_truth']:+.1f} points")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
