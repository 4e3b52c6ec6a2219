"""Temporal workers that serve QWIT steps."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from types import ModuleType
from typing import Any

import temporalio.client
from temporalio.worker import Worker

from .._flow import Flow
from .._step import Step
from ._activities import step_activities
from ._config import default_task_queue
from ._plugin import QwitPlugin

#: How long a stopping worker lets steps in flight finish before cancelling them.
DEFAULT_GRACEFUL_SHUTDOWN = timedelta(seconds=30)


def create_worker(
    client: temporalio.client.Client,
    *members: type[Step] | type[Flow] | ModuleType,
    task_queue: str | None = None,
    graceful_shutdown_timeout: timedelta = DEFAULT_GRACEFUL_SHUTDOWN,
    **worker_options: Any,
) -> Worker:
    """A temporalio Worker that runs QWIT flows and the given steps.

    Args:
        client: A temporalio client (e.g. ``qwit.temporal.connect_temporal()``).
        *members: Step classes, Flow classes or modules to serve.
        task_queue: Default ``$QWIT_TASK_QUEUE`` or ``qwit``.
        graceful_shutdown_timeout: Time steps in flight get to finish when the
            worker stops.
        **worker_options: Passed to ``temporalio.worker.Worker``.
    """
    plugin = QwitPlugin(*members)
    if any(isinstance(p, QwitPlugin) for p in client.config()["plugins"]):
        # The client's own QwitPlugin sets the worker up; add only the steps.
        extra: dict[str, Any] = {"activities": step_activities(plugin.registry)}
    else:
        extra = {"plugins": [plugin]}
    return Worker(
        client,
        task_queue=task_queue or default_task_queue(),
        graceful_shutdown_timeout=graceful_shutdown_timeout,
        **extra,
        **worker_options,
    )


async def serve(
    client: temporalio.client.Client,
    *members: type[Step] | type[Flow] | ModuleType,
    task_queue: str | None = None,
    stop: asyncio.Event | None = None,
    **worker_options: Any,
) -> None:
    """Run a worker until SIGINT or SIGTERM (or ``stop`` is set), then shut
    it down gracefully."""
    worker = create_worker(client, *members, task_queue=task_queue, **worker_options)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
    try:
        async with worker:
            await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
