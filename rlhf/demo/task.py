"""The demo task: write a short *positive* and *on-topic* review of the item the prompt names.

It is the synthetic twin of the classic "continue an IMDB review positively" RLHF benchmark
(Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"), small enough that
a ~1M-parameter model learns its grammar in a minute on a CPU:

- prompts:        "write a review of the pizza ."   (items x phrasings, split into train / held-out)
- demonstrations: "the pizza was great and dull . i hated it ."  -- deliberately imperfect: each
                  sentiment word is positive with probability 1/2 and one in ten is off-topic
                  (names another item), so a model trained on them scores about 50 / 100.
- preferences:    a noisy rule standing in for annotators (`annotator_prefers`): it prefers the
                  on-topic response, then the one with more positive than negative words, and
                  flips 10% of its answers. Reward models only ever see these pairs.
- ground truth:   `score()` on held-out prompts, 0-100, which training never calls: sentiment
                  (share of positive among sentiment words) x relevance (names the prompt's item)
                  x form (a sentence of sensible length that stops). PPO should move it from ~50
                  to 80+; a policy that games the reward model (say, by rambling) loses points.

Everything is deterministic from a seed and pure Python (no torch), so the scorer is testable.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ITEMS = [
    "pizza",
    "movie",
    "hotel",
    "book",
    "phone",
    "laptop",
    "concert",
    "museum",
    "restaurant",
    "game",
    "song",
    "park",
    "car",
    "bike",
    "camera",
    "coffee",
    "garden",
    "train",
    "beach",
    "school",
    "show",
    "album",
    "store",
    "city",
]
PHRASINGS = [
    "write a review of the {item} .",
    "what did you think of the {item} ?",
    "tell me about the {item} .",
    "give your opinion on the {item} .",
]
POSITIVE = ["great", "wonderful", "lovely", "excellent", "fantastic", "superb", "pleasant", "brilliant"]
NEGATIVE = ["awful", "terrible", "boring", "dull", "poor", "horrible", "bland", "noisy"]
CLOSING_POSITIVE = ["i loved it .", "highly recommended .", "i would go back ."]
CLOSING_NEGATIVE = ["i hated it .", "not worth it .", "never again ."]
MIN_WORDS, MAX_WORDS = 4, 24
_POS, _NEG = set(POSITIVE), set(NEGATIVE)
# The one word of each closing that carries its sentiment.
_CLOSE_POS = {"loved", "recommended", "back"}
_CLOSE_NEG = {"hated", "worth", "never"}


def prompt_text(item: str, phrasing: int) -> str:
    return PHRASINGS[phrasing].format(item=item)


def item_of(prompt: str) -> str | None:
    """The item a prompt asks about (the last known item word in it)."""
    found = [w for w in _words(prompt) if w in ITEMS]
    return found[-1] if found else None


def split_prompts() -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): every item is seen in training, but each item's
    held-out phrasing never is. 72 train and 24 held-out prompts."""
    train, heldout = [], []
    for i, item in enumerate(ITEMS):
        for p in range(len(PHRASINGS)):
            (heldout if p == i % len(PHRASINGS) else train).append(prompt_text(item, p))
    return train, heldout


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[.?!]", text.lower())


def sample_response(rng: random.Random, item: str, p_positive: float = 0.5, p_off_topic: float = 0.1) -> str:
    """One demonstration-style review; sentiment and topic are drawn, so quality varies."""
    if rng.random() < p_off_topic:
        item = rng.choice([x for x in ITEMS if x != item])
    adj = [rng.choice(POSITIVE if rng.random() < p_positive else NEGATIVE) for _ in range(2)]
    closing = rng.choice(CLOSING_POSITIVE if rng.random() < p_positive else CLOSING_NEGATIVE)
    return f"the {item} was {adj[0]} and {adj[1]} . {closing}"


def _sentiment_counts(words: list[str]) -> tuple[int, int]:
    pos = sum(w in _POS or w in _CLOSE_POS for w in words)
    neg = sum(w in _NEG or w in _CLOSE_NEG for w in words)
    return pos, neg


@dataclass(frozen=True)
class Score:
    """Ground-truth score of one response and its parts (all in [0, 1] except `total`)."""

    total: float  # 0-100: 100 * sentiment * relevance * form
    sentiment: float  # share of positive words among sentiment words (0 when there are none)
    relevance: float  # 1 if the prompt's item is named and no other item is, else 0.5
    form: float  # 1 for a sentence of MIN..MAX words ending in punctuation, else 0.5


def score(prompt: str, response: str) -> Score:
    """The ground-truth scorer: only evaluation calls it, never training."""
    words = _words(response)
    pos, neg = _sentiment_counts(words)
    sentiment = pos / (pos + neg) if pos + neg else 0.0
    item = item_of(prompt)
    named = {w for w in words if w in ITEMS}
    relevance = 1.0 if item is not None and named == {item} else 0.5
    n_words = sum(w.isalpha() for w in words)
    form = 1.0 if MIN_WORDS <= n_words <= MAX_WORDS and words and words[-1] in ".?!" else 0.5
    return Score(100.0 * sentiment * relevance * form, sentiment, relevance, form)


def repeats_a_word(response: str) -> bool:
    """Whether a sentiment adjective appears twice or more ("the pizza was pleasant and pleasant")."""
    adjectives = [w for w in _words(response) if w in _POS or w in _NEG]
    return len(adjectives) != len(set(adjectives))


def score_no_repeats(prompt: str, response: str) -> float:
    """The ground truth of the iterative-rounds demo (docs/rounds.md), 0-100: `score()`, halved for
    a review that repeats an adjective. The blind spot planted there: the initial preference pairs
    (`distinct_preference_rows`) never show a repeated adjective, so the first reward model cannot
    know that people dislike it, while a policy that collapses onto its favourite word repeats it."""
    total = score(prompt, response).total
    return total / 2 if repeats_a_word(response) else total


def distinct_preference_rows(rows: list[dict]) -> list[dict]:
    """The preference rows in which neither answer repeats an adjective (the rounds demo's initial data)."""
    return [r for r in rows if not repeats_a_word(r["chosen"]) and not repeats_a_word(r["rejected"])]


def annotator_prefers(rng: random.Random, prompt: str, a: str, b: str, noise: float = 0.1) -> int | None:
    """The stand-in for a human annotator: 0 if `a` is preferred, 1 for `b`, None for a tie.

    Deliberately not the ground-truth scorer: it judges on-topic first, then net sentiment,
    and is wrong `noise` of the time, as people are.
    """
    item = item_of(prompt)

    def key(text: str) -> tuple[int, int]:
        words = _words(text)
        pos, neg = _sentiment_counts(words)
        return (int(item in words), pos - neg)

    ka, kb = key(a), key(b)
    if ka == kb:
        return None
    choice = 0 if ka > kb else 1
    return 1 - choice if rng.random() < noise else choice


def make_sft_rows(seed: int, n_per_prompt: int = 28) -> list[dict]:
    train, _ = split_prompts()
    rng = random.Random(seed)
    return [{"prompt": p, "completion": sample_response(rng, item_of(p))} for p in train for _ in range(n_per_prompt)]


def make_preference_rows(seed: int, n_per_prompt: int = 28) -> list[dict]:
    """Pairs of demonstration-style responses judged by `annotator_prefers`; ties are skipped."""
    train, _ = split_prompts()
    rng = random.Random(seed + 1)
    rows = []
    for p in train:
        made = 0
        while made < n_per_prompt:
            a, b = sample_response(rng, item_of(p)), sample_response(rng, item_of(p))
            choice = annotator_prefers(rng, p, a, b)
            if choice is None:
                continue
            chosen, rejected = (a, b) if choice == 0 else (b, a)
            rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
            made += 1
    return rows


def corpus(seed: int) -> list[str]:
    """Text the demo tokenizer is trained on: every word the task can produce, in context."""
    train, heldout = split_prompts()
    rng = random.Random(seed + 2)
    lines = train + heldout
    lines += [sample_response(rng, item, p_positive=0.5, p_off_topic=0.0) for item in ITEMS for _ in range(20)]
    lines += [" ".join(POSITIVE + NEGATIVE + ITEMS), " ".join(CLOSING_POSITIVE + CLOSING_NEGATIVE)]
    return lines
