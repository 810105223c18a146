"""Fair assignment: which pair an annotator labels next, and the checks a label must pass.

A pair has `overlap` places. Serving a pair to an annotator takes one of them with a lease (an
`assignments` row whose expires_at is in the future); labelling or skipping ends the lease, and a
lease nobody uses expires by itself, which frees the place. So, with every count taken under the
single writer lock (store.locked):
- a pair is only served while labels + live leases < overlap: no two annotators race for the last place;
- a label needs the pair to have been served to that annotator (the assignments row), and is
  refused when the pair is full: never more than `overlap` labels on one pair;
- an annotator has at most one live lease: asking again returns the same pair (a reload, a retry).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from rlhf.label.store import (
    AlreadyLabelled,
    NotServed,
    PairFull,
    assignments,
    batch_pairs,
    batches,
    candidates,
    labels,
    locked,
    now,
    overlap,
    pairs,
    prompts,
    skips,
)

DEFAULT_LEASE_S = 600.0  # 10 minutes to label a served pair before its place goes back to the pool


def _filled(pair_col, t: dt.datetime, other_than: int | None = None):
    """Labels on a pair plus live leases on it (those of `other_than` aside): its places in use."""
    n_labels = select(func.count()).where(labels.c.pair_id == pair_col).scalar_subquery()
    held = (
        select(func.count())
        .select_from(assignments)
        .where(assignments.c.pair_id == pair_col, assignments.c.expires_at > t)
    )
    if other_than is not None:
        held = held.where(assignments.c.annotator_id != other_than)
    return n_labels + held.scalar_subquery()


def _closed():
    """Pairs of closed batches (`rlhf rounds`): their round has exported its labels, so they are
    neither served nor labelled any more."""
    return (
        select(batch_pairs.c.pair_id)
        .join(batches, batches.c.id == batch_pairs.c.batch_id)
        .where(batches.c.closed_at.is_not(None))
    )


def _held(c: Connection, annotator_id: int, t: dt.datetime) -> int | None:
    q = (
        select(assignments.c.pair_id)
        .where(
            assignments.c.annotator_id == annotator_id,
            assignments.c.expires_at > t,
            assignments.c.pair_id.not_in(_closed()),
        )
        .order_by(assignments.c.served_at)
        .limit(1)
    )
    return c.execute(q).scalar()


def _pick(c: Connection, annotator_id: int, t: dt.datetime) -> int | None:
    """Fewest places in use first (spreads the work), then priority (active sampling or random)."""
    filled = _filled(pairs.c.id, t)
    mine = select(labels.c.pair_id).where(labels.c.annotator_id == annotator_id)
    skipped = select(skips.c.pair_id).where(skips.c.annotator_id == annotator_id)
    q = (
        select(pairs.c.id)
        .where(pairs.c.id.not_in(mine), pairs.c.id.not_in(skipped), pairs.c.id.not_in(_closed()), filled < overlap(c))
        .order_by(filled, pairs.c.priority, pairs.c.id)
        .limit(1)
    )
    return c.execute(q).scalar()


def _lease(c: Connection, pair_id: int, annotator_id: int, t: dt.datetime, lease_s: float) -> None:
    until = t + dt.timedelta(seconds=lease_s)
    key = (assignments.c.pair_id == pair_id) & (assignments.c.annotator_id == annotator_id)
    if c.execute(assignments.update().where(key).values(served_at=t, expires_at=until)).rowcount == 0:
        c.execute(
            assignments.insert().values(pair_id=pair_id, annotator_id=annotator_id, served_at=t, expires_at=until)
        )


def _end_lease(c: Connection, pair_id: int, annotator_id: int, t: dt.datetime) -> None:
    c.execute(
        assignments.update()
        .where(
            assignments.c.pair_id == pair_id, assignments.c.annotator_id == annotator_id, assignments.c.expires_at > t
        )
        .values(expires_at=t)
    )


def next_pair(engine: Engine, annotator_id: int, lease_s: float = DEFAULT_LEASE_S) -> dict[str, Any] | None:
    """The pair this annotator holds, or a new one leased to them for `lease_s` seconds; None when
    nothing is left for them."""
    with locked(engine) as c:
        t = now()
        pair_id = _held(c, annotator_id, t)
        if pair_id is None:
            pair_id = _pick(c, annotator_id, t)
            if pair_id is None:
                return None
            _lease(c, pair_id, annotator_id, t, lease_s)
    return _load(engine, pair_id)


def _load(engine: Engine, pair_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        row = c.execute(select(pairs).where(pairs.c.id == pair_id)).one()
        cands = {r.id: r for r in c.execute(select(candidates).where(candidates.c.id.in_([row.a_id, row.b_id])))}
        prompt = c.execute(select(prompts.c.messages).where(prompts.c.id == row.prompt_id)).scalar()
    return {
        "pair_id": row.id,
        "prompt": json.loads(prompt),
        "a_id": row.a_id,
        "b_id": row.b_id,
        "a": cands[row.a_id].text,
        "b": cands[row.b_id].text,
    }


def _check_may_label(c: Connection, pair_id: int, annotator_id: int, t: dt.datetime) -> None:
    mine = (labels.c.pair_id == pair_id) & (labels.c.annotator_id == annotator_id)
    if c.execute(select(labels.c.id).where(mine)).first() is not None:
        raise AlreadyLabelled(f"pair {pair_id} is labelled by this annotator already")
    if c.execute(
        select(batch_pairs.c.pair_id).where(batch_pairs.c.pair_id.in_(_closed()), batch_pairs.c.pair_id == pair_id)
    ).first():
        # its round exported the batch already: a label now would be stored but never trained on
        raise PairFull(f"pair {pair_id} belongs to a closed labelling batch; ask /api/next for a current pair")
    served = (assignments.c.pair_id == pair_id) & (assignments.c.annotator_id == annotator_id)
    if c.execute(select(assignments.c.pair_id).where(served)).first() is None:
        raise NotServed(f"pair {pair_id} was not served to you; label the pair /api/next gives you")
    # A lapsed lease still lets its holder label while a place is free; others' live leases keep theirs.
    if c.execute(select(_filled(pair_id, t, other_than=annotator_id))).scalar() >= overlap(c):
        raise PairFull(f"pair {pair_id} has all the labels it needs (your reservation had expired)")


def add_label(
    engine: Engine, *, pair_id: int, annotator_id: int, choice: str, strength: int | None, comment: str, left_id: int
) -> int:
    """Insert one label in its own transaction (committed on return), after the checks above."""
    try:
        with locked(engine) as c:
            t = now()
            _check_may_label(c, pair_id, annotator_id, t)
            label_id = c.execute(
                labels.insert().values(
                    pair_id=pair_id,
                    annotator_id=annotator_id,
                    choice=choice,
                    strength=strength,
                    comment=comment,
                    left_id=left_id,
                    created_at=t,
                )
            ).inserted_primary_key[0]
            _end_lease(c, pair_id, annotator_id, t)
            return label_id
    except IntegrityError:  # the unique constraint, should a writer ever get past the lock
        raise AlreadyLabelled(f"pair {pair_id} is labelled by this annotator already") from None


def add_skip(engine: Engine, pair_id: int, annotator_id: int) -> None:
    """Skip a served pair: it is not offered to this annotator again, and its place is freed."""
    with locked(engine) as c:
        served = (assignments.c.pair_id == pair_id) & (assignments.c.annotator_id == annotator_id)
        if c.execute(select(assignments.c.pair_id).where(served)).first() is None:
            raise NotServed(f"pair {pair_id} was not served to you")
        mine = (skips.c.pair_id == pair_id) & (skips.c.annotator_id == annotator_id)
        if c.execute(select(skips.c.pair_id).where(mine)).first() is None:  # skipping twice is still one skip
            c.execute(skips.insert().values(pair_id=pair_id, annotator_id=annotator_id))
        _end_lease(c, pair_id, annotator_id, now())


def progress(engine: Engine, annotator_id: int) -> dict[str, int]:
    """Labels this annotator gave, and pairs still waiting for anyone's label."""
    with engine.connect() as c:
        k = overlap(c)
        done = c.execute(select(func.count()).where(labels.c.annotator_id == annotator_id)).scalar()
        n_labels = select(func.count()).where(labels.c.pair_id == pairs.c.id).scalar_subquery()
        open_pairs = c.execute(
            select(func.count()).select_from(pairs).where(n_labels < k, pairs.c.id.not_in(_closed()))
        ).scalar()
    return {"done": int(done), "open": int(open_pairs)}


def own_labels(engine: Engine, annotator_id: int) -> list[dict[str, Any]]:
    with engine.connect() as c:
        rows = (
            c.execute(
                select(
                    labels.c.id,
                    labels.c.pair_id,
                    labels.c.choice,
                    labels.c.strength,
                    labels.c.comment,
                    labels.c.created_at,
                )
                .where(labels.c.annotator_id == annotator_id)
                .order_by(labels.c.id)
            )
            .mappings()
            .all()
        )
    return [{**r, "created_at": r["created_at"].isoformat()} for r in rows]
