"""Preference data: formats, implicit prompts, margins, ties, bad pairs; reward metrics by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.config import DataConfig, DataSource
from rlhf.data.formats import RowError, normalize_labelled, normalize_preference
from rlhf.data.io import DataError
from rlhf.data.prepare import prepare_splits
from rlhf.reward_metrics import bradley_terry_loss, calibration_table, mean_margin, pairwise_accuracy, precision_recall
from rlhf.stages.reward import split_ties

U = {"role": "user", "content": "q"}


def A(text):
    return {"role": "assistant", "content": text}


def test_string_pairs():
    p = normalize_preference({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert p == {"prompt": [U], "chosen": [A("good")], "rejected": [A("bad")], "margin": 0.0, "tie": False}


def test_conversational_pairs_with_margin_and_tie():
    p = normalize_preference(
        {"prompt": [U], "chosen": [A("good")], "rejected": [A("bad")], "margin": "1.5", "tie": "true"}
    )
    assert p["margin"] == 1.5 and p["tie"] is True and p["prompt"] == [U]


def test_implicit_prompt_is_the_shared_prefix():
    chosen = [U, A("a1"), {"role": "user", "content": "q2"}, A("good")]
    rejected = [U, A("a1"), {"role": "user", "content": "q2"}, A("bad")]
    p = normalize_preference({"chosen": chosen, "rejected": rejected})
    assert p["prompt"] == chosen[:3] and p["chosen"] == [A("good")] and p["rejected"] == [A("bad")]


def test_json_string_cells_from_csv():
    p = normalize_preference(
        {
            "prompt": json.dumps([U]),
            "chosen": json.dumps([A("g")]),
            "rejected": json.dumps([A("b")]),
            "margin": "",
            "tie": "",
        }
    )
    assert p["chosen"] == [A("g")] and p["margin"] == 0.0 and p["tie"] is False


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "", "rejected": "bad"}, "empty side"),
        ({"prompt": "q", "chosen": "good", "rejected": "  "}, "empty side"),
        ({"prompt": "q", "chosen": "good"}, "needs 'chosen' and 'rejected'"),
        ({"prompt": "q", "chosen": "g", "rejected": "b", "margin": "lots"}, "'margin' must be a number"),
        ({"prompt": "q", "chosen": "g", "rejected": "b", "margin": float("nan")}, "'margin' must be finite"),
        ({"prompt": "q", "chosen": "g", "rejected": "b", "tie": "perhaps"}, "'tie' must be true or false"),
        ({"prompt": "q", "chosen": [U], "rejected": [A("b")]}, "'chosen' must end with an assistant reply"),
    ],
)
def test_bad_pairs_say_why(row, reason):
    with pytest.raises(RowError, match=reason):
        normalize_preference(row)


def test_bad_pairs_dropped_and_counted_or_rejected_with_row(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    rows += [
        {"prompt": "q", "chosen": "x", "rejected": "x"},
        {"prompt": "q", "chosen": "", "rejected": "bad"},
        {"prompt": "q " * 200, "chosen": "good", "rejected": "bad"},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def words(pair):
        return sum(len(m["content"].split()) for m in pair["prompt"] + pair["chosen"])

    splits = prepare_splits(DataConfig([DataSource(str(path))], max_length=50), normalize_preference, words)
    rep = splits.sources[0]
    assert (rep.bad, rep.too_long, len(splits.train) + len(splits.validation)) == (2, 1, 20)
    assert "prefs.jsonl:line 21: chosen and rejected are identical" in rep.bad_examples[0]
    with pytest.raises(DataError, match="prefs.jsonl:line 21"):
        prepare_splits(DataConfig([DataSource(str(path))], bad_rows="error"), normalize_preference, words)
    with pytest.raises(DataError, match=r"prefs.jsonl:line 23: \d+ tokens, over data.max_length=50"):
        prepare_splits(
            DataConfig([DataSource(str(path))], max_length=50, too_long="error"), normalize_preference, words
        )


def test_tie_policies():
    pair = {"prompt": [U], "chosen": [A("a")], "rejected": [A("b")], "margin": 2.0, "tie": False}
    tie = {**pair, "tie": True}
    kept, n = split_ties([pair, tie], "drop")
    assert kept == [pair] and n == 1
    kept, n = split_ties([pair, tie], "soft")
    assert n == 1 and len(kept) == 3
    assert kept[1]["chosen"] == kept[2]["rejected"] and kept[1]["rejected"] == kept[2]["chosen"]
    assert kept[1]["margin"] == kept[2]["margin"] == 0.0


def test_labelled_rows():
    assert normalize_labelled({"prompt": "q", "response": "r", "label": 1})["label"] == 1
    with pytest.raises(RowError, match="'label' must be 0"):
        normalize_labelled({"prompt": "q", "response": "r", "label": 3})


# --- metrics against hand-computed numbers ----------------------------------------------------


def test_accuracy_margin_loss():
    rc, rr = torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert pairwise_accuracy(rc, rr) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert mean_margin(rc, rr) == pytest.approx((1 - 1 + 0 + 3) / 4)
    expected = sum(-math.log(1 / (1 + math.exp(-d))) for d in (1, -1, 0, 3)) / 4
    assert bradley_terry_loss(rc, rr) == pytest.approx(expected, rel=1e-6)
    with_margin = sum(-math.log(1 / (1 + math.exp(-(d - 1)))) for d in (1, -1, 0, 3)) / 4
    assert bradley_terry_loss(rc, rr, torch.ones(4)) == pytest.approx(with_margin, rel=1e-6)


def test_calibration_table_by_hand():
    # differences 0.1, -0.2 (wrong), 2.0, 3.0 -> confidences .525, .550, .881, .953
    rc = torch.tensor([0.1, 0.0, 2.0, 3.0])
    rr = torch.tensor([0.0, 0.2, 0.0, 0.0])
    t = calibration_table(rc, rr, bins=2)
    low, high = t["bins"]
    assert (low["bin"], low["count"], high["count"]) == ("0.50-0.75", 2, 2)
    assert low["accuracy"] == 0.5 and high["accuracy"] == 1.0

    def s(x):
        return 1 / (1 + math.exp(-x))

    assert low["mean_confidence"] == pytest.approx((s(0.1) + s(0.2)) / 2)
    ece = 0.5 * abs((s(0.1) + s(0.2)) / 2 - 0.5) + 0.5 * abs((s(2) + s(3)) / 2 - 1.0)
    assert t["ece"] == pytest.approx(ece)
    assert math.isnan(calibration_table(torch.tensor([]), torch.tensor([]), 3)["ece"])


def test_precision_recall_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.2, 0.7, 0.1])
    labels = torch.tensor([1, 0, 1, 1, 0])
    r = precision_recall(scores, labels, threshold=0.5)  # predicted good: 0, 1, 3 -> tp 2, fp 1, fn 1
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
