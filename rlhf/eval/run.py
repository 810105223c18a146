"""`rlhf eval`: answer held-out prompts with every policy and say whether alignment helped.

Build (hand-off checks, prompts, judge models), then per policy: sample, score with the reward
model (and a held-out one), measure KL to the SFT reference, length and diversity; finally
compare against SFT and write the report (`rlhf.eval.report`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.checkpoint import now, parent_ref, read_manifest, write_manifest
from rlhf.config import ConfigError, DataConfig, to_dict
from rlhf.config_run import EvalRecipe
from rlhf.data.formats import Messages, normalize_prompt, normalize_sft
from rlhf.data.prepare import prepare_splits
from rlhf.eval import metrics, report
from rlhf.eval.sampling import Samples, sample, sequence_logprobs, with_few_shot
from rlhf.stages.ppo.rollout import encode_prompts
from rlhf.models import check_tokenizers_match, default_device, load_tokenizer
from rlhf.scoring import score_sequences
from rlhf.stages import common

log = logging.getLogger("rlhf")


@dataclass
class Policy:
    name: str
    path: str
    few_shot: int = 0


def policies_of(recipe: EvalRecipe) -> list[Policy]:
    out = []
    if recipe.base_dir:
        out.append(Policy("base", recipe.base_dir, recipe.base_few_shot))
    out.append(Policy("sft", recipe.sft_dir))
    if recipe.ppo_dir:
        out.append(Policy("ppo", recipe.ppo_dir))
    out += [Policy(p.name, p.path, p.few_shot) for p in recipe.extra_policies]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"policy names must be unique, got {names}")
    return out


def check_handoff(recipe: EvalRecipe, policies: list[Policy]):
    """Before any sampling: stage outputs are complete and every model shares the judge's tokenizer."""
    read_manifest(recipe.sft_dir, expect_stage="sft", needed_by="evaluation")
    read_manifest(recipe.reward_dir, expect_stage="reward", needed_by="evaluation")
    if recipe.ppo_dir:
        read_manifest(recipe.ppo_dir, expect_stage="ppo", needed_by="evaluation")
    if recipe.heldout_reward_dir:
        read_manifest(recipe.heldout_reward_dir, expect_stage="reward", needed_by="evaluation")
    judge = load_tokenizer(recipe.reward_dir)
    for p in policies:
        check_tokenizers_match(load_tokenizer(p.path), f"policy {p.name} ({p.path})", judge,
                               f"reward model ({recipe.reward_dir})")
    return judge


def load_prompts(recipe: EvalRecipe, tok) -> list[Messages]:
    splits = prepare_splits(recipe.prompts, normalize_prompt, lambda m: len(encode_prompts(tok, [m])[0]))
    return splits.train + splits.validation + splits.test  # evaluation uses every held-out prompt


def load_shots(recipe: EvalRecipe, k: int) -> list[Messages]:
    if not k or recipe.few_shot_data is None:
        return []
    cfg = DataConfig(sources=[recipe.few_shot_data], validation_fraction=0.0, max_length=10**9)
    return prepare_splits(cfg, normalize_sft).train[:k]


def _load(path: str, kind: str, device):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "policy" else AutoModelForSequenceClassification
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return cls.from_pretrained(path, dtype=dtype).to(device).eval()


def evaluate_policy(p: Policy, recipe: EvalRecipe, tok, prompts: list[Messages], judges: dict, device) -> dict:
    """Sample one policy on every prompt and measure it; returns its metrics and samples."""
    plain = encode_prompts(tok, prompts)
    shots = load_shots(recipe, p.few_shot)
    shown = encode_prompts(tok, [with_few_shot(m, shots) for m in prompts]) if shots else plain
    model = _load(p.path, "policy", device)
    bs, temp = recipe.batch_size, recipe.generation.temperature
    s: Samples = sample(model, tok, shown, recipe.samples_per_prompt, recipe.generation, recipe.seed, bs, device)
    # KL(policy || SFT) per response: log p_policy(y | what it saw) - log p_sft(y | plain prompt).
    logp = sequence_logprobs(model, shown, s, tok.pad_token_id, temp, bs, device)
    ref_logp = sequence_logprobs(judges["reference"], plain, s, tok.pad_token_id, temp, bs, device)
    del model
    seqs = [plain[i] + r for i, r in zip(s.prompt_index, s.responses)]
    rewards = score_sequences(judges["reward"], seqs, tok.pad_token_id, device, bs).tolist()
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in s.responses]
    lengths = [len(r) for r in s.responses]
    out = {
        "name": p.name, "path": p.path, "few_shot": p.few_shot, "n": len(texts),
        "reward_mean": metrics.mean(rewards), "reward_std": metrics.length_stats(rewards)["std"],
        "kl_to_sft": metrics.mean([a - b for a, b in zip(logp, ref_logp)]),
        "length": metrics.length_stats(lengths),
        "distinct_1": metrics.distinct_n(s.responses, 1), "distinct_2": metrics.distinct_n(s.responses, 2),
        "hit_length_limit": metrics.mean([float(h) for h in s.hit_limit]),
        "reward_length_correlation": metrics.pearson(rewards, lengths),
        "rewards": rewards, "lengths": lengths, "texts": texts, "prompt_index": s.prompt_index,
    }
    if "heldout_reward" in judges:
        held = score_sequences(judges["heldout_reward"], seqs, tok.pad_token_id, device, bs).tolist()
        out["heldout_reward_mean"] = metrics.mean(held)
    if recipe.ground_truth == "demo":
        from rlhf.demo import task

        scores = [task.score(prompts[i][-1]["content"], t) for i, t in zip(s.prompt_index, texts)]
        out["ground_truth"] = metrics.mean([x.total for x in scores])
    return out


def run_eval(recipe: EvalRecipe) -> Path:
    """Evaluate and write `<output_dir>/eval/` (report.md, report.json, plots, manifest)."""
    common.setup_logging()
    started_at, t0 = now(), time.perf_counter()
    if recipe.demo_assets:
        from rlhf.demo.assets import build_demo_assets

        build_demo_assets(recipe.demo_assets)
    policies = policies_of(recipe)
    tok = check_handoff(recipe, policies)
    prompts = load_prompts(recipe, tok)
    device = default_device()
    torch.manual_seed(recipe.seed)
    judges = {"reward": _load(recipe.reward_dir, "scorer", device), "reference": _load(recipe.sft_dir, "policy", device)}
    if recipe.heldout_reward_dir:
        judges["heldout_reward"] = _load(recipe.heldout_reward_dir, "scorer", device)
    from tqdm.auto import tqdm

    results = []
    for p in tqdm(policies, desc="eval"):
        results.append(evaluate_policy(p, recipe, tok, prompts, judges, device))
        log.info("%s: reward %.3f, KL to SFT %.2f", p.name, results[-1]["reward_mean"], results[-1]["kl_to_sft"])
    sft = next(r for r in results if r["name"] == "sft")
    short = sft["length"]["median"] / 2
    for r in results:  # the reward model judges each pair of answers to the same prompt and sample
        r["win_rate_vs_sft"] = metrics.win_rate(r["rewards"], sft["rewards"])
        # A policy that found answers far shorter than SFT's still scoring well is a classic hack.
        r["shorter_than_half_sft"] = metrics.mean([float(n < short) for n in r["lengths"]])
    out = Path(recipe.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = report.write_report(out, results, prompts, recipe)
    parents = [parent_ref(p.path) for p in policies if Path(p.path, "rlhf_manifest.json").is_file()]
    write_manifest(out, stage="eval", recipe=to_dict(recipe), started_at=started_at, parents=parents,
                   metrics={"headline": summary, "seconds": time.perf_counter() - t0},
                   datasets={"prompts": len(prompts)})
    report.log_to_wandb(out, recipe, summary)
    return out
