"""The Temporal engine (QWIT's default backend).

A flow runs as one ``qwit.Flow`` workflow that interprets its plan; each step
runs as the activities ``<step>.step_forward`` and ``<step>.step_back``; each
sub-flow as a child workflow. Use this module as ``backend=qwit.temporal``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._activities import activity_name
from ._connection import TemporalConnectionError
from ._devserver import DevServer, find_temporal_cli, free_port
from ._encryption import EncryptionCodec, EncryptionError, new_encryption_key
from ._engine import TemporalEngine, TemporalFlowHandle, connect_config, connect_temporal
from ._plugin import QwitPlugin
from ._worker import create_worker, serve
from ._workflow import WORKFLOW_NAME, QwitWorkflow

if TYPE_CHECKING:
    from .._client import Client

#: The backend's name, as plans record it.
name = "temporal"


def create_engine(client: Client) -> TemporalEngine:
    """The Temporal engine for ``client`` (the backend protocol)."""
    return TemporalEngine(client)


__all__ = [
    "WORKFLOW_NAME",
    "DevServer",
    "EncryptionCodec",
    "EncryptionError",
    "QwitPlugin",
    "QwitWorkflow",
    "TemporalConnectionError",
    "TemporalEngine",
    "TemporalFlowHandle",
    "activity_name",
    "connect_config",
    "connect_temporal",
    "create_engine",
    "create_worker",
    "find_temporal_cli",
    "free_port",
    "name",
    "new_encryption_key",
    "serve",
]
