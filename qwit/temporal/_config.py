"""The Temporal engine's own settings: which task queue flows and workers use,
which Temporal to reach and how. A QWIT client holds them for its Temporal
engine; nothing else reads them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import temporalio.client

#: Environment variable naming the task queue of clients and workers.
TASK_QUEUE_ENV = "QWIT_TASK_QUEUE"
DEFAULT_TASK_QUEUE = "qwit"


def default_task_queue() -> str:
    """``$QWIT_TASK_QUEUE``, or ``qwit``."""
    return os.environ.get(TASK_QUEUE_ENV) or DEFAULT_TASK_QUEUE


@dataclass(frozen=True)
class TemporalSettings:
    """The Temporal engine's settings for one QWIT client.

    ``qwit.connect(task_queue=..., temporal_client=..., **temporal_options)``
    builds them.

    Attributes:
        task_queue: The task queue flows are started on.
        temporal_client: An existing temporalio client to use as is (it
            should have ``qwit.temporal.QwitPlugin()`` among its plugins).
        connect_options: Overrides for ``temporalio.client.Client.connect``
            over Temporal's environment config (``target_host=...``).
        result_polls: Long polls for flows' ends held at once (None:
            ``$QWIT_RESULT_POLLS`` or 100).
        unavailable_timeout: Seconds ``result()`` waits for a Temporal that
            does not answer (None: ``$QWIT_UNAVAILABLE_TIMEOUT`` or 300).
    """

    backend = "temporal"

    task_queue: str = field(default_factory=default_task_queue)
    temporal_client: temporalio.client.Client | None = None
    connect_options: dict[str, Any] = field(default_factory=dict)
    result_polls: int | None = None
    unavailable_timeout: float | None = None
