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
    CompensationFailed,
    FlowAborted,
    FlowCancelled,
    FlowDefinitionError,
    FlowFailed,
    FlowRolledBack,
    QwitError,
    ReactionError,
    StepError,
)
from ._flow import Flow
from ._options import ABORT, RETRY, ROLLBACK, SKIP, SKIPBACK, WAIT, Reaction, Retry
from ._state import FlowState, StepState, WaitInfo
from ._step import Step

__version__ = "0.1.0"

# Public names read as qwit.X (in reprs, tracebacks and error types on the wire).
for _name in (
    "Client",
    "Flow",
    "FlowHandle",
    "Engine",
    "Retry",
    "Reaction",
    "Step",
    "StepContext",
    "FlowState",
    "StepState",
    "WaitInfo",
    "QwitError",
    "FlowDefinitionError",
    "ArgumentsError",
    "ReactionError",
    "FlowFailed",
    "FlowRolledBack",
    "FlowCancelled",
    "CompensationFailed",
    "FlowAborted",
    "StepError",
):
    globals()[_name].__module__ = "qwit"
del _name

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
    "CompensationFailed",
    "Engine",
    "Flow",
    "FlowAborted",
    "FlowCancelled",
    "FlowDefinitionError",
    "FlowFailed",
    "FlowHandle",
    "FlowRolledBack",
    "FlowState",
    "QwitError",
    "Reaction",
    "ReactionError",
    "Retry",
    "Step",
    "StepContext",
    "StepError",
    "StepState",
    "WaitInfo",
    "connect",
    "context",
    "engine",
    "heartbeat",
    "local",
    "temporal",
]
