"""The verifiable-reward arithmetic task: answers, reward functions and the held-out split by hand."""

from __future__ import annotations

import json

import pytest

from rlhf.tasks import GRADERS, arithmetic


@pytest.mark.parametrize(
    "prompt,answer",
    [
        ("What is 26 + 28? Reply with just the number.", 54),
        ("Compute 21 - 32. Give only the result.", -11),
        ("Calculate 45 * 5 and answer with the number alone.", 225),
    ],
)
def test_answer_of_the_prompt(prompt, answer):
    assert arithmetic.answer_of(prompt) == answer


@pytest.mark.parametrize(
    "response,correct,formatted",
    [
        ("54", 1.0, 1.0),
        (" 54.", 1.0, 1.0),
        ("The answer is 54.", 1.0, 0.0),
        ("26 + 28 = 54", 1.0, 0.0),
        ("54, no wait, 55", 0.0, 0.0),
        ("53", 0.0, 1.0),
        ("", 0.0, 0.0),
        ("1,054", 0.0, 1.0),
    ],
)
def test_reward_and_format_reward_by_hand(response, correct, formatted):
    prompt = "What is 26 + 28? Reply with just the number."
    assert arithmetic.reward(prompt, response, answer=54) == correct
    assert arithmetic.reward(prompt, response) == correct  # recomputed from the prompt without the column
    assert arithmetic.format_reward(prompt, response) == formatted
    assert GRADERS["arithmetic"](prompt, response, False) == 100 * correct


def test_the_rows_answer_column_wins_over_the_prompt():
    assert arithmetic.reward("What is 2 + 2?", "5", answer=5) == 1.0


def test_data_carries_answers_and_holds_out_operand_pairs_and_phrasing(tmp_path):
    counts = arithmetic.build_data(tmp_path, seed=3)
    rows = {n: [json.loads(line) for line in (tmp_path / n).read_text().splitlines()] for n in counts}
    assert counts == {"prompts.jsonl": 400, "heldout_prompts.jsonl": 100}
    for r in rows["prompts.jsonl"] + rows["heldout_prompts.jsonl"]:
        assert r["answer"] == arithmetic.answer_of(r["prompt"])
    pairs = {n: {arithmetic._QUESTION.search(r["prompt"]).groups() for r in v} for n, v in rows.items()}
    assert not pairs["prompts.jsonl"] & pairs["heldout_prompts.jsonl"]
    assert all(r["prompt"].startswith("Calculate") for r in rows["heldout_prompts.jsonl"])
    assert not any(r["prompt"].startswith("Calculate") for r in rows["prompts.jsonl"])
    arithmetic.build_data(tmp_path / "again", seed=3)
    assert (tmp_path / "again" / "prompts.jsonl").read_text() == (tmp_path / "prompts.jsonl").read_text()
