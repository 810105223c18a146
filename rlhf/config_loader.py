"""Turn YAML plus dotted command-line overrides into typed recipe dataclasses.

Kept apart from the schemas in `config.py` so that each file reads on its own: this one is the
machinery (parse, override, type-check, suggest), that one is the list of what a recipe holds.
Unknown keys and wrong types are errors that name the dotted key; we never ignore a value.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from rlhf.errors import ConfigError  # re-exported here for existing imports

T = TypeVar("T")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(options))}."


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # YAML reads `output_dir=runs/1` fine, but `name=123` as an int: a scalar is a valid string.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in a schema, not in a recipe


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of keys to values, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown key '{dotted}'.{_suggest(str(key), list(known))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    missing = [
        n
        for n, f in known.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{label}: missing required key(s) " + ", ".join(f"'{m}'" for m in missing))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}" if where else str(e)) from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML gives the natural types: 20 -> int, 1e-4 -> float, true -> bool, null -> None, [a, b] -> list.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, cls: type, text: str) -> None:
    """Set one dotted `key=value` into raw recipe `data`, checking each key against schema `cls`."""
    path, value = _parse_override(text)
    node: Any = data
    tp: Any = cls
    for i, part in enumerate(path):
        dotted = ".".join(path[: i + 1])
        last = i == len(path) - 1
        while _is_optional(tp):
            tp = next(a for a in get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise ConfigError(f"unknown key '{dotted}'.{_suggest(part, names)}")
            tp = get_type_hints(tp)[part]
            if last:
                node[part] = value
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        elif get_origin(tp) is list:
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"'{dotted}': index {part} is out of range for a list of {len(node)}")
            (tp,) = get_args(tp)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif get_origin(tp) is dict:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"'{dotted}': '{'.'.join(path[:i])}' is a {_type_name(tp)}, it has no sub-keys")


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Load a YAML recipe into `cls`, apply `key=value` overrides, validate everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    for text in overrides or []:
        apply_override(data, cls, text)
    return from_dict(cls, data)


def to_dict(recipe: Any) -> dict:
    """The resolved recipe as plain data (for manifests, logs and `rlhf config show`)."""
    return dataclasses.asdict(recipe)


def dump_yaml(recipe: Any) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


__all__ = ["ConfigError", "from_dict", "apply_override", "load_recipe", "to_dict", "dump_yaml"]
