"""The labelling database: SQLAlchemy Core tables, SQLite (WAL) by default, PostgreSQL by URL.

Every write is one transaction that commits before the caller answers the browser, so an
acknowledged label survives a crash. SQLite runs in WAL mode with synchronous=FULL (a commit is on
disk, not just in the OS cache) and a busy timeout, so concurrent annotators queue instead of
failing. Tokens and session ids are stored only as SHA-256 hashes: they are 32 random bytes, so a
fast hash is enough (no dictionary to attack).

Writes that must see a consistent count (assigning a pair, adding a label) run in `locked()`: one
writer at a time, on SQLite through BEGIN IMMEDIATE and on PostgreSQL through a transaction-scoped
advisory lock, so "fewer than `overlap` labels" is still true when the row is inserted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from rlhf.errors import RlhfError

metadata = MetaData()
meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
prompts = Table(
    "prompts", metadata, Column("id", Integer, primary_key=True), Column("messages", Text, nullable=False)
)  # JSON list of chat messages
candidates = Table(
    "candidates",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("prompt_id", ForeignKey("prompts.id"), nullable=False, index=True),
    Column("text", Text, nullable=False),
    Column("source", Text, nullable=False),  # model directory or candidates file
    Column("settings", Text, nullable=False),
)  # JSON: sampling settings that produced it
pairs = Table(
    "pairs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("prompt_id", ForeignKey("prompts.id"), nullable=False),
    Column("a_id", ForeignKey("candidates.id"), nullable=False),
    Column("b_id", ForeignKey("candidates.id"), nullable=False),
    Column("priority", Float, nullable=False),
)  # served lowest first
annotators = Table(
    "annotators",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # "revoked-..." once revoked
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("pair_id", ForeignKey("pairs.id"), nullable=False),
    Column("annotator_id", ForeignKey("annotators.id"), nullable=False, index=True),
    Column("choice", String(16), nullable=False),  # a | b | tie | both_bad
    Column("strength", Integer),  # 1-3, how much better the chosen side is
    Column("comment", Text, nullable=False, default=""),
    Column("left_id", ForeignKey("candidates.id"), nullable=False),  # what was shown on the left
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("pair_id", "annotator_id", name="one_label_per_annotator"),
)
skips = Table(
    "skips",
    metadata,
    Column("pair_id", ForeignKey("pairs.id"), primary_key=True),
    Column("annotator_id", ForeignKey("annotators.id"), primary_key=True),
)
# Browser sign-ins: the cookie holds a random id, the database its hash and when it stops working.
sessions = Table(
    "sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("annotator_id", ForeignKey("annotators.id"), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
# Which pair was served to whom. A row is a lease while expires_at is in the future (it holds one of
# the pair's `overlap` places); labelling or skipping ends the lease, and the row stays as the record
# that the pair was served, which a label needs.
assignments = Table(
    "assignments",
    metadata,
    Column("pair_id", ForeignKey("pairs.id"), primary_key=True),
    Column("annotator_id", ForeignKey("annotators.id"), primary_key=True),
    Column("served_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("assignments_by_annotator", "annotator_id", "expires_at"),
)
# Labelling batches (`rlhf rounds`): each round opens one batch of pairs sampled from the current
# policy; a pair belongs to at most one batch. A closed batch's pairs are no longer served.
batches = Table(
    "batches",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),  # e.g. "round-2"
    Column("policy", Text, nullable=False),  # the model directory that produced its candidates
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True)),
)
batch_pairs = Table(
    "batch_pairs",
    metadata,
    Column("pair_id", ForeignKey("pairs.id"), primary_key=True),
    Column("batch_id", ForeignKey("batches.id"), nullable=False, index=True),
)
ADDED_LATER = [sessions, assignments, batches, batch_pairs]  # created on connect in projects made before they existed
ADVISORY_LOCK = 0x72_6C_68_66  # "rlhf": the PostgreSQL advisory lock that serialises assignment writes


class LabelError(RlhfError, ValueError):
    """A labelling command that cannot run as given; the message names what to fix."""


class AlreadyLabelled(Exception):
    """This annotator has labelled this pair already."""


class NotServed(Exception):
    """A label or skip for a pair the server never served to this annotator."""


class PairFull(Exception):
    """The pair has `overlap` labels (or places held by others) already."""


def db_url(db: str) -> str:
    """A path is an SQLite file; anything with '://' is a SQLAlchemy URL (postgresql+psycopg://...)."""
    return db if "://" in db else f"sqlite:///{Path(db).resolve()}"


def connect(db: str, create: bool = False) -> Engine:
    url = db_url(db)
    if url.startswith("sqlite") and not create and not Path(url.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no labelling database at {db}; create it with `rlhf label init --db {db} ...`")
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=20, max_overflow=20
        )
        _sqlite_events(engine)
    else:
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
    if create:
        metadata.create_all(engine)
    elif inspect(engine).has_table("pairs"):
        metadata.create_all(engine, tables=ADDED_LATER)  # checkfirst: only what an older project lacks
    return engine


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver leaves BEGIN to us (below), so a writer can lock up front
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # IMMEDIATE takes the write lock before the first read: a count read in the transaction
        # stays true until commit, and the busy timeout queues writers instead of failing them.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write_lock") else "BEGIN")


_process_locks: dict[int, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def _process_lock(engine: Engine) -> threading.Lock:
    with _process_locks_guard:
        return _process_locks.setdefault(id(engine), threading.Lock())


@contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """One write transaction at a time: what it counts cannot change before it commits.

    The database lock is what makes it true across processes; the in-process lock in front of it
    queues this server's own threads without SQLite's busy handler, which sleeps and polls (with
    20 writers waiting that was a 1.4 s p99)."""
    with _process_lock(engine), engine.execution_options(write_lock=True).begin() as c:
        if c.dialect.name == "postgresql":
            c.execute(text("select pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
        yield c


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def hash_token(token: str) -> str:
    # surrogatepass: a lone surrogate pasted into the form hashes to something that matches nothing
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def add_annotator(engine: Engine, name: str, is_admin: bool = False, token: str | None = None) -> str:
    """Create an annotator; returns the token (shown once, stored only as a hash). `token`: one
    made by the caller (`rlhf rounds` keeps its scripted annotators' tokens to sign in again)."""
    token = token or secrets.token_urlsafe(32)
    try:
        with engine.begin() as c:
            c.execute(
                annotators.insert().values(name=name, token_hash=hash_token(token), is_admin=is_admin, created_at=now())
            )
    except IntegrityError:
        raise ValueError(f"an annotator named {name!r} exists already") from None
    return token


def annotator_for(engine: Engine, token: str | None) -> dict[str, Any] | None:
    if not token:
        return None
    with engine.connect() as c:
        row = c.execute(select(annotators).where(annotators.c.token_hash == hash_token(token))).mappings().first()
    return dict(row) if row else None


def new_session(engine: Engine, annotator_id: int, lifetime_s: float) -> str:
    """Start a browser session; returns its id (the cookie), stored only as a hash."""
    sid = secrets.token_urlsafe(32)
    t = now()
    with locked(engine) as c:
        c.execute(sessions.delete().where(sessions.c.expires_at <= t))  # housekeeping: expired ones are dead
        c.execute(
            sessions.insert().values(
                id_hash=hash_token(sid),
                annotator_id=annotator_id,
                created_at=t,
                expires_at=t + dt.timedelta(seconds=lifetime_s),
            )
        )
    return sid


def annotator_for_session(engine: Engine, sid: str | None) -> dict[str, Any] | None:
    if not sid:
        return None
    q = (
        select(annotators)
        .join(sessions, sessions.c.annotator_id == annotators.c.id)
        .where(sessions.c.id_hash == hash_token(sid), sessions.c.expires_at > now())
    )
    with engine.connect() as c:
        row = c.execute(q).mappings().first()
    return dict(row) if row else None


def end_session(engine: Engine, sid: str | None) -> None:
    if sid:
        with locked(engine) as c:
            c.execute(sessions.delete().where(sessions.c.id_hash == hash_token(sid)))


def revoke(engine: Engine, name: str) -> int:
    """Make an annotator's token useless, end their sessions and release the pair they hold.
    Their labels stay. Returns how many sessions were ended."""
    with locked(engine) as c:
        who = c.execute(select(annotators.c.id).where(annotators.c.name == name)).scalar()
        if who is None:
            raise LabelError(f"no annotator named {name!r} (see `rlhf label stats` for the names)")
        # a value no token hashes to (not hex), unique like every token hash
        c.execute(
            annotators.update().where(annotators.c.id == who).values(token_hash=f"revoked-{secrets.token_hex(28)}")
        )
        ended = c.execute(sessions.delete().where(sessions.c.annotator_id == who)).rowcount
        t = now()
        c.execute(
            assignments.update()
            .where(assignments.c.annotator_id == who, assignments.c.expires_at > t)
            .values(expires_at=t)
        )
    return int(ended)


def overlap(conn: Engine | Connection) -> int:
    q = select(meta.c.value).where(meta.c.key == "overlap")
    if isinstance(conn, Connection):
        return int(conn.execute(q).scalar() or 1)
    with conn.connect() as c:
        return int(c.execute(q).scalar() or 1)


MODES = ("pairs", "single")
"""'pairs': which of two responses is better; 'single': is this one response good or bad (KTO data).
A single-response item is stored as a pair of one candidate with itself (a_id == b_id)."""
CHOICES = {"pairs": ("a", "b", "tie", "both_bad"), "single": ("good", "bad")}


def mode(engine: Engine) -> str:
    """The project's labelling mode; projects made before modes existed are 'pairs'."""
    with engine.connect() as c:
        return c.execute(select(meta.c.value).where(meta.c.key == "mode")).scalar() or "pairs"


def pair(engine: Engine, pair_id: int) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(select(pairs).where(pairs.c.id == pair_id)).mappings().first()
    return dict(row) if row else None
