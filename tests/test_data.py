"""Data: file formats, example formats, bad rows, cleaning, splits and weighted mixtures."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf.config import DataConfig, DataSource
from rlhf.data.formats import EmptyRow, RowError, normalize_sft
from rlhf.data.io import DataError, fingerprint, read_rows
from rlhf.data.prepare import mix, prepare_splits, split_rows

ROWS = [
    {"prompt": "say hi", "completion": "hi"},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say yo"},
            {"role": "assistant", "content": "yo"},
        ]
    },
    {"prompt": [{"role": "user", "content": "say hey"}], "completion": [{"role": "assistant", "content": "hey"}]},
]


def write_jsonl(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


# --- example formats -------------------------------------------------------------------------


def test_normalize_prompt_completion_strings():
    assert normalize_sft(ROWS[0]) == [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]


def test_normalize_messages_and_message_lists():
    assert normalize_sft(ROWS[1])[0] == {"role": "system", "content": "be brief"}
    assert normalize_sft(ROWS[2]) == [{"role": "user", "content": "say hey"}, {"role": "assistant", "content": "hey"}]


def test_messages_as_json_string_from_a_csv_cell():
    row = {"messages": json.dumps(ROWS[1]["messages"])}
    assert normalize_sft(row) == ROWS[1]["messages"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "x"}, "needs 'prompt' and 'completion', or 'messages'; the row has keys: text"),
        ({"prompt": 3, "completion": "x"}, "'prompt' must be a string or a list of messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "has role 'robot'"),
        ({"messages": [{"role": "user"}]}, "must be an object with 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message must be the assistant's"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
            "content' must be a string",
        ),
    ],
)
def test_malformed_rows_say_why(row, reason):
    with pytest.raises(RowError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        normalize_sft(row)


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "x", "completion": "  "},
        {"prompt": "", "completion": "y"},
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ],
)
def test_empty_rows_are_empty_not_malformed(row):
    with pytest.raises(EmptyRow):
        normalize_sft(row)


# --- file formats ----------------------------------------------------------------------------


def test_read_every_file_format_the_same(tmp_path):
    import datasets
    import pandas as pd

    rows = [ROWS[0], {"prompt": "b", "completion": "c"}]
    paths = [write_jsonl(tmp_path / "d.jsonl", rows)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain_dir"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict_dir"))
    paths += [tmp_path / n for n in ("d.json", "w.json", "d.csv", "d.parquet", "plain_dir", "dict_dir")]
    for p in paths:
        got = [r.data for r in read_rows(p)]
        assert got == rows, p


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        read_rows(tmp_path / "bad.json")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS[0]])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'"):
        read_rows(tmp_path / "dd", split="test")


def test_a_missing_source_names_its_recipe_key(tmp_path):
    """A recipe whose data file was never built fails with the key to fix, not a bare
    FileNotFoundError from hashing the file."""
    from rlhf.data.formats import normalize_prompt
    from rlhf.data.prepare import read_whole

    good = write_jsonl(tmp_path / "d.jsonl", [ROWS[0]])
    missing = tmp_path / "never_built.jsonl"
    cfg = DataConfig(sources=[DataSource(path=str(good)), DataSource(path=str(missing))])
    named = r"prompts\.sources\[1\]\.path: data source .*never_built\.jsonl.*`rlhf tasks build"
    with pytest.raises(DataError, match=named):
        prepare_splits(cfg, normalize_sft, key="prompts")
    with pytest.raises(DataError, match=r"^forgetting_prompts\.path: data source .*never_built\.jsonl"):
        read_whole(DataSource(path=str(missing)), normalize_prompt, key="forgetting_prompts.path")
    # A relative path that looks like owner/name is still a file when it has a data suffix.
    with pytest.raises(DataError, match=r"^data\.sources\[0\]\.path: data source 'nodir/never_built\.jsonl'"):
        prepare_splits(DataConfig(sources=[DataSource(path="nodir/never_built.jsonl")]), normalize_sft)
    # The stages look at a source's first rows (chat template needed?) before preparing it.
    from rlhf.stages.common import sources_are_conversational

    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.path: .*never_built"):
        sources_are_conversational(cfg.sources, ("prompt",))


def test_jsonl_bad_lines_keep_their_line_number(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0]], ["{broken", "[1, 2]", "", json.dumps(ROWS[0])])
    rows = read_rows(p)
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["line 1", "line 2", "line 3", "line 5"]
    assert rows[1].data is None and "not valid JSON" in rows[1].error
    assert rows[2].error == "not a JSON object"


def test_fingerprint_changes_with_content(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0]])
    before = fingerprint(p)
    assert fingerprint(p) == before
    write_jsonl(p, [ROWS[1]])
    assert fingerprint(p) != before


# --- cleaning, bad-row policy, splits, mixtures ----------------------------------------------


def messy_file(tmp_path: Path) -> Path:
    good = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    return write_jsonl(
        tmp_path / "messy.jsonl",
        good
        + [good[0], good[1]]
        + [
            {"prompt": "q", "completion": ""},  # empty
            {"prompt": "long " * 100, "completion": "x"},  # too long
            {"question": "no"},  # malformed
        ],
        ["{oops"],
    )


def words(example) -> int:
    return sum(len(m["content"].split()) for m in example)


def test_drop_policy_counts_everything(tmp_path):
    cfg = DataConfig([DataSource(str(messy_file(tmp_path)))], validation_fraction=0.1, max_length=50)
    splits = prepare_splits(cfg, normalize_sft, length_of=words)
    rep = splits.sources[0]
    assert (rep.rows_read, rep.bad, rep.empty, rep.too_long, rep.duplicates) == (46, 2, 1, 1, 2)
    assert rep.bad_examples[0].endswith(
        "messy.jsonl:line 45: needs 'prompt' and 'completion', or 'messages'; the row has keys: question"
    )
    assert "messy.jsonl:line 46: not valid JSON" in rep.bad_examples[1]
    assert len(splits.train) + len(splits.validation) == 40
    assert (rep.train, rep.validation) == (36, 4)
    assert splits.report()["sources"][0]["bad"] == 2


def test_error_policy_rejects_up_front_with_file_and_line(tmp_path):
    cfg = DataConfig([DataSource(str(messy_file(tmp_path)))], bad_rows="error")
    with pytest.raises(DataError, match=r"(?s)2 malformed row\(s\).*messy.jsonl:line 45.*messy.jsonl:line 46"):
        prepare_splits(cfg, normalize_sft)


def test_nothing_left_is_a_clear_error(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "completion": ""}])
    with pytest.raises(DataError, match="no training rows left"):
        prepare_splits(DataConfig([DataSource(str(p))]), normalize_sft)


def test_splits_are_deterministic_disjoint_and_seeded():
    rows = list(range(100))
    a = split_rows(rows, 0.1, 0.2, seed=3)
    assert a == split_rows(rows, 0.1, 0.2, seed=3)
    assert a != split_rows(rows, 0.1, 0.2, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == rows


def test_mixture_follows_weights_and_upsamples():
    big, small = [("big", i) for i in range(100)], [("small", i) for i in range(10)]
    mixed = mix([big, small], [1.0, 3.0], size=80, seed=0)
    counts = Counter(src for src, _ in mixed)
    assert counts == {"big": 20, "small": 60}
    assert len({x for x in mixed if x[0] == "big"}) == 20  # subsampled without replacement
    assert {x for x in mixed if x[0] == "small"} == set(small)  # every small row used, 6 times each
    assert mix([big, small], [1.0, 3.0], 80, seed=0) == mixed


def test_mixture_from_two_sources_keeps_validation_per_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "y"} for i in range(10)])
    cfg = DataConfig(
        [DataSource(str(a), weight=1.0), DataSource(str(b), weight=1.0)], validation_fraction=0.2, mixture_size=60
    )
    splits = prepare_splits(cfg, normalize_sft)
    train_prompts = Counter(ex[0]["content"][0] for ex in splits.train)
    assert train_prompts == {"a": 30, "b": 30}
    val_prompts = {ex[0]["content"] for ex in splits.validation}
    assert len(val_prompts) == 10 + 2
    assert not val_prompts & {ex[0]["content"] for ex in splits.train}, "validation rows leaked into training"


def test_malformed_csv_names_the_file_and_the_row(tmp_path):
    """A row with the wrong number of fields is a bad row like any other (counted, quoted); an
    unclosed quote, which swallows the rest of the file, stops with the line where it opened."""
    from rlhf.config import DataConfig, DataSource
    from rlhf.data.formats import normalize_sft
    from rlhf.data.io import DataError, read_rows
    from rlhf.data.prepare import prepare_splits

    ragged = tmp_path / "ragged.csv"
    ragged.write_text('prompt,completion\n"a","b"\n"c","d",extra\n"e","say ""hi"""\n')
    rows = read_rows(ragged)
    assert rows[1].data is None and rows[1].error == "has 3 fields, the header has 2"
    assert rows[1].where == f"{ragged}:row 2 (line 3)" and rows[2].data["completion"] == 'say "hi"'
    cfg = DataConfig(sources=[DataSource(path=str(ragged))], validation_fraction=0.0, bad_rows="error")
    with pytest.raises(DataError, match=r"row 2 \(line 3\).*has 3 fields"):
        prepare_splits(cfg, normalize_sft)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('prompt,completion\n"a","b"\n"e,f\nmore text\n')
    with pytest.raises(DataError, match=r"unclosed.csv: malformed CSV in the row starting at line 3: unexpected end"):
        read_rows(unclosed)
