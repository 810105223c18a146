"""Shared by the labelling tests: a small project from ready candidates (no model needed), and
labels written straight into the database where a test needs a given vote pattern."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from rlhf.config import GenerationSettings
from rlhf.label import project, store


def make_project(
    tmp: Path,
    n_prompts: int = 6,
    overlap: int = 1,
    prompt_text: str | None = None,
    reward_model: str | None = None,
    answers: tuple[str, str] | None = None,
    mode: str = "pairs",
) -> Path:
    """`n_prompts` prompts with 2 candidates each (one pair per prompt); `answers` replaces the two
    candidate texts of every prompt (the prompt number is appended to the second)."""
    rows = []
    for i in range(n_prompts):
        p = prompt_text or f"write a review of the item number {i} ."
        item = ["pizza", "movie", "hotel", "book", "phone", "laptop"][i % 6]
        good, bad = answers or (
            f"the {item} was great and lovely . i loved it .",
            f"the {item} was awful and dull . i hated it .",
        )
        rows.append({"prompt": p, "response": good, "model": "m1"})
        rows.append({"prompt": p, "response": f"{bad} {i}", "model": "m2"})
    cands = tmp / "candidates.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp / "labels.sqlite"
    project.init_project(
        str(db),
        prompts_path=None,
        policy=None,
        policy_b=None,
        samples=2,
        candidates_path=str(cands),
        overlap=overlap,
        reward_model=reward_model,
        gen=GenerationSettings(),
        mode=mode,
    )
    return db


def put_label(engine, pair_id: int, name: str, choice: str, strength: int | None = None) -> None:
    """A label in the database as it is stored (choice a | b | tie | both_bad), bypassing the app:
    for tests of what is done with labels (export, stats), not of how they are collected."""
    find = select(store.annotators.c.id).where(store.annotators.c.name == name)
    with engine.connect() as c:
        known = c.execute(find).scalar()
    if known is None:
        store.add_annotator(engine, name)
    with engine.begin() as c:
        a_id = c.execute(select(store.pairs.c.a_id).where(store.pairs.c.id == pair_id)).scalar()
        c.execute(
            store.labels.insert().values(
                pair_id=pair_id,
                annotator_id=c.execute(find).scalar(),
                choice=choice,
                strength=strength,
                comment="",
                left_id=a_id,
                created_at=store.now(),
            )
        )


def race_for_pair_one(db_url: str, annotator_ids: list[int]) -> list[str]:
    """Every annotator holds a lapsed lease on pair 1 and labels it at the same instant, each through
    its own engine (as separate server processes would); returns 'ok' / 'full' per attempt."""
    import threading

    from rlhf.label import assign

    with store.connect(db_url).begin() as c:
        c.execute(
            store.assignments.insert(),
            [
                {"pair_id": 1, "annotator_id": i, "served_at": store.now(), "expires_at": store.now()}
                for i in annotator_ids
            ],
        )
    outcomes: list[str] = []
    start = threading.Barrier(len(annotator_ids))

    def one(annotator_id: int) -> None:
        own = store.connect(db_url)  # no in-process lock shared with the others
        start.wait()
        try:
            assign.add_label(own, pair_id=1, annotator_id=annotator_id, choice="a", strength=1, comment="", left_id=1)
            outcomes.append("ok")
        except store.PairFull:
            outcomes.append("full")
        finally:
            own.dispose()

    threads = [threading.Thread(target=one, args=(i,)) for i in annotator_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes
