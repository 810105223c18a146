"""Labelling batches: the label database one `rlhf rounds` run shares across its rounds.

One database (so one URL and one token per person for the whole run) holds every round's pairs.
Round k opens a batch of pairs sampled from the round's policy; people label it in the app as
usual (`rlhf label serve --db <run>/labels.sqlite`); the round waits until every pair of the batch
has `min_labels` labels, then closes the batch (its pairs are no longer served) and exports it.

A batch is written in one transaction with its prompts, candidates and pairs, so after a crash it
either exists whole or not at all, and opening it again is a no-op: nothing is sampled twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from rlhf.data.formats import Messages
from rlhf.label import project, store


@dataclass(frozen=True)
class PairToLabel:
    prompt: Messages
    a: str
    b: str
    priority: float  # served lowest first: the reward model's certainty |P(a > b) - 1/2|


def open_project(db: str, overlap: int) -> Engine:
    """The run's database: created (mode 'pairs', the given overlap) when missing, else opened.
    An existing database with another overlap is refused: its pairs were promised that many labels."""
    exists = not store.db_url(db).startswith("sqlite") or Path(db).exists()
    engine = store.connect(db, create=not exists)
    if not exists or _meta(engine, "overlap") is None:
        with engine.begin() as c:
            c.execute(
                store.meta.insert(),
                [
                    {"key": "overlap", "value": str(overlap)},
                    {"key": "mode", "value": "pairs"},
                    {"key": "created_at", "value": store.now().isoformat()},
                ],
            )
    elif store.overlap(engine) != overlap or store.mode(engine) != "pairs":
        raise store.LabelError(
            f"{db} is a labelling project with overlap {store.overlap(engine)} and mode {store.mode(engine)}; "
            f"this run asks for overlap {overlap} in pairs mode (use another output_dir, or the same overlap)"
        )
    return engine


def _meta(engine: Engine, key: str) -> str | None:
    with engine.connect() as c:
        return c.execute(select(store.meta.c.value).where(store.meta.c.key == key)).scalar()


def batch_id(engine: Engine, name: str) -> int | None:
    with engine.connect() as c:
        return c.execute(select(store.batches.c.id).where(store.batches.c.name == name)).scalar()


def _batch_id(c, name: str) -> int | None:
    return c.execute(select(store.batches.c.id).where(store.batches.c.name == name)).scalar()


def open_batch(engine: Engine, name: str, policy: str, items: list[PairToLabel], settings: dict[str, Any]) -> int:
    """Write the batch, its prompts, candidates and pairs in one transaction; returns its id. A batch
    of that name that exists already is returned as it is."""
    with store.locked(engine) as c:
        found = _batch_id(c, name)  # checked under the write lock: two writers cannot both insert it
        if found is not None:
            return int(found)
        bid = c.execute(
            store.batches.insert().values(name=name, policy=policy, created_at=store.now())
        ).inserted_primary_key[0]
        for it in items:
            pid = c.execute(store.prompts.insert().values(messages=json.dumps(it.prompt))).inserted_primary_key[0]
            ids = [
                c.execute(
                    store.candidates.insert().values(
                        prompt_id=pid, text=t, source=policy, settings=json.dumps({**settings, "batch": name})
                    )
                ).inserted_primary_key[0]
                for t in (it.a, it.b)
            ]
            pair = c.execute(
                store.pairs.insert().values(prompt_id=pid, a_id=ids[0], b_id=ids[1], priority=it.priority)
            ).inserted_primary_key[0]
            c.execute(store.batch_pairs.insert().values(pair_id=pair, batch_id=bid))
    return int(bid)


def pair_ids(engine: Engine, bid: int) -> set[int]:
    with engine.connect() as c:
        return {r[0] for r in c.execute(select(store.batch_pairs.c.pair_id).where(store.batch_pairs.c.batch_id == bid))}


def progress(engine: Engine, bid: int, min_labels: int) -> tuple[int, int, int]:
    """(pairs with at least `min_labels` labels, pairs in the batch, labels in the batch)."""
    n_labels = select(func.count()).where(store.labels.c.pair_id == store.batch_pairs.c.pair_id).scalar_subquery()
    with engine.connect() as c:
        rows = c.execute(select(n_labels).where(store.batch_pairs.c.batch_id == bid)).scalars().all()
    return sum(n >= min_labels for n in rows), len(rows), int(sum(rows))


def close_batch(engine: Engine, bid: int) -> None:
    """Stop serving and accepting labels for the batch's pairs, and end their leases, in one
    transaction (idempotent: the first close time stays). A label arriving after this is refused
    (409), so every label stored for the batch is in its export."""
    with store.locked(engine) as c:
        t = store.now()
        c.execute(
            store.batches.update()
            .where(store.batches.c.id == bid, store.batches.c.closed_at.is_(None))
            .values(closed_at=t)
        )
        members = select(store.batch_pairs.c.pair_id).where(store.batch_pairs.c.batch_id == bid)
        c.execute(
            store.assignments.update()
            .where(store.assignments.c.pair_id.in_(members), store.assignments.c.expires_at > t)
            .values(expires_at=t)
        )


def export_batch(engine: Engine, bid: int, out: Path, min_labels: int) -> dict[str, int]:
    """The batch's labelled pairs -> the reward stage's JSONL (project.export, majority vote per pair).
    Ties are kept as `tie: true` rows: the reward recipe's `ties` setting decides what they teach."""
    return project.export(engine, out, ties="keep", min_labels=min_labels, only=pair_ids(engine, bid))
