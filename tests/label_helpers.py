"""Shared by the labelling tests: a small project from ready candidates (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import GenerationSettings
from rlhf.label import project


def make_project(tmp: Path, n_prompts: int = 6, overlap: int = 1, prompt_text: str | None = None,
                 reward_model: str | None = None) -> Path:
    """`n_prompts` prompts with 2 candidates each (one pair per prompt)."""
    rows = []
    for i in range(n_prompts):
        p = prompt_text or f"write a review of the item number {i} ."
        item = ["pizza", "movie", "hotel", "book", "phone", "laptop"][i % 6]
        rows.append({"prompt": p, "response": f"the {item} was great and lovely . i loved it .", "model": "m1"})
        rows.append({"prompt": p, "response": f"the {item} was awful and dull . i hated it . {i}", "model": "m2"})
    cands = tmp / "candidates.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp / "labels.sqlite"
    project.init_project(str(db), prompts_path=None, policy=None, policy_b=None, samples=2,
                         candidates_path=str(cands), overlap=overlap, reward_model=reward_model,
                         gen=GenerationSettings())
    return db
