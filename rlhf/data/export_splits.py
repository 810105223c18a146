"""`rlhf data prepare`: clean and split a user's raw data into files the stages read as they are.

The same cleaning and splitting the stages do at start-up (`prepare_splits`), run once and
written out, so a team can look at, version and share exactly what training will see, with a
report of what was dropped and why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rlhf.config import DataConfig, DataSource
from rlhf.data.formats import normalize_preference, normalize_prompt, normalize_sft
from rlhf.data.prepare import Splits, prepare_splits

KINDS: dict[str, Callable[[dict], Any]] = {
    "sft": normalize_sft,
    "preference": normalize_preference,
    "prompt": normalize_prompt,
}


def _row(kind: str, example: Any) -> dict[str, Any]:
    """Canonical example -> a row in the stage's input format (message lists)."""
    if kind == "sft":
        return {"messages": example}
    if kind == "prompt":
        return {"prompt": example}
    return example  # preference rows are already {prompt, chosen, rejected, margin, tie}


def prepare_files(
    inputs: list[str],
    kind: str,
    out: str | Path,
    *,
    validation: float = 0.05,
    test: float = 0.0,
    seed: int = 0,
    max_length: int | None = None,
    tokenizer: str | None = None,
    bad_rows: str = "drop",
) -> dict[str, Any]:
    """Write `<out>/{train,validation,test}.jsonl` and `report.json`; returns the report.

    Lengths are counted in tokens of `tokenizer` when given (as the stages will), else in
    whitespace-separated words, and only when `max_length` is set.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(KINDS)}")
    cfg = DataConfig(
        sources=[DataSource(path=p) for p in inputs],
        validation_fraction=validation,
        test_fraction=test,
        split_seed=seed,
        max_length=max_length or 10**9,
        bad_rows=bad_rows,
    )
    length_of = _length_fn(kind, tokenizer) if max_length else None
    splits: Splits = prepare_splits(cfg, KINDS[kind], length_of)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        with (out / f"{name}.jsonl").open("w") as f:
            for example in rows:
                f.write(json.dumps(_row(kind, example), ensure_ascii=False) + "\n")
    report = {"kind": kind, "seed": seed, **splits.report()}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _length_fn(kind: str, tokenizer: str | None) -> Callable[[Any], int]:
    if tokenizer is None:

        def count(text: str) -> int:
            return len(text.split())
    else:
        from rlhf.models import load_tokenizer

        tok = load_tokenizer(tokenizer)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

    def length(example: Any) -> int:
        if kind == "preference":  # the longer of prompt+chosen and prompt+rejected is what trains
            prompt = sum(count(m["content"]) for m in example["prompt"])
            return prompt + max(sum(count(m["content"]) for m in example[s]) for s in ("chosen", "rejected"))
        return sum(count(m["content"]) for m in example)

    return length
