"""`rlhf eval`: answer held-out prompts with every policy and say whether alignment helped.

Build (hand-off checks, prompts, judge models), then per policy: sample, score with the reward
model (and a held-out one), measure KL to the SFT reference, length and diversity; finally
compare against SFT and write the report (`rlhf.eval.report`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import autocast, handoff
from rlhf.checkpoint import MANIFEST, now, parent_ref, write_manifest
from rlhf.config import ConfigError, to_dict
from rlhf.config_run import EvalRecipe
from rlhf.data.formats import Messages, normalize_prompt, normalize_sft
from rlhf.data.prepare import prepare_splits, read_whole
from rlhf.eval import metrics, report
from rlhf.eval.forgetting import nll_per_token, perplexity_rise, reference_answers
from rlhf.models import default_device, load_model, load_tokenizer
from rlhf.sampling import Samples, render_prompt, sample, score_responses, sequence_logprobs, with_few_shot
from rlhf.stages import common
from rlhf.tasks import GRADERS

log = logging.getLogger("rlhf")

COMPARED_STAGES = ("ppo", "dpo")
"""Stages whose outputs are compared as methods (PPO and its critic-free relatives, DPO and KTO)."""


@dataclass
class Policy:
    name: str
    path: str
    few_shot: int = 0
    best_of: int = 1  # n > 1: each answer is the reward model's pick among n samples


def policies_of(recipe: EvalRecipe) -> list[Policy]:
    out = []
    if recipe.base_dir:
        out.append(Policy("base", recipe.base_dir, recipe.base_few_shot))
    out.append(Policy("sft", recipe.sft_dir))
    if recipe.ppo_dir:
        out.append(Policy("ppo", recipe.ppo_dir))
    out += [Policy(v.name, v.path) for v in recipe.rl_variants]
    if recipe.best_of_n:
        out.append(Policy(f"sft_best_of_{recipe.best_of_n}", recipe.sft_dir, best_of=recipe.best_of_n))
    out += [Policy(p.name, p.path, p.few_shot) for p in recipe.extra_policies]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"policy names must be unique, got {names}")
    return out


def training_cost(path: str) -> dict[str, float]:
    """Wall time and peak memory of the stage that made `path`, from its manifest (RL and DPO stages)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return {}
    m = json.loads(manifest.read_text())
    if m.get("stage") not in COMPARED_STAGES:
        return {}
    got = m.get("metrics", {})
    return {k: float(got[k]) for k in ("train_seconds", "peak_memory_mb") if isinstance(got.get(k), (int, float))}


def check_handoff(recipe: EvalRecipe, policies: list[Policy]):
    """Before any sampling: stage outputs are complete and every model shares the judge's tokenizer."""
    handoff.parent_stage(recipe.sft_dir, handoff.POLICY_STAGES, needed_by="evaluation")
    for rl in filter(None, [recipe.ppo_dir, *(v.path for v in recipe.rl_variants)]):
        handoff.parent_stage(rl, COMPARED_STAGES, needed_by="evaluation")
    sft_tok = load_tokenizer(recipe.sft_dir)
    for judge in filter(None, (recipe.reward_dir, recipe.heldout_reward_dir)):
        handoff.reward_model(judge, sft_tok, f"SFT policy ({recipe.sft_dir})", needed_by="evaluation")
    for p in policies:
        handoff.same_tokenizer(
            load_tokenizer(p.path), f"policy {p.name} ({p.path})", sft_tok, f"SFT policy ({recipe.sft_dir})"
        )
    return sft_tok


def load_prompts(recipe: EvalRecipe, tok) -> list[Messages]:
    splits = prepare_splits(recipe.prompts, normalize_prompt, lambda m: len(render_prompt(tok, m)), key="prompts")
    return splits.train + splits.validation + splits.test  # evaluation uses every held-out prompt


def load_shots(recipe: EvalRecipe, k: int) -> list[Messages]:
    if not k or recipe.few_shot_data is None:
        return []
    return read_whole(recipe.few_shot_data, normalize_sft, key="few_shot_data.path")[:k]


def _load(path: str, kind: str, device):
    precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return load_model(path, "causal-lm" if kind == "policy" else "scorer", precision, device=device).eval()


def _best_of(s: Samples, rewards: list[float], n: int) -> tuple[Samples, list[float]]:
    """Keep the highest-reward sample of each consecutive group of n (same prompt, prompt-major)."""
    keep = [max(range(g, g + n), key=lambda i: rewards[i]) for g in range(0, len(rewards), n)]
    picked = Samples([s.prompt_index[i] for i in keep], [s.responses[i] for i in keep], [s.hit_limit[i] for i in keep])
    return picked, [rewards[i] for i in keep]


def evaluate_policy(
    p: Policy, recipe: EvalRecipe, tok, prompts: list[Messages], judges: dict, device, bf16_sampling: bool = False
) -> dict:
    """Sample one policy on every prompt (under bf16 autocast when `bf16_sampling`) and measure it;
    returns its metrics and samples."""
    plain = [render_prompt(tok, m) for m in prompts]
    shots = load_shots(recipe, p.few_shot)
    shown = [render_prompt(tok, with_few_shot(m, shots)) for m in prompts] if shots else plain
    model = _load(p.path, "policy", device)
    bs = recipe.batch_size
    with autocast.context(bf16_sampling, device):
        s: Samples = sample(
            model,
            tok,
            shown,
            recipe.samples_per_prompt * p.best_of,
            recipe.generation,
            recipe.seed,
            bs,
            device,
            greedy=recipe.greedy,
        )
    rewards = _rewards(judges["reward"], tok, [prompts[i] for i in s.prompt_index], s, device, bs)
    if p.best_of > 1:
        s, rewards = _best_of(s, rewards, p.best_of)
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in s.responses]
    out = {
        "name": p.name,
        "path": p.path,
        "few_shot": p.few_shot,
        **_sample_metrics(s, texts, rewards, judged=judges["reward"] is not None),
        "kl_to_sft": _kl_to_sft(p, model, judges["reference"], shown, plain, s, tok, recipe, device),
    }
    answered = [prompts[i] for i in s.prompt_index]  # scored as the reward model was trained: rendered again
    if "heldout_reward" in judges:
        held = score_responses(judges["heldout_reward"], tok, answered, s.responses, device, bs).tolist()
        out["heldout_reward_mean"] = metrics.mean(held)
    if recipe.ground_truth != "none":
        grade = GRADERS[recipe.ground_truth]
        out["ground_truth"] = metrics.mean(
            [grade(prompts[i][-1]["content"], t, h) for i, t, h in zip(s.prompt_index, texts, s.hit_limit)]
        )
    out.update(training_cost(p.path) if p.best_of == 1 else {})
    if "forgetting" in judges and p.best_of == 1:
        questions, answers = judges["forgetting"]
        out["forgetting_nll"] = nll_per_token(model, tok, questions, answers, bs, device)
    del model
    return out


def _rewards(judge, tok, answered: list[Messages], s: Samples, device, bs: int) -> list[float]:
    """The reward model's score of each sample, rendered as it was trained; NaN without a reward
    model (e.g. verifiable rewards: the task's ground truth is then the measure)."""
    if judge is None:
        return [math.nan] * len(s.responses)
    return score_responses(judge, tok, answered, s.responses, device, bs).tolist()


def _kl_to_sft(p: Policy, model, reference, shown, plain, s: Samples, tok, recipe: EvalRecipe, device) -> float:
    """Mean KL(policy || SFT) per response: log p_policy(y | what it saw) - log p_sft(y | plain
    prompt). Best-of-n samples SFT itself; its KL is the analytic bound log(n) - (n - 1) / n
    (Stiennon et al. 2020)."""
    if p.best_of > 1:
        return math.log(p.best_of) - (p.best_of - 1) / p.best_of
    if recipe.greedy:  # a greedy answer is not a sample of the policy: its log-ratio is no KL estimate
        return math.nan
    temp, bs, pad = recipe.generation.temperature, recipe.batch_size, tok.pad_token_id
    logp = sequence_logprobs(model, shown, s, pad, temp, bs, device)
    ref_logp = sequence_logprobs(reference, plain, s, pad, temp, bs, device)
    return metrics.mean([a - b for a, b in zip(logp, ref_logp)])


def _sample_metrics(s: Samples, texts: list[str], rewards: list[float], judged: bool) -> dict:
    """Reward, length and diversity statistics of one policy's samples, and the samples themselves."""
    lengths = [len(r) for r in s.responses]
    return {
        "n": len(texts),
        "reward_mean": metrics.mean(rewards),
        "reward_std": metrics.length_stats(rewards)["std"] if judged else math.nan,
        "length": metrics.length_stats(lengths),
        "distinct_1": metrics.distinct_n(s.responses, 1),
        "distinct_2": metrics.distinct_n(s.responses, 2),
        "hit_length_limit": metrics.mean([float(h) for h in s.hit_limit]),
        "reward_length_correlation": metrics.pearson(rewards, lengths) if judged else math.nan,
        "rewards": rewards,
        "lengths": lengths,
        "texts": texts,
        "prompt_index": s.prompt_index,
    }


def forgetting_reference(recipe: EvalRecipe, tok, device) -> tuple[list[list[int]], Samples]:
    """The general questions (rendered) and the base model's greedy answers to them."""
    rows = read_whole(recipe.forgetting_prompts, normalize_prompt, key="forgetting_prompts.path")
    questions = [render_prompt(tok, m) for m in rows]
    base = _load(recipe.base_dir, "policy", device)
    return questions, reference_answers(
        base, tok, questions, recipe.forgetting_max_new_tokens, recipe.batch_size, device
    )


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
    # Sampling only: the judges, the KL estimate and the forgetting measure compute as before.
    bf16_sampling = autocast.resolve_autocast(recipe.generation_autocast, device, "generation_autocast")
    judges = {
        "reward": _load(recipe.reward_dir, "scorer", device) if recipe.reward_dir else None,
        "reference": _load(recipe.sft_dir, "policy", device),
    }
    if recipe.heldout_reward_dir:
        judges["heldout_reward"] = _load(recipe.heldout_reward_dir, "scorer", device)
    if recipe.forgetting_prompts is not None:
        judges["forgetting"] = forgetting_reference(recipe, tok, device)
    from tqdm.auto import tqdm

    results = []
    for p in tqdm(policies, desc="eval"):
        results.append(evaluate_policy(p, recipe, tok, prompts, judges, device, bf16_sampling))
        log.info("%s: reward %.3f, KL to SFT %.2f", p.name, results[-1]["reward_mean"], results[-1]["kl_to_sft"])
    base_nll = next((r["forgetting_nll"] for r in results if r["name"] == "base" and "forgetting_nll" in r), None)
    for r in results:
        if base_nll is not None and "forgetting_nll" in r:
            r["forgetting_ppl_rise"] = perplexity_rise(r["forgetting_nll"], base_nll)
    sft = next(r for r in results if r["name"] == "sft")
    short = sft["length"]["median"] / 2
    for r in results:  # the reward model judges each pair of answers to the same prompt and sample
        if recipe.reward_dir:
            r["win_rate_vs_sft"] = metrics.win_rate(r["rewards"], sft["rewards"])
        # A policy that found answers far shorter than SFT's still scoring well is a classic hack.
        r["shorter_than_half_sft"] = metrics.mean([float(n < short) for n in r["lengths"]])
    out = Path(recipe.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    summary = report.write_report(out, results, prompts, recipe)
    parents = [parent_ref(p.path) for p in policies if Path(p.path, "rlhf_manifest.json").is_file()]
    write_manifest(
        out,
        stage="eval",
        recipe=to_dict(recipe),
        started_at=started_at,
        parents=parents,
        metrics={
            "headline": summary,
            "seconds": time.perf_counter() - t0,
            "generation_bf16_autocast": bf16_sampling,
        },
        datasets={"prompts": len(prompts)},
    )
    report.log_to_wandb(out, recipe, summary)
    return out
