"""Read rows from the files people already have, keeping each row's position for error messages.

JSONL is parsed line by line by hand (not through `datasets.load_dataset("json")`) because a
broken line must be reported with its file and line number, and Arrow's JSON reader stops at
the first bad line without saying where it is. CSV is read with the standard
library's reader for the same reason (pandas stops at a malformed row with a traceback), Parquet
through pandas, saved datasets through `datasets.load_from_disk`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import DataError, HandoffError  # DataError re-exported here for existing imports

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One raw example and where it came from."""

    where: str  # "path:line N" / "path:row N", for messages
    data: dict[str, Any] | None  # None when the row could not even be parsed
    error: str | None = None  # why it could not be parsed


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(Row(where, None, f"not valid JSON ({e.msg})"))
                continue
            rows.append(Row(where, obj, None) if isinstance(obj, dict) else Row(where, None, "not a JSON object"))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}: {e.msg}); for one object per line use .jsonl"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    return [
        Row(f"{path}:item {i}", o, None) if isinstance(o, dict) else Row(f"{path}:item {i}", None, "not an object")
        for i, o in enumerate(obj, start=1)
    ]


def _read_csv(path: Path) -> list[Row]:
    """CSV through the standard library's reader rather than pandas, so that a malformed row is
    named: a row with the wrong number of fields is a bad row (dropped and counted, or fatal, as
    the recipe says), and an unclosed quote, which swallows the rest of the file, stops with the
    line where it opened. Cells stay strings; an empty cell is "" (empty), as with JSONL."""
    import csv

    csv.field_size_limit(2**31 - 1)  # long model answers in one cell are normal here
    rows: list[Row] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV header (line 1: {e})") from None
        n = 0
        while header:
            start = reader.line_num + 1
            try:
                fields = next(reader, None)
            except csv.Error as e:
                raise DataError(
                    f"{path}: malformed CSV in the row starting at line {start}: {e}. An unclosed "
                    "quote takes in every line after it; close it or double the quote inside the "
                    'text ("")'
                ) from None
            if fields is None:
                break
            if not fields:
                continue  # a blank line
            n += 1
            where = f"{path}:row {n} (line {start})"
            if len(fields) != len(header):
                rows.append(Row(where, None, f"has {len(fields)} fields, the header has {len(header)}"))
            else:
                rows.append(Row(where, dict(zip(header, fields)), None))
    return rows


def _records(frame, path: Path, label: str) -> list[Row]:
    return [Row(f"{path}:{label} {i}", rec, None) for i, rec in enumerate(frame.to_dict(orient="records"), start=1)]


def _from_hub(name: str, split: str, config: str | None) -> list[Row]:
    """A hub dataset (`owner/name`), through the Hugging Face cache (works offline once cached)."""
    import datasets

    from rlhf.hub import local_dir

    try:
        local = local_dir(name, "data source", repo_type="dataset")
    except HandoffError as e:
        raise DataError(str(e)) from None
    try:
        ds = datasets.load_dataset(local, name=config, split=split)
    except Exception as e:  # unknown config or split, unreadable files: say which and why
        raise DataError(
            f"data source {name!r} (config {config!r}, split {split!r}): {type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    return [Row(f"{name}[{split}]:row {i}", rec, None) for i, rec in enumerate(ds, start=1)]


def read_rows(path: str | Path, split: str = "train", config: str | None = None) -> list[Row]:
    """All rows of one source, in file order. File-level problems raise `DataError`. A path that
    does not exist locally but looks like `owner/name` is read as a hub dataset (`config`, `split`)."""
    from rlhf.hub import is_hub_id

    if not Path(path).exists() and is_hub_id(str(path)):
        return _from_hub(str(path), split, config)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for "not a saved dataset"
            raise DataError(f"{path}: not a `datasets.save_to_disk` directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: has splits {sorted(ds)}, not {split!r} (set the source's 'split')")
            ds = ds[split]
        return [Row(f"{path}[{split}]:row {i}", rec, None) for i, rec in enumerate(ds, start=1)]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pandas as pd

        return _records(pd.read_parquet(path), path, "row")
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)} or a saved dataset dir"
    )


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (names and bytes), for manifests; a
    hub dataset is fingerprinted by its cached snapshot."""
    from rlhf.hub import is_hub_id, local_dir

    if not Path(path).exists() and is_hub_id(str(path)):
        path = local_dir(str(path), "data source", repo_type="dataset")
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def write_jsonl(rows: list[dict[str, Any]], out_path: str | os.PathLike) -> None:
    """Write rows atomically: an interrupted or failed run leaves the old file (or none), never half
    a file, and no temporary file behind (written next to it, fsynced, then renamed over it)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
