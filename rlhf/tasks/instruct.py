"""A real task for a real small chat model: short answers that follow checkable instructions.

SmolLM2-135M-Instruct rarely follows simple format instructions (measured on 24 samples per
instruction at temperature 1: "answer with one word" 12%, "only lowercase" 0%, "end with an
exclamation mark" 8%, "start with 'Yes'" 4%), and rambles past 32 tokens half the time. Each
prompt names a topic and one or two instructions from `CONSTRAINTS`:

- demonstrations: a short sentence on the topic that follows each instruction with probability
  1/2 (deliberately imperfect, like the demo task), so SFT learns the format and brevity but
  follows instructions only about half the time;
- preferences:    a noisy rule standing in for annotators (`annotator_prefers`): more
                  instructions followed wins, then on-topic, and 10% of judgements are flipped;
- held-out:       topics and required words that training never sees, graded by `score()`
                  (0-100 = 100 x share of instructions followed x on topic x well formed), which
                  training never calls.

Pure Python and deterministic from a seed, so the checker is testable by hand.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

from rlhf.tasks import general

# topic noun -> words a short answer about it may use
TOPICS = {
    "cat": ["soft", "curious", "playful", "quiet"],
    "dog": ["loyal", "friendly", "happy", "energetic"],
    "sea": ["deep", "blue", "vast", "calm"],
    "apple": ["sweet", "crisp", "red", "fresh"],
    "rain": ["wet", "cool", "gentle", "grey"],
    "tree": ["tall", "green", "old", "strong"],
    "bread": ["warm", "soft", "fresh", "tasty"],
    "city": ["busy", "loud", "bright", "large"],
    "winter": ["cold", "snowy", "dark", "long"],
    "music": ["loud", "happy", "soft", "lively"],
    "garden": ["green", "quiet", "pretty", "small"],
    "coffee": ["hot", "bitter", "strong", "dark"],
    "moon": ["bright", "round", "pale", "distant"],
    "river": ["long", "cold", "clear", "fast"],
    "train": ["fast", "long", "noisy", "crowded"],
    "book": ["long", "thick", "good", "old"],
    # held out: never in training prompts
    "mountain": ["high", "cold", "steep", "rocky"],
    "bird": ["small", "quick", "bright", "free"],
    "island": ["small", "sunny", "remote", "green"],
    "pizza": ["hot", "cheesy", "tasty", "round"],
    "forest": ["dark", "green", "quiet", "dense"],
    "storm": ["loud", "wild", "dark", "wet"],
}
HELDOUT_TOPICS = ["mountain", "bird", "island", "pizza", "forest", "storm"]
TOPIC_PHRASINGS = ["Describe the {t}.", "Tell me about the {t}.", "Write a sentence about the {t}."]
REQUIRED_WORDS = ["today", "really", "always", "maybe", "truly", "indeed"]
HELDOUT_WORDS = ["surely", "often"]
CONSTRAINTS = ("exclaim", "yes", "lowercase", "word", "short")
MAX_WORDS, SHORT_WORDS = 20, 6


def instruction(name: str, word: str) -> str:
    return {
        "exclaim": "End your answer with an exclamation mark.",
        "yes": "Start your answer with the word 'Yes'.",
        "lowercase": "Use only lowercase letters.",
        "word": f"Include the word '{word}'.",
        "short": f"Answer in at most {SHORT_WORDS} words.",
    }[name]


@dataclass(frozen=True)
class Prompt:
    topic: str
    constraints: tuple[str, ...]
    word: str  # the required word, when "word" is among the constraints
    phrasing: int = 0

    @property
    def text(self) -> str:
        return " ".join(
            [TOPIC_PHRASINGS[self.phrasing].format(t=self.topic)]
            + [instruction(c, self.word) for c in self.constraints]
        )


_WORD_RE = re.compile(r"[A-Za-z']+")


def parse(prompt: str) -> Prompt:
    """The topic and instructions of a prompt text (the grader reads them back from the text)."""
    topic = next((t for t in TOPICS if re.search(rf"\bthe {t}\b", prompt)), "")
    word = re.search(r"Include the word '([a-z]+)'", prompt)
    found = tuple(c for c in CONSTRAINTS if instruction(c, word.group(1) if word else "") in prompt)
    return Prompt(topic, found, word.group(1) if word else "")


def checks(p: Prompt, response: str) -> dict[str, bool]:
    """Whether `response` follows each of the prompt's instructions."""
    text = response.strip()
    words = _WORD_RE.findall(text)
    out = {
        "exclaim": text.endswith("!"),
        "yes": bool(words) and words[0].lower() == "yes",
        "lowercase": any(ch.isalpha() for ch in text) and text == text.lower(),
        "word": p.word.lower() in (w.lower() for w in words),
        "short": 0 < len(words) <= SHORT_WORDS,
    }
    return {c: out[c] for c in p.constraints}


def on_topic(p: Prompt, response: str) -> bool:
    words = {w.lower() for w in _WORD_RE.findall(response)}
    return p.topic in words or bool(words & set(TOPICS[p.topic]))


@dataclass
class Score:
    followed: float  # share of the prompt's instructions followed
    on_topic: float  # 1 when the answer names the topic or one of its words
    form: float  # 1 for a non-empty answer of at most MAX_WORDS words
    total: float  # 100 x followed x on_topic x form


def score(prompt: str, response: str, hit_limit: bool = False) -> Score:
    """Ground truth, 0-100. An answer cut off by the length limit is not well formed."""
    p = parse(prompt)
    c = checks(p, response)
    followed = sum(c.values()) / len(c) if c else 1.0
    n = len(_WORD_RE.findall(response))
    form = float(0 < n <= MAX_WORDS and not hit_limit)
    topical = float(on_topic(p, response))
    return Score(followed, topical, form, 100.0 * followed * topical * form)


def _sentence(rng: random.Random, p: Prompt, follow: dict[str, bool], topic: str) -> str:
    """A short answer about `topic` that follows exactly the instructions marked True in `follow`."""
    a, b = rng.sample(TOPICS[topic], 2)
    adverb = ""
    if "word" in follow:  # following means the required word appears; not following, another adverb
        adverb = (p.word if follow["word"] else rng.choice([w for w in REQUIRED_WORDS if w != p.word])) + " "
    text = f"the {topic} is {adverb}{a}" if follow.get("short") else f"the {topic} is {adverb}{a} and {b}"
    if "short" in follow and not follow["short"] or "short" not in follow and rng.random() < 0.5:
        text += " " + rng.choice(["to me", "in my view", "most of the time", "as far as i know"])
    if follow.get("yes"):
        text = "yes, " + text
    elif "yes" in follow:
        text = rng.choice(["well, ", "no, ", ""]) + text
    if follow.get("short") and len(_WORD_RE.findall(text)) > SHORT_WORDS:
        text = " ".join(text.split()[:SHORT_WORDS])
    if not follow.get("lowercase"):  # written as people write: capitalised
        text = text[0].upper() + text[1:]
    return text + ("!" if follow.get("exclaim") else ".")


def demonstration(rng: random.Random, p: Prompt, follow_prob: float = 0.5, off_topic: float = 0.1) -> str:
    """An imperfect demonstration: each instruction followed with probability `follow_prob`, and
    one in ten about another topic."""
    follow = {c: rng.random() < follow_prob for c in p.constraints}
    topic = rng.choice([t for t in TOPICS if t != p.topic]) if rng.random() < off_topic else p.topic
    return _sentence(rng, p, follow, topic)


def make_prompts(rng: random.Random, topics: list[str], words: list[str], n: int) -> list[Prompt]:
    out = []
    for _ in range(n):
        k = rng.choice([1, 2])
        cons = tuple(sorted(rng.sample(CONSTRAINTS, k), key=CONSTRAINTS.index))
        out.append(Prompt(rng.choice(topics), cons, rng.choice(words), rng.randrange(len(TOPIC_PHRASINGS))))
    return out


def annotator_prefers(rng: random.Random, prompt: str, a: str, b: str, flip: float = 0.1) -> bool:
    """True when the stand-in annotator prefers `a`: more instructions followed, then on topic; 10% flipped."""
    p = parse(prompt)
    sa, sb = sum(checks(p, a).values()), sum(checks(p, b).values())
    if sa == sb:
        sa, sb = on_topic(p, a), on_topic(p, b)
    prefers = sa > sb if sa != sb else rng.random() < 0.5
    return (not prefers) if rng.random() < flip else prefers


def train_topics() -> list[str]:
    return [t for t in TOPICS if t not in HELDOUT_TOPICS]


# The forgetting measure's general questions, and the disjoint set replayed against forgetting.
GENERAL_QUESTIONS, REPLAY_QUESTIONS = general.HELDOUT_QUESTIONS, general.REPLAY_QUESTIONS


def build_data(
    out: str | os.PathLike, seed: int = 0, n_sft: int = 1200, n_pairs: int = 1200, n_rl: int = 400, n_heldout: int = 60
) -> dict[str, int]:
    """Write the task's files into `out`: sft.jsonl, preferences.jsonl, prompts.jsonl (RL),
    heldout_prompts.jsonl (evaluation only), general_questions.jsonl (forgetting) and
    replay_questions.jsonl (for `rlhf data replay`, disjoint from the forgetting questions)."""
    import json
    from pathlib import Path

    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = train_topics(), HELDOUT_TOPICS
    sft = [
        {"prompt": p.text, "completion": demonstration(rng, p)} for p in make_prompts(rng, train, REQUIRED_WORDS, n_sft)
    ]
    pairs = []
    for p in make_prompts(rng, train, REQUIRED_WORDS, n_pairs * 10):
        a, b = demonstration(rng, p), demonstration(rng, p)
        # Annotators are shown pairs that differ in what they judge (as an active selection would);
        # the stand-in's 10% flips still make the labels noisy.
        if a == b or (sum(checks(p, a).values()), on_topic(p, a)) == (sum(checks(p, b).values()), on_topic(p, b)):
            continue
        chosen, rejected = (a, b) if annotator_prefers(rng, p.text, a, b) else (b, a)
        pairs.append({"prompt": p.text, "chosen": chosen, "rejected": rejected})
        if len(pairs) == n_pairs:
            break
    files = {
        "sft.jsonl": sft,
        "preferences.jsonl": pairs,
        "prompts.jsonl": [{"prompt": p.text} for p in make_prompts(rng, train, REQUIRED_WORDS, n_rl)],
        "heldout_prompts.jsonl": [{"prompt": p.text} for p in make_prompts(rng, heldout, HELDOUT_WORDS, n_heldout)],
        "general_questions.jsonl": [{"prompt": q} for q in GENERAL_QUESTIONS],
        "replay_questions.jsonl": [{"prompt": q} for q in REPLAY_QUESTIONS],
    }
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: len(rows) for name, rows in files.items()}


def format_reward(prompt: str, response: str, **fields) -> float:
    """A reward function for RL (`rlhf.tasks.instruct:format_reward`): the share of the prompt's
    checkable instructions the response follows, 0 for an empty or over-long answer. Topicality is
    left to the reward model it is mixed with (recipes/smollm2-135m/ppo_grpo_format.yaml)."""
    s = score(prompt, response)
    return s.followed * s.form
