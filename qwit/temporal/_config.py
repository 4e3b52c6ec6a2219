"""The Temporal engine's own settings: which task queue flows and workers use."""

from __future__ import annotations

import os

#: Environment variable naming the task queue of clients and workers.
TASK_QUEUE_ENV = "QWIT_TASK_QUEUE"
DEFAULT_TASK_QUEUE = "qwit"


def default_task_queue() -> str:
    """``$QWIT_TASK_QUEUE``, or ``qwit``."""
    return os.environ.get(TASK_QUEUE_ENV) or DEFAULT_TASK_QUEUE
