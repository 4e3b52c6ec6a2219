"""Checks that args are plain JSON, naming the field that is not."""

from __future__ import annotations

import math
import unicodedata
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


#: How deep args may nest (objects and arrays in one another, the args
#: object itself the first level). JSON readers
#: stop somewhere (pydantic's, which reads every payload QWIT writes, at
#: 200 levels); QWIT's own envelopes around args take a few levels more.
MAX_DEPTH = 100


def check_json(value: Any, field: str = "", depth: int = 0) -> bool:
    """Raise NotJSON unless ``value`` is made of dicts (string keys), lists,
    strings, finite numbers, booleans and None (or tuples and other mappings,
    which JSON writes as lists and objects), nested at most ``MAX_DEPTH``
    levels. Returns whether it is plain: no tuple, no mapping but ``dict``."""
    if isinstance(value, str):
        _check_text(value, field)
        return True
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotJSON(field, f"{value!r} is not a finite number and has no JSON form")
        return True
    if isinstance(value, (Mapping, list, tuple)) and depth >= MAX_DEPTH:
        where = field if len(field) <= 60 else f"{field[:30]}...{field[-25:]}"
        raise NotJSON(where, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        plain = type(value) is dict
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotJSON(_join(field, repr(key)), "keys must be strings")
            _check_text(key, _join(field, repr(key)))
            plain = check_json(item, _join(field, key), depth + 1) and plain
        return plain
    if isinstance(value, (list, tuple)):
        plain = type(value) is list
        for index, item in enumerate(value):
            plain = check_json(item, f"{field}[{index}]", depth + 1) and plain
        return plain
    raise NotJSON(field, f"a {type(value).__name__} is not JSON-serialisable")


def _check_text(text: str, field: str) -> None:
    """Raise NotJSON if ``text`` has no UTF-8 form (a lone surrogate, which
    Python strings may hold and JSON payloads can't)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise NotJSON(
                field, f"{text[exc.start : exc.end]!r} is a lone surrogate, with no UTF-8 form"
            ) from None


def unkeepable_char(text: str) -> str | None:
    """The first character of ``text`` that not every engine keeps in a name
    or an id: a control character (NUL, a newline...) or a lone surrogate;
    None if there is none."""
    if text.isprintable():  # (the common case, fast: printable is stricter)
        return None
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            return char
    return None


def nul_at(value: Any, field: str = "") -> str | None:
    """Where the JSON ``value`` holds a NUL character (U+0000), in a string
    or a key, as ``a.b[2]`` ('' for ``value`` itself); None if nowhere.
    (PostgreSQL's ``jsonb`` can't keep one.)"""
    if isinstance(value, str):
        return field if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if "\x00" in key:
                return _join(field, repr(key))
            found = nul_at(item, _join(field, key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = nul_at(item, f"{field}[{index}]")
            if found is not None:
                return found
    return None


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
        model = type(value).__name__
        try:
            dumped = value.model_dump(mode="json")
        except Exception as exc:  # (pydantic's, or a serializer's own)
            problem = f"{type(exc).__name__}: {exc}"
            raise NotJSON("", f"{what} ({model}) has no JSON form: {problem}") from None
        if not isinstance(dumped, dict):
            raise NotJSON(
                "", f"{what} must dump to a JSON object; {model} dumps to a {type(dumped).__name__}"
            )
        check_json(dumped)  # (NaN, strings, depth: JSON mode writes the rest)
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
