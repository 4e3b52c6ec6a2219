"""QWIT: Queued Workflows In Transactions.

Define a business process as a ``Flow`` of ``Step`` s and run it like a
database transaction: when a step fails, the completed steps are undone,
newest first. Flows run on Temporal by default (``qwit.temporal``) or
in-process (``qwit.local``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._context import StepContext, context, heartbeat
from ._errors import (
    ArgumentsError,
    Compensation,
    CompensationFailed,
    EngineUnavailable,
    FlowAborted,
    FlowCancelled,
    FlowDefinitionError,
    FlowFailed,
    FlowNotFound,
    FlowRolledBack,
    HistoryTooLarge,
    PayloadTooLarge,
    QwitError,
    ReactionError,
    StepError,
    StepNotRegistered,
)
from ._options import ABORT, FALLBACK, RETRY, ROLLBACK, SKIP, SKIPBACK, WAIT, Reaction, Retry
from ._state import FlowState, StepState, WaitInfo
from ._step import Step

if TYPE_CHECKING:
    from . import engine, local, postgres, temporal
    from . import testing as testing
    from ._client import Client, connect
    from ._engine import Backend as Backend
    from ._engine import Engine as Engine
    from ._engine import FlowHandle
    from ._flow import Flow

__version__ = "0.1.0"

#: Names imported on first use, so that importing one part of QWIT (the saga
#: rules, say) does not import the engines, the client and temporalio.
#: ``Backend`` and ``Engine`` are exported by ``qwit.engine``, with what else
#: an engine is written from; ``qwit.Backend`` and ``qwit.Engine`` still work.
_LAZY = {
    "Backend": "._engine",
    "Client": "._client",
    "Engine": "._engine",
    "Flow": "._flow",
    "FlowHandle": "._engine",
    "connect": "._client",
    "engine": ".engine",
    "local": ".local",
    "postgres": ".postgres",
    "temporal": ".temporal",
    # (not in ``__all__``: it needs pytest, ``pip install 'qwit[testing]'``)
    "testing": ".testing",
}


def _public(value: Any) -> Any:
    """Public classes read as ``qwit.X`` (in reprs, tracebacks and error types
    on the wire), whichever private module defines them."""
    if isinstance(value, type) and value.__module__.startswith("qwit._"):
        value.__module__ = "qwit"
    return value


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qwit' has no attribute {name!r}")
    try:
        loaded = importlib.import_module(module, __name__)
    except ModuleNotFoundError as exc:
        if name != "testing" or exc.name not in ("pytest", "pytest_asyncio"):
            raise
        raise AttributeError(f"qwit.testing needs {exc.name}: pip install 'qwit[testing]'") from exc
    value = loaded if module.lstrip(".") == name else getattr(loaded, name)
    globals()[name] = _public(value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ABORT",
    "FALLBACK",
    "RETRY",
    "ROLLBACK",
    "SKIP",
    "SKIPBACK",
    "WAIT",
    "ArgumentsError",
    "Client",
    "Compensation",
    "CompensationFailed",
    "EngineUnavailable",
    "Flow",
    "FlowAborted",
    "FlowCancelled",
    "FlowDefinitionError",
    "FlowFailed",
    "FlowHandle",
    "FlowNotFound",
    "FlowRolledBack",
    "FlowState",
    "HistoryTooLarge",
    "PayloadTooLarge",
    "QwitError",
    "Reaction",
    "ReactionError",
    "Retry",
    "Step",
    "StepContext",
    "StepError",
    "StepNotRegistered",
    "StepState",
    "WaitInfo",
    "connect",
    "context",
    "engine",
    "heartbeat",
    "local",
    "postgres",
    "temporal",
]

for _name in __all__:
    if _name not in _LAZY:
        _public(globals()[_name])
del _name
