"""Synthetic tasks with ground-truth graders, for measuring whether alignment helped.

`GRADERS` maps an evaluation recipe's `ground_truth` value to a function
(prompt text, response text, hit_length_limit) -> score 0-100. Training never calls them (a
verifiable-reward recipe may train on the same checker, as a reward function, on other prompts).
"""

from __future__ import annotations

from typing import Callable


def _demo(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.demo import task

    return task.score(prompt, response).total


def _demo_no_repeats(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.demo import task

    return task.score_no_repeats(prompt, response)


def _instruct(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.tasks import instruct

    return instruct.score(prompt, response, hit_limit).total


def _instruct_partial(prompt: str, response: str) -> tuple[float, ...]:
    from rlhf.tasks import instruct

    s = instruct.score(prompt, response, False)
    return (s.followed, s.on_topic, s.form)


def _arithmetic(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.tasks import arithmetic

    return arithmetic.score(prompt, response, hit_limit)


def _reverse(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.tasks import reverse

    return reverse.score(prompt, response, hit_limit)


def _pick(prompt: str, response: str, hit_limit: bool) -> float:
    from rlhf.tasks import pick

    return pick.score(prompt, response, hit_limit)


GRADERS: dict[str, Callable[[str, str, bool], float]] = {
    "demo": _demo,
    "demo_no_repeats": _demo_no_repeats,
    "instruct": _instruct,
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "pick": _pick,
}


PARTIAL_CREDIT: dict[str, Callable[[str, str], tuple[float, ...]]] = {"instruct": _instruct_partial}
"""Per grader whose score is coarse, what a person still sees when two answers score the same: the
instruction task's total is a product (an off-topic answer scores 0 however many instructions it
follows), so two answers often tie at 0 or 100 while one follows more instructions. The scripted
annotator breaks such ties by these parts in order, as the rule that labelled the task's initial
preferences does (`instruct.annotator_prefers`: instructions followed, then on topic)."""


def _repeats(response: str) -> bool:
    from rlhf.demo import task

    return task.repeats_a_word(response)


BLIND_SPOTS: dict[str, tuple[str, Callable[[str], bool]]] = {"demo_no_repeats": ("repeats an adjective", _repeats)}
"""Per grader, a behaviour it penalises that a report counts (the share of answers showing it):
the planted blind spot of the rounds demonstration (docs/rounds.md)."""
