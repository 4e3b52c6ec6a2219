"""The Temporal engine (QWIT's default backend).

A flow runs as one ``qwit.Flow`` workflow that interprets its plan; each step
runs as the activities ``<step>.step_forward`` and ``<step>.step_back``; each
sub-flow as a child workflow. Use this module as ``backend=qwit.temporal``.
"""

from __future__ import annotations

from .._engine import EngineHost
from .._metrics import WAITING_EVERY
from .._tracing import TRACING_ENV, tracer_provider
from ._activities import activity_name
from ._config import TASK_QUEUE_ENV, TemporalSettings, default_task_queue
from ._connection import TemporalConnectionError, is_transient, is_unavailable
from ._devserver import DevServer, find_temporal_cli
from ._encryption import (
    ENCODING,
    ENCRYPTION_KEY_FILE_ENV,
    ENCRYPTION_KEYS_ENV,
    KEY_ID_METADATA,
    EncryptionCodec,
    EncryptionError,
    new_encryption_key,
)
from ._engine import (
    RESULT_POLLS_ENV,
    UNAVAILABLE_TIMEOUT_ENV,
    TemporalEngine,
    TemporalFlowHandle,
    connect_config,
    connect_temporal,
    unreachable,
)
from ._plugin import QwitPlugin
from ._worker import (
    METRICS_ADDRESS_ENV,
    check_metrics_address,
    count_waiting,
    create_worker,
    metrics_runtime,
    serve,
)
from ._workflow import QWIT_FLOW, QWIT_STATUS, WORKFLOW_NAME, QwitWorkflow

#: The backend's name, as plans record it.
name = "temporal"


def create_engine(client: EngineHost) -> TemporalEngine:
    """The Temporal engine for ``client`` (the backend protocol)."""
    return TemporalEngine(client)


__all__ = [
    "ENCODING",
    "ENCRYPTION_KEYS_ENV",
    "ENCRYPTION_KEY_FILE_ENV",
    "KEY_ID_METADATA",
    "METRICS_ADDRESS_ENV",
    "QWIT_FLOW",
    "QWIT_STATUS",
    "RESULT_POLLS_ENV",
    "TASK_QUEUE_ENV",
    "TRACING_ENV",
    "UNAVAILABLE_TIMEOUT_ENV",
    "WAITING_EVERY",
    "WORKFLOW_NAME",
    "DevServer",
    "EncryptionCodec",
    "EncryptionError",
    "QwitPlugin",
    "QwitWorkflow",
    "TemporalConnectionError",
    "TemporalEngine",
    "TemporalFlowHandle",
    "TemporalSettings",
    "activity_name",
    "check_metrics_address",
    "connect_config",
    "connect_temporal",
    "count_waiting",
    "create_engine",
    "create_worker",
    "default_task_queue",
    "find_temporal_cli",
    "is_transient",
    "is_unavailable",
    "metrics_runtime",
    "name",
    "new_encryption_key",
    "serve",
    "tracer_provider",
    "unreachable",
]
