"""Recognise the example formats people already have and normalise them to chat messages.

SFT rows come as `prompt`/`completion` (strings or message lists) or as `messages`. Every row is
normalised to a list of `{"role", "content"}` messages, so one code path serves both; a row that
is malformed raises `RowError` with a reason, an empty one raises `EmptyRow`. Message lists may
arrive as JSON strings (a CSV cell), which are decoded here.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class RowError(ValueError):
    """A malformed row; the message is the reason (the caller adds file and row)."""


class EmptyRow(ValueError):
    """A well-formed row with nothing to learn from (empty text); cleaning drops it."""


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def as_messages(value: Any, name: str, default_role: str) -> Messages:
    """A string becomes one message of `default_role`; a list is checked message by message."""
    value = _decode(value)
    if isinstance(value, str):
        if not value.strip():
            raise EmptyRow(f"'{name}' is empty")
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RowError(f"'{name}' must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise EmptyRow(f"'{name}' is an empty list")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RowError(f"'{name}[{i}]' must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise RowError(f"'{name}[{i}]' has role {msg['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise RowError(f"'{name}[{i}].content' must be a string, got {type(msg['content']).__name__}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _missing(data: dict, needed: str) -> RowError:
    keys = ", ".join(sorted(map(str, data))) or "none"
    return RowError(f"needs {needed}; the row has keys: {keys}")


def normalize_sft(data: dict[str, Any]) -> Messages:
    """One SFT example as chat messages ending in an assistant turn to learn from."""
    if "messages" in data and data["messages"] is not None:
        messages = as_messages(data["messages"], "messages", "user")
    elif "prompt" in data and "completion" in data:
        messages = as_messages(data["prompt"], "prompt", "user") + as_messages(
            data["completion"], "completion", "assistant"
        )
    else:
        raise _missing(data, "'prompt' and 'completion', or 'messages'")
    if messages[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (the text to learn)")
    if not messages[-1]["content"].strip():
        raise EmptyRow("the assistant's reply is empty")
    return messages


def _as_float(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RowError(f"'{name}' must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RowError(f"'{name}' must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise RowError(f"'{name}' must be finite, got {value!r}")
    return out


def _as_bool(value: Any, name: str) -> bool:
    if value is None or value == "":
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise RowError(f"'{name}' must be true or false, got {value!r}")


def _split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Full conversations without a `prompt` column: the shared leading turns are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_preference(data: dict[str, Any]) -> dict[str, Any]:
    """One preference pair as {"prompt", "chosen", "rejected": messages, "margin": float, "tie": bool}.

    Accepts explicit prompts (strings or messages) and implicit ones (chosen / rejected are whole
    conversations sharing their first turns). Identical or empty sides are malformed pairs: they
    carry no preference signal and are reported like any bad row.
    """
    if "chosen" not in data or "rejected" not in data:
        raise _missing(data, "'chosen' and 'rejected' (and usually 'prompt')")
    try:
        if data.get("prompt") not in (None, ""):
            prompt = as_messages(data["prompt"], "prompt", "user")
            chosen = as_messages(data["chosen"], "chosen", "assistant")
            rejected = as_messages(data["rejected"], "rejected", "assistant")
        else:
            # A bare string is a reply with no prompt; message lists are whole conversations.
            prompt, chosen, rejected = _split_implicit_prompt(
                as_messages(data["chosen"], "chosen", "assistant"),
                as_messages(data["rejected"], "rejected", "assistant"),
            )
    except EmptyRow as e:
        raise RowError(f"empty side: {e}") from None
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or side[-1]["role"] != "assistant":
            raise RowError(f"'{name}' must end with an assistant reply")
        if not side[-1]["content"].strip():
            raise RowError(f"empty side: the '{name}' reply is empty")
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    margin = _as_float(data.get("margin"), "margin")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "margin": 0.0 if margin is None else margin,
        "tie": _as_bool(data.get("tie"), "tie"),
    }


def normalize_labelled(data: dict[str, Any]) -> dict[str, Any]:
    """A single response with a 0/1 quality label, for reward-model precision / recall."""
    if "response" not in data or "label" not in data:
        raise _missing(data, "'response' and 'label' (and usually 'prompt')")
    prompt = as_messages(data["prompt"], "prompt", "user") if data.get("prompt") not in (None, "") else []
    label = _as_float(data["label"], "label")
    if label not in (0.0, 1.0):
        raise RowError(f"'label' must be 0 (bad) or 1 (good), got {data['label']!r}")
    return {"prompt": prompt, "response": as_messages(data["response"], "response", "assistant"), "label": int(label)}


GOOD = ("true", "1", "1.0", "yes", "good", "desirable", "thumbs_up", "up")
BAD = ("false", "0", "0.0", "no", "bad", "undesirable", "thumbs_down", "down")


def _as_label(value: Any) -> bool:
    """A desirable / undesirable judgement: bool, 0/1, or a word such as good / bad."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in GOOD + BAD:
        return value.strip().lower() in GOOD
    raise RowError(f"'label' must be true/false, 1/0 or good/bad, got {value!r}")


def normalize_unpaired(data: dict[str, Any]) -> dict[str, Any]:
    """One KTO example: {"prompt", "completion": messages, "label": bool}, from a single judged
    response (prompt / completion or response / label), or a preference pair kept whole (it is
    split into a desirable and an undesirable response after the splits are made, so both halves
    of one pair always land in the same split)."""
    if "chosen" in data or "rejected" in data:
        return normalize_preference(data)
    answer = "completion" if "completion" in data else "response"
    if answer not in data or "label" not in data:
        raise _missing(data, "'completion' (or 'response') and 'label', or a pair with 'chosen' and 'rejected'")
    prompt = as_messages(data["prompt"], "prompt", "user") if data.get("prompt") not in (None, "") else []
    try:
        completion = as_messages(data[answer], answer, "assistant")
    except EmptyRow as e:
        raise RowError(f"empty {answer}: {e}") from None
    if not completion or completion[-1]["role"] != "assistant" or not completion[-1]["content"].strip():
        raise RowError(f"'{answer}' must end with a non-empty assistant reply")
    return {"prompt": prompt, "completion": completion, "label": _as_label(data["label"])}


def unpair(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Pairs -> a desirable and an undesirable single response each (ties dropped and counted);
    single responses pass through."""
    out, ties = [], 0
    for r in rows:
        if "completion" in r:
            out.append(r)
        elif r["tie"]:
            ties += 1
        else:
            out += [
                {"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False},
            ]
    return out, ties


def normalize_prompt(data: dict[str, Any]) -> Messages:
    """A PPO prompt as chat messages ending with a user turn (a `messages` row drops trailing replies)."""
    if data.get("prompt") not in (None, ""):
        messages = as_messages(data["prompt"], "prompt", "user")
    elif "messages" in data:
        messages = as_messages(data["messages"], "messages", "user")
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    else:
        raise _missing(data, "'prompt' (or 'messages')")
    if not messages or messages[-1]["role"] != "user":
        raise RowError("a prompt must end with a user message")
    if not messages[-1]["content"].strip():
        raise EmptyRow("the prompt is empty")
    return messages


PROMPT_KEYS = ("prompt", "messages")
RESERVED_FIELDS = ("response",)  # the argument name a reward function gets the answer under


def _json_safe(value: Any, name: str) -> Any:
    """A column value as plain JSON types (numpy arrays and scalars, dates included), so it can go
    to a reward function's process and into dedup keys; anything else is a malformed row."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, name) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars (parquet list columns)
        return _json_safe(value.tolist(), name)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise RowError(
        f"column '{name}' holds a {type(value).__name__}, which reward functions cannot receive "
        "(use text, numbers, lists or objects)"
    )


def normalize_prompt_row(data: dict[str, Any]) -> dict[str, Any]:
    """An RL prompt with the row's other columns: {"messages": prompt messages, "fields": {...}}.
    The fields (e.g. a checked `answer`) go to reward functions; nothing else reads them."""
    fields = {k: _json_safe(v, k) for k, v in data.items() if k not in PROMPT_KEYS}
    clash = [k for k in fields if k in RESERVED_FIELDS]
    if clash:
        raise RowError(f"column {clash[0]!r} clashes with the reward-function argument of that name; rename it")
    return {"messages": normalize_prompt(data), "fields": fields}
