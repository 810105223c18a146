"""Create a labelling project, measure it, and export it into the reward stage's format."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from rlhf.config import GenerationSettings
from rlhf.data.formats import Messages, normalize_prompt
from rlhf.data.io import DataError, write_jsonl
from rlhf.data.prepare import read_whole
from rlhf.label import agreement, store


def load_prompts(path: str, key: str = "--prompts") -> list[Messages]:
    return read_whole(path, normalize_prompt, key=key)


def generate_candidates(
    prompts: list[Messages], policy: str, samples: int, gen: GenerationSettings, seed: int
) -> list[list[str]]:
    """`samples` responses per prompt from one policy (the evaluation sampler, so the same code path)."""
    from rlhf.models import default_device, load_model, load_tokenizer, release_device_memory
    from rlhf.sampling import render_prompt, sample

    tok = load_tokenizer(policy)
    device = default_device()
    model = load_model(policy, "causal-lm", device=device).eval()
    s = sample(model, tok, [render_prompt(tok, p) for p in prompts], samples, gen, seed, 64, device)
    del model
    release_device_memory()
    out: list[list[str]] = [[] for _ in prompts]
    for i, r in zip(s.prompt_index, s.responses):
        out[i].append(tok.decode(r, skip_special_tokens=True).strip())
    return out


def _candidates_file(path: str) -> tuple[list[Messages], list[list[tuple[str, str]]]]:
    """Ready candidates: rows {prompt, response, model?}; grouped by prompt in file order."""
    from rlhf.data.io import read_rows

    grouped: dict[str, list[tuple[str, str]]] = {}
    first: dict[str, Messages] = {}
    for row in read_rows(path):
        if row.data is None or not str(row.data.get("response", "")).strip():
            raise DataError(f"{row.where}: a candidate needs a 'prompt' and a non-empty 'response'")
        msgs = normalize_prompt(row.data)
        key = json.dumps(msgs)
        first.setdefault(key, msgs)
        grouped.setdefault(key, []).append((str(row.data["response"]).strip(), str(row.data.get("model", path))))
    return [first[k] for k in grouped], list(grouped.values())


def init_project(
    db: str,
    *,
    prompts_path: str | None,
    policy: str | None,
    policy_b: str | None,
    samples: int,
    candidates_path: str | None,
    overlap: int,
    reward_model: str | None,
    gen: GenerationSettings,
    seed: int = 0,
    mode: str = "pairs",
) -> dict[str, int]:
    """Fill a new database with prompts, candidate responses and the items to label: pairs of
    responses, or (mode 'single') each response on its own, to be judged good or bad."""
    if mode not in store.MODES:
        raise ValueError(f"mode must be one of {store.MODES}, got {mode!r}")
    if mode == "single" and policy_b:
        raise ValueError("--policy-b compares two policies' answers in pairs; single mode judges each answer alone")
    if store.db_url(db).startswith("sqlite") and Path(db).exists():
        raise FileExistsError(f"{db} exists; a project is created once (add annotators or serve it)")
    if candidates_path:
        prompts, cands = _candidates_file(candidates_path)
        settings: dict = {"source": "candidates file"}
    else:
        prompts, cands, settings = _sampled_candidates(prompts_path, policy, policy_b, samples, gen, seed, mode)
    engine = store.connect(db, create=True)
    n_same = 0
    planned: list[tuple[int, int, int]] = []
    with engine.begin() as c:
        c.execute(
            store.meta.insert(),
            [
                {"key": "overlap", "value": str(overlap)},
                {"key": "mode", "value": mode},
                {"key": "created_at", "value": store.now().isoformat()},
            ],
        )
        for msgs, options in zip(prompts, cands):
            pid = c.execute(store.prompts.insert().values(messages=json.dumps(msgs))).inserted_primary_key[0]
            ids = [
                c.execute(
                    store.candidates.insert().values(prompt_id=pid, text=t, source=src, settings=json.dumps(settings))
                ).inserted_primary_key[0]
                for t, src in options
            ]
            if mode == "single":  # each response alone: an item is the candidate paired with itself
                planned += [(pid, cid, cid) for cid in ids]
                continue
            pairs, same = items_to_label([t for t, _ in options], two_policies=bool(policy_b))
            n_same += same
            planned += [(pid, ids[i], ids[j]) for i, j in pairs]
        priorities = _priorities(c, planned, reward_model, random.Random(seed))
        for (pid, a_id, b_id), prio in zip(planned, priorities):
            c.execute(store.pairs.insert().values(prompt_id=pid, a_id=a_id, b_id=b_id, priority=prio))
    return {"prompts": len(prompts), "pairs": len(planned), "identical_skipped": n_same}


def items_to_label(texts: list[str], two_policies: bool) -> tuple[list[tuple[int, int]], int]:
    """One prompt's candidates -> the index pairs to label, and how many were dropped as identical
    (identical answers carry no preference). Two policies (A's samples, then B's): A's i-th against
    B's i-th; one policy: samples two by two."""
    half = len(texts) // 2 if two_policies else 0
    idx = [(i, half + i) for i in range(half)] if two_policies else [(i, i + 1) for i in range(0, len(texts) - 1, 2)]
    kept = [(i, j) for i, j in idx if texts[i] != texts[j]]
    return kept, len(idx) - len(kept)


def _sampled_candidates(
    prompts_path: str | None,
    policy: str | None,
    policy_b: str | None,
    samples: int,
    gen: GenerationSettings,
    seed: int,
    mode: str,
) -> tuple[list[Messages], list[list[tuple[str, str]]], dict]:
    """Candidates sampled from one policy (or two, half each); returns the prompts, each prompt's
    (text, source) options and the sampling settings recorded with every candidate."""
    if not (prompts_path and policy):
        raise ValueError("give --prompts and --policy (and optionally --policy-b), or --candidates")
    prompts = load_prompts(prompts_path)
    settings = {
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_new_tokens": gen.max_new_tokens,
        "samples": samples,
        "seed": seed,
    }
    per = samples if policy_b is None else max(1, samples // 2)
    least = 1 if policy_b is not None or mode == "single" else 2  # one policy's pairs need two samples
    a = generate_candidates(prompts, policy, max(per, least), gen, seed)
    b = generate_candidates(prompts, policy_b, per, gen, seed + 1) if policy_b else None
    cands = [[(t, policy) for t in a[i]] + ([(t, policy_b) for t in b[i]] if b else []) for i in range(len(prompts))]
    return prompts, cands, settings


def _priorities(conn, planned: list[tuple[int, int, int]], reward_model: str | None, rng: random.Random) -> list[float]:
    """Random order, or with a reward model the least certain items first: pairs by |P(a > b) - 1/2|,
    single responses by their score's distance from the median score (the model's good/bad boundary)."""
    if not reward_model:
        return [rng.random() for _ in planned]
    import torch

    from rlhf.models import load_model, load_tokenizer
    from rlhf.sampling import render_conversation, score_sequences

    tok = load_tokenizer(reward_model)
    model = load_model(reward_model, "scorer")
    text = {r.id: (r.text, r.prompt_id) for r in conn.execute(select(store.candidates))}
    msgs = {r.id: json.loads(r.messages) for r in conn.execute(select(store.prompts))}
    seqs = [
        render_conversation(tok, msgs[p] + [{"role": "assistant", "content": text[cid][0]}])
        for p, a, b in planned
        for cid in (a, b)
    ]
    scores = score_sequences(model, seqs, tok.pad_token_id, "cpu") if seqs else torch.zeros(0)
    if planned and planned[0][1] == planned[0][2]:  # single responses (each scored twice, identically)
        one = scores[0::2]
        return (one - one.median()).abs().tolist()
    return pair_uncertainty(scores[0::2], scores[1::2]).tolist()


def pair_uncertainty(score_a, score_b):
    """How unsure the reward model is about a pair, (N,) x (N,) -> (N,): |P(a > b) - 1/2| with
    P = sigmoid(score_a - score_b) under Bradley-Terry; 0 is a coin flip (label it first)."""
    import torch

    return (torch.sigmoid(torch.as_tensor(score_a) - torch.as_tensor(score_b)) - 0.5).abs()


def _labels_by_pair(engine) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    with engine.connect() as c:
        rows = c.execute(
            select(store.labels, store.annotators.c.name).join(
                store.annotators, store.annotators.c.id == store.labels.c.annotator_id
            )
        ).mappings()
        for r in rows:
            out[r["pair_id"]].append(dict(r))
    return out


def stats(engine) -> dict[str, Any]:
    """Labels and throughput per annotator; agreement on pairs labelled more than once; rates."""
    by_pair = _labels_by_pair(engine)
    per: dict[str, list] = defaultdict(list)
    for labels in by_pair.values():
        for lab in labels:
            per[lab["name"]].append(lab["created_at"])
    annotators = {}
    for name, times in sorted(per.items()):
        span_h = (max(times) - min(times)).total_seconds() / 3600
        annotators[name] = {"labels": len(times), "per_hour": len(times) / span_h if span_h > 0 else None}
    multi = [[lab["choice"] for lab in labels] for labels in by_pair.values() if len(labels) >= 2]
    by_rater: dict[str, dict[int, str]] = defaultdict(dict)
    for pid, labels in by_pair.items():
        for lab in labels:
            by_rater[lab["name"]][pid] = lab["choice"]
    all_choices = Counter(lab["choice"] for labels in by_pair.values() for lab in labels)
    total = sum(all_choices.values())
    with engine.connect() as c:
        n_pairs = c.execute(select(func.count()).select_from(store.pairs)).scalar()
    return {
        "pairs": int(n_pairs),
        "labelled_pairs": len(by_pair),
        "labels": total,
        "annotators": annotators,
        "overlapping_pairs": len(multi),
        "raw_agreement": agreement.raw_agreement(multi),
        "fleiss_kappa": agreement.fleiss_kappa(multi),
        "cohen_kappa_mean": agreement.mean_pairwise_cohen(by_rater),
        "tie_rate": all_choices["tie"] / total if total else float("nan"),
        "both_bad_rate": all_choices["both_bad"] / total if total else float("nan"),
    }


def _labelled_items(
    engine, min_labels: int, counts: Counter, only: set[int] | None = None
) -> tuple[dict, dict, list[tuple[Any, list]]]:
    """What both exports read: candidates and prompts by id, and each item (a pair, or a single
    response) in id order with its labels (only the pair ids in `only`, when given: one batch).
    Items with fewer than `min_labels` labels are left out and counted in `counts` (as
    unlabelled, or too_few_labels)."""
    by_pair = _labels_by_pair(engine)
    with engine.connect() as c:
        cands = {r.id: r for r in c.execute(select(store.candidates))}
        prompts = {r.id: json.loads(r.messages) for r in c.execute(select(store.prompts))}
        all_items = list(c.execute(select(store.pairs).order_by(store.pairs.c.id)))
    kept = []
    for p in all_items:
        if only is not None and p.id not in only:
            continue
        labels = by_pair.get(p.id, [])
        if not labels or len(labels) < min_labels:
            counts["too_few_labels" if labels else "unlabelled"] += 1
        else:
            kept.append((p, labels))
    return cands, prompts, kept


def export(
    engine,
    out: str | Path,
    ties: str = "keep",
    min_labels: int = 1,
    margin_scale: float = 0.5,
    only: set[int] | None = None,
) -> dict[str, int]:
    """Vote per pair (agreement.export_vote) -> JSONL rows the reward stage reads as they are:
    {prompt (messages), chosen, rejected, margin, tie, provenance}. Margin = margin_scale x (mean
    strength of the winning votes - 1): 0 for 'slightly better', up to 1.0 for 'much better'.
    Returns how many rows were written (preferences + ties) and how many pairs were left out, by
    reason. `only`: the pair ids to export (one batch of `rlhf rounds`); default all."""
    out = Path(out)
    if out.is_dir():
        raise store.LabelError(f"--out {out} is a directory; give a file to write, e.g. {out / 'prefs.jsonl'}")
    if store.mode(engine) == "single":
        return export_single(engine, out, min_labels)
    counts = Counter({"preferences": 0, "ties": 0})
    cands, prompts, items = _labelled_items(engine, min_labels, counts, only)
    rows = []
    for p, labels in items:
        winner = agreement.export_vote([lab["choice"] for lab in labels])
        if winner == "both_bad":
            counts["both_bad"] += 1
            continue
        if winner == "tie" and ties == "drop":
            counts["ties_dropped"] += 1
            continue
        rows.append(_export_row(p, winner, labels, cands, prompts, margin_scale))
        counts["ties" if winner == "tie" else "preferences"] += 1
    _write_jsonl(out, rows)
    return {"written": len(rows), **counts}


def export_single(engine, out: Path, min_labels: int = 1) -> dict[str, int]:
    """Single-response projects -> JSONL rows the DPO stage's KTO method reads as they are:
    {prompt (messages), completion, label (true = good), provenance}. The majority vote decides; a
    response with as many good as bad votes is left out and counted."""
    counts = Counter({"good": 0, "bad": 0})
    cands, prompts, items = _labelled_items(engine, min_labels, counts)
    rows = []
    for p, labels in items:
        votes = Counter(lab["choice"] for lab in labels)
        if votes["good"] == votes["bad"]:
            counts["split_votes"] += 1
            continue
        good = votes["good"] > votes["bad"]
        counts["good" if good else "bad"] += 1
        rows.append(
            {
                "prompt": prompts[p.prompt_id],
                "completion": cands[p.a_id].text,
                "label": good,
                "provenance": {
                    "item_id": p.id,
                    "votes": dict(votes),
                    "annotators": sorted(lab["name"] for lab in labels),
                    "source": cands[p.a_id].source,
                },
            }
        )
    _write_jsonl(out, rows)
    return {"written": len(rows), **counts}


def _export_row(p, winner: str, labels: list[dict[str, Any]], cands, prompts, margin_scale: float) -> dict[str, Any]:
    chosen, rejected = (p.b_id, p.a_id) if winner == "b" else (p.a_id, p.b_id)
    strengths = [lab["strength"] for lab in labels if lab["choice"] == winner and lab["strength"]]
    margin = margin_scale * (sum(strengths) / len(strengths) - 1) if strengths and winner != "tie" else 0.0
    return {
        "prompt": prompts[p.prompt_id],
        "chosen": cands[chosen].text,
        "rejected": cands[rejected].text,
        "margin": margin,
        "tie": winner == "tie",
        "provenance": {
            "pair_id": p.id,
            "votes": dict(Counter(lab["choice"] for lab in labels)),
            "annotators": sorted(lab["name"] for lab in labels),
            "chosen_source": cands[chosen].source,
            "rejected_source": cands[rejected].source,
        },
    }


def _write_jsonl(out: Path, rows: list[dict[str, Any]]) -> None:
    """Whole file or nothing (`rlhf.data.io.write_jsonl`); a failure is the labelling app's error."""
    try:
        write_jsonl(rows, out)
    except OSError as e:
        raise store.LabelError(f"cannot write the export to {out}: {e.strerror or e}") from None
