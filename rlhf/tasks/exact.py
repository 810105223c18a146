"""What the exact-answer tasks (`reverse`, `pick`) share: how their four files are drawn and written.

Each task gives its prompt sampler (train or held-out), its imperfect demonstration and its noisy
annotator; the files are drawn from them in the same way, so the tasks differ only in what they ask.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable


def judge(rng: random.Random, key_a, key_b, noise: float) -> int | None:
    """The stand-in annotator's verdict from what it judges of each answer (`key_a`, `key_b`, any
    comparable value): 0 if `a` is preferred, 1 for `b`, None for a tie; wrong `noise` of the time."""
    if key_a == key_b:
        return None
    choice = 0 if key_a > key_b else 1
    return 1 - choice if rng.random() < noise else choice


def build_files(
    out: str | os.PathLike,
    seed: int,
    make_prompts: Callable[[random.Random, bool, int], list[str]],
    demonstration: Callable[..., str],
    annotator_prefers: Callable[[random.Random, str, str, str], int | None],
    n_sft: int,
    n_pairs: int,
    n_rl: int,
    n_heldout: int,
) -> dict[str, int]:
    """Write sft.jsonl, preferences.jsonl, prompts.jsonl (RL) and heldout_prompts.jsonl into `out`
    (each atomically); returns the row count of each.

    Preference pairs are two draws of a demonstration that is right half the time, judged by the
    annotator; ties are drawn again. Held-out prompts come from `make_prompts(rng, True, n)`, which
    no training file uses.
    """
    from rlhf.data.io import write_jsonl

    rng = random.Random(seed)
    sft = [{"prompt": p, "completion": demonstration(rng, p)} for p in make_prompts(rng, False, n_sft)]
    pairs: list[dict] = []
    while len(pairs) < n_pairs:
        p = make_prompts(rng, False, 1)[0]
        a, b = demonstration(rng, p, p_right=0.5), demonstration(rng, p, p_right=0.5)
        choice = annotator_prefers(rng, p, a, b)
        if choice is not None:
            chosen, rejected = (a, b) if choice == 0 else (b, a)
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    files = {
        "sft.jsonl": sft,
        "preferences.jsonl": pairs,
        "prompts.jsonl": [{"prompt": p} for p in make_prompts(rng, False, n_rl)],
        "heldout_prompts.jsonl": [{"prompt": p} for p in make_prompts(rng, True, n_heldout)],
    }
    for name, rows in files.items():
        write_jsonl(rows, Path(out) / name)
    return {name: len(rows) for name, rows in files.items()}
