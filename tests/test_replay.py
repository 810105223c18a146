"""Replay against forgetting: the general questions, `rlhf data replay`, and its SFT rows."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.errors import DataError
from rlhf.generate import last_sentences


def test_the_replayed_questions_are_not_the_measured_ones(tmp_path):
    from rlhf.tasks import general, instruct

    held, replay = general.HELDOUT_QUESTIONS, general.REPLAY_QUESTIONS
    assert len(set(held)) == len(held) and len(set(replay)) == len(replay)
    norm = lambda q: q.lower().strip(" ?.")  # noqa: E731
    assert not {norm(q) for q in held} & {norm(q) for q in replay}
    counts = instruct.build_data(tmp_path)
    assert counts["general_questions.jsonl"] == len(held) and counts["replay_questions.jsonl"] == len(replay)
    written = [json.loads(x)["prompt"] for x in (tmp_path / "replay_questions.jsonl").read_text().splitlines()]
    assert written == replay


@pytest.mark.parametrize(
    "text, want",
    [
        ("Paris is the capital. It has a tower and many", "Paris is the capital."),
        ("Yes! It is. Really? Sure, and then", "Yes! It is. Really?"),
        ("Version 2.5 is out", ""),  # a dot inside a number ends no sentence
        ("no sentence end at all", ""),
        ("Done.", "Done."),
        ("Fruits are:\n\n1. Apple.\n2.", "Fruits are:\n\n1. Apple."),  # a cut list loses its stub
        ("Fruits are:\n\n1.", ""),
        ("Use e.g. a pen", ""),  # abbreviations and initials end no sentence
        ("Mr. Smith is a", ""),
        ("J. R. R. Tolkien wrote it. He", "J. R. R. Tolkien wrote it."),
        ('He said "Hi." Then he', 'He said "Hi."'),  # closing quotes and brackets stay
        ("It is (really.) And", "It is (really.)"),
        ("It ended in 1999. Then", "It ended in 1999."),
    ],
)
def test_last_sentences(text, want):
    assert last_sentences(text) == want


def _fake_answers(rows):
    def answer_prompts(model_dir, prompts_path, gen, samples=1, seed=0, batch_size=32, greedy=False):
        assert greedy, "replay must use the greedy answer, like the forgetting reference"
        return [{"prompt": [{"role": "user", "content": q}], "response": r, "hit_length_limit": h} for q, r, h in rows]

    return answer_prompts


def test_replay_keeps_whole_answers_cuts_long_ones_and_drops_the_rest(tmp_path, monkeypatch, capsys):
    import rlhf.generate as g

    rows = [
        ("q1", "A short answer.", False),
        ("q2", "A long answer. It goes on and", True),
        ("q3", "a long answer with no end", True),
        ("q4", "", False),
    ]
    monkeypatch.setattr(g, "answer_prompts", _fake_answers(rows))
    out = tmp_path / "replay.jsonl"
    args = ["data", "replay", "--model", "m", "--prompts", "q.jsonl", "--out", str(out)]
    assert main(args) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got == [
        {"prompt": [{"role": "user", "content": "q1"}], "completion": "A short answer."},
        {"prompt": [{"role": "user", "content": "q2"}], "completion": "A long answer."},
    ]
    printed = capsys.readouterr().out
    assert "wrote 2 replay rows" in printed and "1 cut after their last sentence" in printed and "2 dropped" in printed
    assert not (tmp_path / "replay.jsonl.partial").exists()
    # The rows are SFT rows every stage reads.
    from rlhf.data.formats import normalize_sft

    assert [m[-1]["content"] for m in map(normalize_sft, got)] == ["A short answer.", "A long answer."]


def test_replay_with_nothing_usable_names_the_file_and_writes_nothing(tmp_path, monkeypatch):
    import rlhf.generate as g

    monkeypatch.setattr(g, "answer_prompts", _fake_answers([("q", "rambling on and on", True)]))
    out = tmp_path / "replay.jsonl"
    with pytest.raises(DataError, match=r"questions\.jsonl.*raise --max-new-tokens"):
        g.replay_file("m", "questions.jsonl", str(out), max_new_tokens=8)
    assert not out.exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    from rlhf.data.io import write_jsonl

    out = tmp_path / "answers.jsonl"
    write_jsonl([{"a": 1}], str(out))
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"b": object()}], str(out))  # the second row cannot be written
    assert out.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]


def test_replay_answers_are_the_forgetting_measures_reference(sft_dir, demo_assets):
    """Replay rehearses exactly what the evaluation's forgetting reference is: the same questions
    read the same way, the same greedy decoding (here the demo SFT model stands in for the base)."""
    import torch

    from rlhf.config import DataConfig, DataSource, GenerationSettings
    from rlhf.config_run import EvalRecipe
    from rlhf.eval.run import forgetting_reference
    from rlhf.generate import answer_prompts
    from rlhf.models import load_tokenizer

    path = str(demo_assets / "data/heldout_prompts.jsonl")
    rows = answer_prompts(str(sft_dir), path, GenerationSettings(max_new_tokens=12), batch_size=8, greedy=True)
    recipe = EvalRecipe(
        sft_dir=str(sft_dir),
        reward_dir=None,
        prompts=DataConfig(sources=[DataSource(path=path)]),
        base_dir=str(sft_dir),
        base_few_shot=0,
        forgetting_prompts=DataSource(path=path),
        forgetting_max_new_tokens=12,
        batch_size=8,
    )
    tok = load_tokenizer(str(sft_dir))
    _, ref = forgetting_reference(recipe, tok, torch.device("cpu"))
    assert len(rows) == len(ref.responses) == 24
    assert [r["response"] for r in rows] == [tok.decode(x, skip_special_tokens=True).strip() for x in ref.responses]
    assert [r["hit_length_limit"] for r in rows] == ref.hit_limit


def test_the_report_flags_every_policy_that_forgot():
    from rlhf.eval.report import _forgetting

    summary = {
        "base": {"forgetting_ppl_rise": 0.0},
        "sft": {"forgetting_ppl_rise": 0.031},
        "ppo": {"forgetting_ppl_rise": 0.049},
        "no_kl_high_lr": {"forgetting_ppl_rise": 0.62},
        "sft_best_of_8": {},
    }
    (line,) = _forgetting(summary, 0.05)
    assert "sft +3.1%, ppo +4.9%, no_kl_high_lr +62.0%" in line and line.endswith("over the 5% limit: no_kl_high_lr.")
    summary.pop("no_kl_high_lr")
    assert _forgetting(summary, 0.05)[0].endswith("all within 5%.")
    assert _forgetting(summary, 0.04)[0].endswith("over the 4% limit: ppo.")
    assert _forgetting({"sft": {}}, 0.05) == []


def test_greedy_with_several_samples_is_refused(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    args = ["generate", "--model", "m", "--prompts", "p.jsonl", "--out", str(out), "--greedy", "--samples", "2"]
    assert main(args) == 2 and not out.exists()
    assert "--greedy gives one answer per prompt" in capsys.readouterr().err


def test_a_negative_forgetting_limit_is_refused():
    from rlhf.config import ConfigError, DataConfig, DataSource
    from rlhf.config_run import EvalRecipe

    prompts = DataConfig(sources=[DataSource(path="p.jsonl")])
    assert EvalRecipe(sft_dir="s", reward_dir=None, prompts=prompts).forgetting_limit == 0.05
    with pytest.raises(ConfigError, match="forgetting_limit"):
        EvalRecipe(sft_dir="s", reward_dir=None, prompts=prompts, forgetting_limit=-0.1)
