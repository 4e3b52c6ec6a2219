"""QWIT: Queued Workflows In Transactions.

Define a business process as a ``Flow`` of ``Step`` s and run it like a
database transaction: when a step fails, the completed steps are undone,
newest first. Flows run on Temporal by default (``qwit.temporal``) or
in-process (``qwit.local``).
"""

from __future__ import annotations

from . import engine, local, temporal
from ._client import Client, connect
from ._context import StepContext, context, heartbeat
from ._engine import Backend, Engine, FlowHandle
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
from ._flow import Flow
from ._options import ABORT, RETRY, ROLLBACK, SKIP, SKIPBACK, WAIT, Reaction, Retry
from ._state import FlowState, StepState, WaitInfo
from ._step import Step

__version__ = "0.1.0"


# Public classes read as qwit.X (in reprs, tracebacks and error types on the
# wire): every class of __all__ defined in a private module.
def _publish(names: list[str]) -> None:
    for name in names:
        value = globals()[name]
        if isinstance(value, type) and value.__module__.startswith("qwit._"):
            value.__module__ = "qwit"


__all__ = [
    "ABORT",
    "RETRY",
    "ROLLBACK",
    "SKIP",
    "SKIPBACK",
    "WAIT",
    "ArgumentsError",
    "Backend",
    "Client",
    "Compensation",
    "CompensationFailed",
    "Engine",
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
    "temporal",
]

_publish(__all__)
