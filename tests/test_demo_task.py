"""The demo task: scorer against hand-computed values, annotator rule, determinism, splits."""

from __future__ import annotations

import random
import statistics

import pytest

from rlhf.demo import task

P = "write a review of the pizza ."


@pytest.mark.parametrize(
    "response, total, sentiment, relevance, form",
    [
        ("the pizza was great and lovely . i loved it .", 100.0, 1.0, 1.0, 1.0),
        ("the pizza was great and dull . i loved it .", 100 * 2 / 3, 2 / 3, 1.0, 1.0),
        ("the pizza was awful and dull . i hated it .", 0.0, 0.0, 1.0, 1.0),
        ("the movie was great and lovely . i loved it .", 50.0, 1.0, 0.5, 1.0),  # off-topic
        ("the pizza and the movie were great .", 50.0, 1.0, 0.5, 1.0),  # names another item too
        ("great great great great", 25.0, 1.0, 0.5, 0.5),  # no item, no full stop
        ("the pizza was great", 50.0, 1.0, 1.0, 0.5),  # does not end a sentence
        ("the pizza was " + "great " * 30 + ".", 50.0, 1.0, 1.0, 0.5),  # rambles past MAX_WORDS
        ("the pizza was fine .", 0.0, 0.0, 1.0, 1.0),  # no sentiment words at all
        ("", 0.0, 0.0, 0.5, 0.5),
    ],
)
def test_score_hand_computed(response, total, sentiment, relevance, form):
    s = task.score(P, response)
    assert s.total == pytest.approx(total)
    assert s.sentiment == pytest.approx(sentiment)
    assert s.relevance == relevance
    assert s.form == form


def test_item_of_prompt():
    assert task.item_of("what did you think of the coffee ?") == "coffee"
    assert task.item_of("hello") is None


def test_prompt_split_is_disjoint_and_covers_every_item():
    train, held = task.split_prompts()
    assert len(train) == 72 and len(held) == 24
    assert not set(train) & set(held)
    assert {task.item_of(p) for p in held} == set(task.ITEMS) == {task.item_of(p) for p in train}


def test_annotator_prefers_on_topic_then_positive():
    rng = random.Random(0)
    pos = "the pizza was great and lovely . i loved it ."
    neg = "the pizza was awful and dull . i hated it ."
    off = "the movie was great and lovely . i loved it ."
    assert task.annotator_prefers(rng, P, pos, neg, noise=0.0) == 0
    assert task.annotator_prefers(rng, P, neg, pos, noise=0.0) == 1
    assert task.annotator_prefers(rng, P, neg, off, noise=0.0) == 0  # on-topic beats positive
    assert task.annotator_prefers(rng, P, pos, pos, noise=0.0) is None
    assert task.annotator_prefers(rng, P, pos, neg, noise=1.0) == 1  # always wrong


def test_data_is_deterministic_and_imperfect():
    a, b = task.make_sft_rows(0), task.make_sft_rows(0)
    assert a == b and a != task.make_sft_rows(1)
    mean = statistics.mean(task.score(r["prompt"], r["completion"]).total for r in a)
    assert 40 < mean < 55, "demonstrations must leave room for RLHF to improve"


def test_preferences_agree_with_ground_truth_mostly_but_not_always():
    rows = task.make_preference_rows(0)
    agree = statistics.mean(
        task.score(r["prompt"], r["chosen"]).total > task.score(r["prompt"], r["rejected"]).total for r in rows
    )
    assert 0.7 < agree < 0.95
    heldout = set(task.split_prompts()[1])
    assert not any(r["prompt"] in heldout for r in rows), "held-out prompts leaked into preference data"
