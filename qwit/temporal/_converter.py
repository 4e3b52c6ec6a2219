"""QWIT's payload converter: pydantic's JSON, with its parts built once.

temporalio builds a new payload converter for every serialization context,
about a dozen times per flow on a worker. temporalio's own
``PydanticPayloadConverter`` makes a new JSON serializer and an empty cache of
type adapters each time, so every workflow task rebuilt the adapters of
``FlowInput`` and ``StepReturn``. This one shares them across the process:
building it costs what building temporalio's default converter costs. The
JSON it writes and reads is the same (``pydantic_core.to_json``,
``TypeAdapter.validate_json``).
"""

from __future__ import annotations

import functools
from types import MappingProxyType
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import to_json
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    CompositePayloadConverter,
    DefaultPayloadConverter,
    EncodingPayloadConverter,
    JSONPlainPayloadConverter,
    WithSerializationContext,
)

#: Type adapters by type hint, for every converter of the process (adapters
#: are immutable and safe to share between threads).
_adapter = functools.lru_cache(maxsize=1024)(TypeAdapter)


class PydanticJSONConverter(EncodingPayloadConverter):
    """``json/plain`` payloads, written and read by pydantic."""

    @property
    def encoding(self) -> str:
        """See base class."""
        return "json/plain"

    def to_payload(self, value: Any) -> Payload | None:
        """See base class."""
        return Payload(metadata={"encoding": b"json/plain"}, data=to_json(value))

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        """See base class."""
        hint: Any = Any if type_hint is None else type_hint
        try:
            adapter: TypeAdapter[Any] = _adapter(hint)
        except TypeError:  # an unhashable hint: no cache
            adapter = TypeAdapter(hint)
        return adapter.validate_json(payload.data)


_CONVERTERS = tuple(
    PydanticJSONConverter() if isinstance(c, JSONPlainPayloadConverter) else c
    for c in DefaultPayloadConverter.default_encoding_payload_converters
)
#: The same by encoding, as ``CompositePayloadConverter`` keeps them. None of
#: them takes a serialization context, so nothing ever changes this mapping.
_BY_ENCODING = MappingProxyType({c.encoding.encode(): c for c in _CONVERTERS})
_ANY_TAKES_CONTEXT = any(isinstance(c, WithSerializationContext) for c in _CONVERTERS)


class QwitPayloadConverter(CompositePayloadConverter):
    """temporalio's default converters, with pydantic's JSON for ``json/plain``."""

    def __init__(self) -> None:
        """Share the process's converters (temporalio builds a converter
        twice per workflow activation: this costs one assignment)."""
        self.converters = _BY_ENCODING
        # (what temporalio's cached property would work out for each instance)
        self.__dict__["_any_converter_takes_context"] = _ANY_TAKES_CONTEXT
