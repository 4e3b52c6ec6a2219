"""Checks that args are plain JSON, naming the field that is not."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_json


class NotJSON(ValueError):
    """A value is not plain JSON; ``field`` is where, as ``a.b[2]``."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r}: {problem}" if field else problem)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def check_json(value: Any, field: str = "") -> bool:
    """Raise NotJSON unless ``value`` is made of dicts (string keys), lists,
    strings, finite numbers, booleans and None (or tuples and other mappings,
    which JSON writes as lists and objects). Returns whether it is plain:
    no tuple, no mapping but ``dict``."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJSON(field, f"{value!r} is not a finite number and has no JSON form")
        return True
    if isinstance(value, Mapping):
        plain = type(value) is dict
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotJSON(_join(field, repr(key)), "keys must be strings")
            plain = check_json(item, _join(field, key)) and plain
        return plain
    if isinstance(value, (list, tuple)):
        plain = type(value) is list
        for index, item in enumerate(value):
            plain = check_json(item, f"{field}[{index}]") and plain
        return plain
    raise NotJSON(field, f"a {type(value).__name__} is not JSON-serialisable")


def _plain(value: Any) -> Any:
    """``value`` (checked JSON) as JSON reads it back: tuples as lists, every
    mapping as a dict."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def as_args(value: Any, what: str) -> dict[str, Any]:
    """Turn a flow's or step's args into a plain JSON dict.

    Accepts None (no args), a mapping with string keys, or a pydantic model
    (its JSON dump).

    Raises:
        NotJSON: the value is not a JSON object, or holds something that is
            not JSON.
    """
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        dumped: dict[str, Any] = value.model_dump(mode="json")
        return dumped
    if not isinstance(value, Mapping):
        raise NotJSON("", f"{what} must be a dict or a pydantic model, not {type(value).__name__}")
    if not check_json(value):
        # as every engine that sends it would read it back (qwit.local too)
        plain: dict[str, Any] = _plain(value)
        return plain
    return dict(value)


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (UTF-8, as payloads are written)."""
    return len(to_json(value))
