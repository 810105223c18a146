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
        messages = as_messages(data["prompt"], "prompt", "user") + as_messages(data["completion"], "completion", "assistant")
    else:
        raise _missing(data, "'prompt' and 'completion', or 'messages'")
    if messages[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (the text to learn)")
    if not messages[-1]["content"].strip():
        raise EmptyRow("the assistant's reply is empty")
    return messages


def to_plain_text(messages: Messages) -> dict[str, str]:
    """prompt/completion strings for a tokenizer without a chat template (single-turn rows only)."""
    if len(messages) != 2 or messages[0]["role"] != "user":
        raise RowError("multi-turn or system messages need a tokenizer with a chat template")
    return {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
