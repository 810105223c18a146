"""The instruction-following task: its grader against answers checked by hand, its data's imperfection."""

from __future__ import annotations

import json
import random

import pytest

from rlhf.tasks import GRADERS
from rlhf.tasks import instruct as T

P = "Describe the cat. End your answer with an exclamation mark. Include the word 'today'."


def test_parse_reads_topic_and_instructions_back():
    p = T.parse(P)
    assert (p.topic, p.constraints, p.word) == ("cat", ("exclaim", "word"), "today")
    assert T.parse("Tell me about the sea. Answer in at most 6 words.").constraints == ("short",)


@pytest.mark.parametrize(
    "answer,followed,topical,total",
    [
        ("The cat is soft today!", 1.0, 1.0, 100.0),
        ("The cat is soft today.", 0.5, 1.0, 50.0),  # no exclamation mark
        ("The dog is loyal today!", 1.0, 0.0, 0.0),  # off topic: neither 'cat' nor a cat word
        ("It is curious!", 0.5, 1.0, 50.0),  # 'curious' is a cat word; 'today' missing
        ("", 0.0, 0.0, 0.0),
    ],
)
def test_score_by_hand(answer, followed, topical, total):
    s = T.score(P, answer)
    assert (s.followed, s.on_topic, s.total) == (followed, topical, total)


def test_form_lowercase_yes_and_short_by_hand():
    p = "Tell me about the sea. Use only lowercase letters. Start your answer with the word 'Yes'."
    assert T.score(p, "yes, the sea is calm.").total == 100.0
    assert T.score(p, "Yes, the sea is calm.").followed == 0.5  # capital Y breaks lowercase
    assert T.score(p, "yes, the sea is calm.", hit_limit=True).total == 0.0  # cut off: not well formed
    short = "Tell me about the sea. Answer in at most 6 words."
    assert T.score(short, "the sea is deep and blue.").total == 100.0  # 6 words
    assert T.score(short, "the sea is deep and very blue.").total == 0.0  # 7 words
    assert GRADERS["instruct"](short, "the sea is deep.", False) == 100.0


def test_data_is_deterministic_imperfect_and_holds_out_topics_and_words(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    T.build_data(a, seed=3, n_sft=300, n_pairs=200, n_rl=50, n_heldout=40)
    T.build_data(b, seed=3, n_sft=300, n_pairs=200, n_rl=50, n_heldout=40)
    assert (a / "sft.jsonl").read_text() == (b / "sft.jsonl").read_text()
    sft = [json.loads(line) for line in (a / "sft.jsonl").read_text().splitlines()]
    mean = sum(T.score(r["prompt"], r["completion"]).total for r in sft) / len(sft)
    assert 30 < mean < 65, mean  # imperfect on purpose: instructions followed about half the time
    held = [T.parse(json.loads(line)["prompt"]) for line in (a / "heldout_prompts.jsonl").read_text().splitlines()]
    trained = {T.parse(r["prompt"]).topic for r in sft}
    assert all(p.topic in T.HELDOUT_TOPICS and p.topic not in trained for p in held)
    assert all(p.word in T.HELDOUT_WORDS for p in held if "word" in p.constraints)
    pairs = [json.loads(line) for line in (a / "preferences.jsonl").read_text().splitlines()]
    agree = sum(T.score(r["prompt"], r["chosen"]).total >= T.score(r["prompt"], r["rejected"]).total for r in pairs)
    assert 0.7 < agree / len(pairs) < 0.98  # mostly right, but the stand-in annotator is noisy


def test_annotator_flips_about_one_in_ten():
    rng = random.Random(0)
    good, bad = "The cat is soft today!", "The cat is soft."
    prefers = [T.annotator_prefers(rng, P, good, bad) for _ in range(2000)]
    assert 0.86 < sum(prefers) / len(prefers) < 0.94
