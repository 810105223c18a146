"""A choice task for small models: pick the one word of a named category out of three.

Like `reverse`, it checks that the demo recipes' defaults carry over to a task they were not tuned
on (`scripts/cross_task.py`); it is smaller than both (600 demonstrations) and its answer is one word:

- prompts:        "which one is the fruit : desk plum red ?" (one word of the category, two of others);
- demonstrations: the right word 65% of the time, otherwise one of the other two;
- preferences:    the right word over a wrong one, 10% flipped (two wrong answers tie: skipped);
- held-out:       word triples that no training file contains (split by a hash of the ordered
                  triple), so every word is known but no held-out question was seen;
- ground truth:   `score()`: 100 for exactly the right word, else 0.

Pure Python and deterministic from a seed, so the grader is testable.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

from rlhf.tasks import exact

CATEGORIES = {
    "fruit": ["plum", "pear", "lime", "fig", "apple", "grape"],
    "colour": ["red", "blue", "green", "pink", "grey", "gold"],
    "animal": ["cat", "dog", "fox", "owl", "bear", "wolf"],
    "tool": ["saw", "drill", "axe", "file", "hammer", "wrench"],
    "furniture": ["desk", "sofa", "bed", "stool", "shelf", "bench"],
}
PHRASINGS = ["which one is the {cat} : {words} ?", "pick the {cat} : {words}"]
_PROMPT = re.compile(r"(?:which one is the|pick the) (\w+) : ((?:\w+ ?){3})")


def question_of(prompt: str) -> tuple[str, list[str]]:
    """(category, the three words) of a prompt."""
    m = _PROMPT.search(prompt)
    if m is None or m.group(1) not in CATEGORIES:
        raise ValueError(f"not a pick prompt: {prompt!r}")
    return m.group(1), m.group(2).split()


def answer_of(prompt: str) -> str:
    """The word of the asked category."""
    cat, words = question_of(prompt)
    return next(w for w in words if w in CATEGORIES[cat])


def score(prompt: str, response: str, hit_limit: bool = False) -> float:
    """Ground truth, 0-100: 100 when the response is exactly the right word (a final full stop
    aside), else 0."""
    return 100.0 * float(re.findall(r"[a-z]+", response.lower()) == [answer_of(prompt)])


def annotator_prefers(rng: random.Random, prompt: str, a: str, b: str, noise: float = 0.1) -> int | None:
    """0 if `a` is preferred, 1 for `b`, None when both are right or both wrong; wrong `noise` of the time."""
    return exact.judge(rng, score(prompt, a) > 0, score(prompt, b) > 0, noise)


def demonstration(rng: random.Random, prompt: str, p_right: float = 0.65) -> str:
    """An imperfect demonstration: the right word, or one of the two others."""
    right = answer_of(prompt)
    return right if rng.random() < p_right else rng.choice([w for w in question_of(prompt)[1] if w != right])


def is_heldout(cat: str, words: list[str]) -> bool:
    """A fixed fifth of all questions, by a hash of (category, ordered words)."""
    return hashlib.sha256(f"{cat}:{' '.join(words)}".encode()).digest()[0] % 5 == 0


def make_prompts(rng: random.Random, heldout: bool, n: int) -> list[str]:
    out = []
    while len(out) < n:
        cat = rng.choice(sorted(CATEGORIES))
        others = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
        words = [rng.choice(CATEGORIES[cat]), *rng.sample(others, 2)]
        rng.shuffle(words)
        if is_heldout(cat, words) == heldout:
            out.append(rng.choice(PHRASINGS).format(cat=cat, words=" ".join(words)))
    return out


def build_data(
    out: str | os.PathLike, seed: int = 0, n_sft: int = 600, n_pairs: int = 600, n_rl: int = 300, n_heldout: int = 100
) -> dict[str, int]:
    """Write sft.jsonl, preferences.jsonl, prompts.jsonl (RL) and heldout_prompts.jsonl into `out`."""
    return exact.build_files(out, seed, make_prompts, demonstration, annotator_prefers, n_sft, n_pairs, n_rl, n_heldout)


def reward(prompt: str, response: str, **fields) -> float:
    """The ground truth as a reward function (1.0 right, 0.0 wrong): RL on the checker itself,
    which separates what PPO can do from what a learned reward model lets it do."""
    return score(prompt, response) / 100.0
