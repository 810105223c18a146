"""A verifiable-reward task: arithmetic questions with checked answers.

Each prompt asks for the result of one operation on two small numbers and carries its `answer`
column, which a reward function reads (`reward`, `format_reward`; recipes name them as
`rlhf.tasks.arithmetic:reward`). The held-out prompts use operand pairs that the training prompts
never use, and another phrasing, so a policy cannot pass by remembering answers. Ground truth for
evaluation (`score`) recomputes the answer from the prompt text.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
TRAIN_PHRASES = ["What is {a} {op} {b}? Reply with just the number.", "Compute {a} {op} {b}. Give only the result."]
HELDOUT_PHRASES = ["Calculate {a} {op} {b} and answer with the number alone."]
_QUESTION = re.compile(r"(-?\d+) ([+\-*]) (-?\d+)")
_INTEGER = re.compile(r"-?\d+(?:,\d{3})*")


def answer_of(prompt: str) -> int:
    """The correct result of the operation written in `prompt`."""
    m = _QUESTION.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return OPS[m.group(2)](int(m.group(1)), int(m.group(3)))


def final_integer(response: str) -> int | None:
    """The last integer in the response (the convention of GSM8K-style checkers: "26 + 28 = 54"
    answers 54, not 26)."""
    found = _INTEGER.findall(response)
    return int(found[-1].replace(",", "")) if found else None


def reward(prompt: str, response: str, answer: int | None = None, **fields) -> float:
    """1.0 when the last number in the response is the answer, else 0.0 (the row's `answer`
    column when present, else recomputed from the prompt)."""
    want = answer_of(prompt) if answer is None else int(answer)
    return float(final_integer(response) == want)


def format_reward(prompt: str, response: str, **fields) -> float:
    """1.0 when the response is a number and nothing else, as every prompt asks."""
    return float(re.fullmatch(r"\s*-?\d[\d,]*\.?\s*", response) is not None)


def score(prompt: str, response: str, hit_limit: bool = False) -> float:
    """Ground truth, 0-100: the right number last (format is not graded)."""
    return 100.0 * reward(prompt, response)


def _pairs(rng: random.Random, heldout: bool, n: int) -> list[tuple[int, str, int]]:
    """n (a, op, b) with the parity of a + b as the split: training and held-out never share a pair."""
    out = []
    while len(out) < n:
        a, b, op = rng.randint(2, 49), rng.randint(2, 49), rng.choice(["+", "+", "-", "*"])
        if op == "*":
            b = rng.randint(2, 9)
        if ((a * 7 + b * 3) % 5 == 0) == heldout:
            out.append((a, op, b))
    return out


def _rows(rng: random.Random, heldout: bool, n: int) -> list[dict]:
    phrases = HELDOUT_PHRASES if heldout else TRAIN_PHRASES
    rows = []
    for a, op, b in _pairs(rng, heldout, n):
        text = rng.choice(phrases).format(a=a, op=op, b=b)
        rows.append({"prompt": text, "answer": OPS[op](a, b)})
    return rows


def build_data(out: str | os.PathLike, seed: int = 0, n_rl: int = 400, n_heldout: int = 100) -> dict[str, int]:
    """Write prompts.jsonl (RL, with `answer`) and heldout_prompts.jsonl (evaluation only) into `out`."""
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"prompts.jsonl": _rows(rng, False, n_rl), "heldout_prompts.jsonl": _rows(rng, True, n_heldout)}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()}
