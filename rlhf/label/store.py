"""The labelling database: SQLAlchemy Core tables, SQLite (WAL) by default, PostgreSQL by URL.

Every write is one transaction that commits before the caller answers the browser, so an
acknowledged label survives a crash. SQLite runs in WAL mode with synchronous=FULL (a commit is on
disk, not just in the OS cache) and a busy timeout, so concurrent annotators queue instead of
failing. Tokens are stored only as SHA-256 hashes: they are 32 random bytes, so a fast hash is
enough (no dictionary to attack).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import (Boolean, Column, DateTime, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = MetaData()
meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
prompts = Table("prompts", metadata, Column("id", Integer, primary_key=True),
                Column("messages", Text, nullable=False))  # JSON list of chat messages
candidates = Table("candidates", metadata, Column("id", Integer, primary_key=True),
                   Column("prompt_id", ForeignKey("prompts.id"), nullable=False, index=True),
                   Column("text", Text, nullable=False),
                   Column("source", Text, nullable=False),  # model directory or candidates file
                   Column("settings", Text, nullable=False))  # JSON: sampling settings that produced it
pairs = Table("pairs", metadata, Column("id", Integer, primary_key=True),
              Column("prompt_id", ForeignKey("prompts.id"), nullable=False),
              Column("a_id", ForeignKey("candidates.id"), nullable=False),
              Column("b_id", ForeignKey("candidates.id"), nullable=False),
              Column("priority", Float, nullable=False))  # served lowest first
annotators = Table("annotators", metadata, Column("id", Integer, primary_key=True),
                   Column("name", String(200), nullable=False, unique=True),
                   Column("token_hash", String(64), nullable=False, unique=True),
                   Column("is_admin", Boolean, nullable=False, default=False),
                   Column("created_at", DateTime(timezone=True), nullable=False))
labels = Table("labels", metadata, Column("id", Integer, primary_key=True),
               Column("pair_id", ForeignKey("pairs.id"), nullable=False),
               Column("annotator_id", ForeignKey("annotators.id"), nullable=False, index=True),
               Column("choice", String(16), nullable=False),  # a | b | tie | both_bad
               Column("strength", Integer),  # 1-3, how much better the chosen side is
               Column("comment", Text, nullable=False, default=""),
               Column("left_id", ForeignKey("candidates.id"), nullable=False),  # what was shown on the left
               Column("created_at", DateTime(timezone=True), nullable=False),
               UniqueConstraint("pair_id", "annotator_id", name="one_label_per_annotator"))
skips = Table("skips", metadata, Column("pair_id", ForeignKey("pairs.id"), primary_key=True),
              Column("annotator_id", ForeignKey("annotators.id"), primary_key=True))


class AlreadyLabelled(Exception):
    """This annotator has labelled this pair already."""


def db_url(db: str) -> str:
    """A path is an SQLite file; anything with '://' is a SQLAlchemy URL (postgresql+psycopg://...)."""
    return db if "://" in db else f"sqlite:///{Path(db).resolve()}"


def connect(db: str, create: bool = False) -> Engine:
    url = db_url(db)
    if url.startswith("sqlite") and not create and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no labelling database at {db}; create it with `rlhf label init --db {db} ...`")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20,
                               max_overflow=20)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()
    else:
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
    if create:
        metadata.create_all(engine)
    return engine


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_annotator(engine: Engine, name: str, is_admin: bool = False) -> str:
    """Create an annotator; returns the token (shown once, stored only as a hash)."""
    token = secrets.token_urlsafe(32)
    try:
        with engine.begin() as c:
            c.execute(annotators.insert().values(name=name, token_hash=hash_token(token), is_admin=is_admin,
                                                 created_at=now()))
    except IntegrityError:
        raise ValueError(f"an annotator named {name!r} exists already") from None
    return token


def annotator_for(engine: Engine, token: str | None) -> dict[str, Any] | None:
    if not token:
        return None
    with engine.connect() as c:
        row = c.execute(select(annotators).where(annotators.c.token_hash == hash_token(token))).mappings().first()
    return dict(row) if row else None


def overlap(engine: Engine) -> int:
    with engine.connect() as c:
        v = c.execute(select(meta.c.value).where(meta.c.key == "overlap")).scalar()
    return int(v or 1)


def next_pair(engine: Engine, annotator_id: int) -> dict[str, Any] | None:
    """The next pair for this annotator: not labelled or skipped by them, with fewer than `overlap`
    labels, fewest labels first (spreads work), then by priority (active sampling or random)."""
    k = overlap(engine)
    n_labels = select(func.count()).where(labels.c.pair_id == pairs.c.id).scalar_subquery()
    mine = select(labels.c.pair_id).where(labels.c.annotator_id == annotator_id)
    skipped = select(skips.c.pair_id).where(skips.c.annotator_id == annotator_id)
    q = (select(pairs, n_labels.label("n")).where(pairs.c.id.not_in(mine), pairs.c.id.not_in(skipped), n_labels < k)
         .order_by(n_labels, pairs.c.priority, pairs.c.id).limit(1))
    with engine.connect() as c:
        row = c.execute(q).mappings().first()
        if row is None:
            return None
        cands = {r.id: r for r in c.execute(select(candidates).where(candidates.c.id.in_([row.a_id, row.b_id])))}
        prompt = c.execute(select(prompts.c.messages).where(prompts.c.id == row.prompt_id)).scalar()
    return {"pair_id": row.id, "prompt": json.loads(prompt), "a_id": row.a_id, "b_id": row.b_id,
            "a": cands[row.a_id].text, "b": cands[row.b_id].text}


def pair(engine: Engine, pair_id: int) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(pairs).where(pairs.c.id == pair_id)).mappings().first()
    return dict(row) if row else None


def add_label(engine: Engine, *, pair_id: int, annotator_id: int, choice: str, strength: int | None, comment: str,
              left_id: int) -> int:
    """Insert one label in its own transaction (committed on return); AlreadyLabelled on a repeat."""
    try:
        with engine.begin() as c:
            return c.execute(labels.insert().values(pair_id=pair_id, annotator_id=annotator_id, choice=choice,
                                                    strength=strength, comment=comment, left_id=left_id,
                                                    created_at=now())).inserted_primary_key[0]
    except IntegrityError:
        raise AlreadyLabelled(f"pair {pair_id} is labelled by this annotator already") from None


def add_skip(engine: Engine, pair_id: int, annotator_id: int) -> None:
    try:
        with engine.begin() as c:
            c.execute(skips.insert().values(pair_id=pair_id, annotator_id=annotator_id))
    except IntegrityError:
        pass  # skipping twice is still one skip


def progress(engine: Engine, annotator_id: int) -> dict[str, int]:
    """Labels this annotator gave, and pairs still waiting for anyone's label."""
    k = overlap(engine)
    with engine.connect() as c:
        done = c.execute(select(func.count()).where(labels.c.annotator_id == annotator_id)).scalar()
        n_labels = select(func.count()).where(labels.c.pair_id == pairs.c.id).scalar_subquery()
        open_pairs = c.execute(select(func.count()).select_from(pairs).where(n_labels < k)).scalar()
    return {"done": int(done), "open": int(open_pairs)}


def own_labels(engine: Engine, annotator_id: int) -> list[dict[str, Any]]:
    with engine.connect() as c:
        rows = c.execute(select(labels.c.id, labels.c.pair_id, labels.c.choice, labels.c.strength, labels.c.comment,
                                labels.c.created_at).where(labels.c.annotator_id == annotator_id)
                         .order_by(labels.c.id)).mappings().all()
    return [{**r, "created_at": r["created_at"].isoformat()} for r in rows]
