"""A string-transformation task for small models: write a sequence of letters backwards.

It exists to check that the demo recipes' defaults carry over to a task they were not tuned on
(`scripts/cross_task.py`). Unlike the demo's open-ended reviews, every prompt has one right answer:

- prompts:        "reverse the letters : k d m q" (3-5 letters out of 10, two phrasings);
- demonstrations: the right answer 70% of the time, otherwise one slip (two neighbours swapped, or
                  a letter dropped), so a model that imitates them is right about 70% of the time;
- preferences:    a stand-in annotator prefers the answer of the right length, then the one with
                  more letters in the right place, and flips 10% of its answers; ties are skipped;
- held-out:       letter sequences that no training file contains (split by a hash of the
                  sequence), in the training phrasings;
- ground truth:   `score()`: 100 for exactly the reversed letters, else 0 (exact match).

Pure Python and deterministic from a seed, so the grader is testable.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

from rlhf.tasks import exact

LETTERS = list("bdfhkmprtw")
PHRASINGS = ["reverse the letters : {s}", "write backwards : {s}"]
_SEQUENCE = re.compile(r":\s*((?:[a-z] ?)+)\s*$")


def letters_of(prompt: str) -> list[str]:
    """The letters a prompt asks to reverse (after its colon)."""
    m = _SEQUENCE.search(prompt.strip())
    if m is None:
        raise ValueError(f"not a reverse prompt: {prompt!r}")
    return m.group(1).split()


def answer_of(prompt: str) -> str:
    """The right answer: the prompt's letters in reverse order, space-separated."""
    return " ".join(reversed(letters_of(prompt)))


def _answer_letters(response: str) -> list[str]:
    return re.findall(r"[a-z]+", response.lower())


def score(prompt: str, response: str, hit_limit: bool = False) -> float:
    """Ground truth, 0-100: 100 when the response is exactly the reversed letters (spaces and a
    final full stop aside), else 0."""
    return 100.0 * float(_answer_letters(response) == answer_of(prompt).split())


def placed(prompt: str, response: str) -> tuple[int, int]:
    """(1 if the length is right, letters in their right place): what the annotator judges."""
    want, got = answer_of(prompt).split(), _answer_letters(response)
    return int(len(got) == len(want)), sum(a == b for a, b in zip(want, got))


def annotator_prefers(rng: random.Random, prompt: str, a: str, b: str, noise: float = 0.1) -> int | None:
    """0 if `a` is preferred, 1 for `b`, None for a tie; wrong `noise` of the time."""
    return exact.judge(rng, placed(prompt, a), placed(prompt, b), noise)


def demonstration(rng: random.Random, prompt: str, p_right: float = 0.7) -> str:
    """An imperfect demonstration: the answer, or the answer with one slip."""
    right = answer_of(prompt).split()
    out = list(right)
    if rng.random() >= p_right:
        if rng.random() < 0.5:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
            if out == right:  # swapped two equal letters: drop one instead
                out.pop(i)
        else:
            out.pop(rng.randrange(len(out)))
    return " ".join(out)


def is_heldout(letters: list[str]) -> bool:
    """A fixed fifth of all sequences, by a hash of the sequence: never in a training file."""
    return hashlib.sha256(" ".join(letters).encode()).digest()[0] % 5 == 0


def make_prompts(rng: random.Random, heldout: bool, n: int) -> list[str]:
    out = []
    while len(out) < n:
        letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
        if is_heldout(letters) == heldout:
            out.append(rng.choice(PHRASINGS).format(s=" ".join(letters)))
    return out


def build_data(
    out: str | os.PathLike, seed: int = 0, n_sft: int = 900, n_pairs: int = 900, n_rl: int = 300, n_heldout: int = 100
) -> dict[str, int]:
    """Write sft.jsonl, preferences.jsonl, prompts.jsonl (RL) and heldout_prompts.jsonl into `out`."""
    return exact.build_files(out, seed, make_prompts, demonstration, annotator_prefers, n_sft, n_pairs, n_rl, n_heldout)


def reward(prompt: str, response: str, **fields) -> float:
    """The ground truth as a reward function (1.0 right, 0.0 wrong): RL on the checker itself,
    which separates what PPO can do from what a learned reward model lets it do."""
    return score(prompt, response) / 100.0
