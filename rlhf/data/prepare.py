"""From data sources to deterministic train / validation / test splits, with an honest report.

Order per source: read -> normalise (bad rows dropped or fatal) -> drop empty -> drop too long ->
deduplicate -> split (seeded). Then the sources' training splits are mixed by weight. Validation
and test are split per source *before* mixing, so an upsampled source never leaks copies of its
validation rows into training. The mixture is a dozen lines of seeded index sampling rather than
`datasets.interleave_datasets`, whose stopping rules make the resulting size hard to predict.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from rlhf.config import DataConfig, DataSource
from rlhf.data.formats import EmptyRow, RowError
from rlhf.data.io import SUFFIXES, DataError, fingerprint, read_rows

T = TypeVar("T")
MAX_LISTED = 10  # bad rows quoted in an error message / the report


@dataclass
class SourceReport:
    """What happened to one source's rows; stored in the manifest and printed at start-up."""

    path: str
    fingerprint: str
    rows_read: int = 0
    bad: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "file:line N: reason", first few
    empty: int = 0
    too_long: int = 0
    duplicates: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # stage-specific drops, by reason
    train: int = 0
    validation: int = 0
    test: int = 0
    weight: float = 1.0

    def summary(self) -> str:
        extra = "".join(f", {n} {r}" for r, n in sorted(self.filtered.items()))
        return (
            f"{self.path}: {self.rows_read} rows read, {self.bad} bad, {self.empty} empty, "
            f"{self.too_long} too long, {self.duplicates} duplicates{extra} -> "
            f"train {self.train} / validation {self.validation} / test {self.test}"
        )


@dataclass
class Splits(Generic[T]):
    train: list[T]
    validation: list[T]
    test: list[T]
    sources: list[SourceReport]
    train_fingerprint: str = ""
    train_tokens: int | None = None  # set by the stage, which knows the tokenizer

    def report(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "train_tokens": self.train_tokens,
            "train_fingerprint": self.train_fingerprint,
            "sources": [asdict(s) for s in self.sources],
        }


def _key(row: Any) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def rows_fingerprint(rows: list[Any]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(_key(row).encode())
    return h.hexdigest()


def split_rows(rows: list[T], validation: float, test: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    """Seeded shuffle, then cut. A non-zero fraction of a non-trivial source gets at least one row."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)

    def count(frac: float) -> int:
        return 0 if frac == 0 or len(rows) < 3 else max(1, round(frac * len(rows)))

    n_val, n_test = count(validation), count(test)
    val = [rows[i] for i in order[:n_val]]
    tst = [rows[i] for i in order[n_val : n_val + n_test]]
    train = [rows[i] for i in order[n_val + n_test :]]
    return train, val, tst


def mix(parts: list[list[T]], weights: list[float], size: int, seed: int) -> list[T]:
    """Draw `size` rows with source i contributing round(size * w_i / sum w) of them.

    A source asked for fewer rows than it has is subsampled without replacement; one asked for
    more is repeated whole and topped up by sampling (upsampling). The result is shuffled.
    """
    rng = random.Random(seed)
    total = sum(weights)
    out: list[T] = []
    for rows, w in zip(parts, weights):
        want = round(size * w / total)
        if not rows or want == 0:
            continue
        full, rest = divmod(want, len(rows))
        out.extend(rows * full)
        out.extend(rng.sample(rows, rest))
    rng.shuffle(out)
    return out


def _load_source(
    src: DataSource,
    cfg: DataConfig,
    normalize: Callable[[dict], T],
    length_of: Callable[[T], int] | None,
    extra_filter: Callable[[T], str | None] | None,
    recipe_key: str,
) -> tuple[list[T], SourceReport]:
    require_source(src.path, recipe_key)
    report = SourceReport(path=src.path, fingerprint=fingerprint(src.path), weight=src.weight)
    kept: list[T] = []
    seen: set[str] = set()
    filtered: Counter[str] = Counter()
    for row in read_rows(src.path, src.split, src.config):
        report.rows_read += 1
        try:
            if row.data is None:
                raise RowError(row.error or "unreadable")
            example = normalize(row.data)
        except EmptyRow:
            report.empty += 1
            continue
        except RowError as e:
            report.bad += 1
            if len(report.bad_examples) < MAX_LISTED:
                report.bad_examples.append(f"{row.where}: {e}")
            continue
        reason = extra_filter(example) if extra_filter else None
        if reason:
            filtered[reason] += 1
            continue
        if length_of is not None and length_of(example) > cfg.max_length:
            if cfg.too_long == "error":
                raise DataError(
                    f"{row.where}: {length_of(example)} tokens, over data.max_length={cfg.max_length} "
                    "(data.too_long: error); raise max_length or set data.too_long=drop"
                )
            report.too_long += 1
            continue
        if cfg.deduplicate:
            key = _key(example)
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
        kept.append(example)
    report.filtered = dict(filtered)
    if report.bad and cfg.bad_rows == "error":
        listed = "\n  ".join(report.bad_examples)
        more = f"\n  ... and {report.bad - len(report.bad_examples)} more" if report.bad > MAX_LISTED else ""
        raise DataError(
            f"{report.bad} malformed row(s) in {src.path} (data.bad_rows: error):\n  {listed}{more}\n"
            "Fix them, or set data.bad_rows=drop to skip and count them."
        )
    return kept, report


def require_source(path: str, key: str) -> None:
    """Raise a DataError naming the recipe key when a local source is missing (a hub id is left to
    `read_rows`). Checked before anything reads the file, so the user sees which key to fix and
    where such files come from rather than a bare FileNotFoundError from hashing it."""
    from rlhf.hub import is_hub_id

    # A name ending in a data file's suffix is a local file even when it looks like owner/name
    # (`data/x.jsonl`): hub dataset ids carry no such suffix.
    local_file = Path(path).suffix.lower() in SUFFIXES
    if Path(path).exists() or (is_hub_id(str(path)) and not local_file):
        return
    raise DataError(
        f"{key}: data source {str(path)!r} does not exist. Task files are written by "
        "`rlhf tasks build TASK --out DIR` and models by `rlhf models get`; a recipe's header "
        "comment gives the commands that make its inputs."
    )


def prepare_splits(
    cfg: DataConfig,
    normalize: Callable[[dict], T],
    length_of: Callable[[T], int] | None = None,
    extra_filter: Callable[[T], str | None] | None = None,
    key: str = "data",
) -> Splits[T]:
    """Load, clean, split and mix every source of `cfg`.

    Args:
        normalize: raw row -> canonical example; raises RowError (malformed) or EmptyRow.
        length_of: canonical example -> token count, for the `max_length` filter.
        extra_filter: canonical example -> a drop reason or None (stage-specific cleaning).
        key: the recipe key of `cfg` (`data`, `prompts`, ...), named in errors.
    """
    trains, vals, tests, reports = [], [], [], []
    for i, src in enumerate(cfg.sources):
        rows, report = _load_source(src, cfg, normalize, length_of, extra_filter, f"{key}.sources[{i}].path")
        train, val, test = split_rows(rows, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed + i)
        report.train, report.validation, report.test = len(train), len(val), len(test)
        trains.append(train), vals.append(val), tests.append(test), reports.append(report)
    if len(trains) == 1 and cfg.mixture_size is None:
        train = trains[0]
    else:
        size = cfg.mixture_size or sum(len(t) for t in trains)
        train = mix(trains, [s.weight for s in cfg.sources], size, cfg.split_seed)
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    if not train:
        listed = "\n  ".join(r.summary() for r in reports)
        raise DataError(f"no training rows left after cleaning:\n  {listed}")
    validation = [row for part in vals for row in part]
    test = [row for part in tests for row in part]
    return Splits(train, validation, test, reports, rows_fingerprint(train))


def read_whole(
    source: DataSource | str, normalize: Callable[[dict], T], deduplicate: bool = True, key: str = "path"
) -> list[T]:
    """Every clean row of one source, in file order: no split, no mixing, no length filter (prompt
    files for generation and evaluation, few-shot demonstrations, the labelling app's prompts).
    `key` is the recipe key or option that named the source, quoted when it is missing."""
    src = source if isinstance(source, DataSource) else DataSource(path=source)
    require_source(src.path, key)
    cfg = DataConfig(sources=[src], validation_fraction=0.0, deduplicate=deduplicate, max_length=10**9)
    return prepare_splits(cfg, normalize, key=key).train
