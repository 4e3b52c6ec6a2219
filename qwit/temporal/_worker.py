"""Temporal workers that serve QWIT steps."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from types import ModuleType
from typing import Any

import temporalio.client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.service import RPCError
from temporalio.worker import Worker

from .._flow import Flow
from .._metrics import BUCKETS, METRICS, WAITING_EVERY
from .._signals import stop_on_signals
from .._step import Step
from ._activities import step_activities
from ._config import default_task_queue
from ._plugin import QwitPlugin

log = logging.getLogger("qwit.worker")

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


#: The visibility query of the flows (and sub-flows) that wait for an operator.
WAITING_QUERY = (
    'WorkflowType = "qwit.Flow" AND ExecutionStatus = "Running" AND QwitStatus = "waiting"'
)


#: Environment variable: ``qwit-worker --metrics-address``.
METRICS_ADDRESS_ENV = "QWIT_METRICS_ADDRESS"


def check_metrics_address(address: str) -> str:
    """``address`` if it is ``HOST:PORT``.

    Raises:
        ValueError: it is not.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a metrics address is HOST:PORT, not {address!r}")
    return address


def metrics_runtime(address: str) -> Runtime:
    """A temporalio ``Runtime`` serving Prometheus text at ``http://ADDRESS/metrics``:
    the SDK's own metrics and QWIT's (``qwit._metrics.METRICS``). Connect the
    worker's client with it (``connect_temporal(runtime=...)``).

    Raises:
        ValueError: ``address`` is not ``HOST:PORT``.
    """
    check_metrics_address(address)
    prometheus = PrometheusConfig(bind_address=address, histogram_bucket_overrides=BUCKETS)
    return Runtime(telemetry=TelemetryConfig(metrics=prometheus))


async def count_waiting(
    client: temporalio.client.Client,
    every: float = WAITING_EVERY,
    task_queue: str | None = None,
) -> None:
    """Set the gauge ``qwit_flows_waiting`` of the client's runtime to the
    number of flows on ``task_queue`` (default: the default task queue) that
    wait for an operator, every ``every`` seconds, until cancelled. The gauge
    carries the label ``task_queue``: workers of other queues in the same
    namespace count their own flows."""
    task_queue = task_queue or default_task_queue()
    runtime = client.service_client.config.runtime or Runtime.default()
    _, unit, description, _ = METRICS["qwit_flows_waiting"]
    gauge = runtime.metric_meter.create_gauge(
        "qwit_flows_waiting", description, unit or None
    ).with_additional_attributes({"task_queue": task_queue})
    query = f"{WAITING_QUERY} AND TaskQueue = {json.dumps(task_queue)}"
    warned = False
    while True:
        try:
            gauge.set((await client.count_workflows(query)).count)
        except RPCError as err:
            if not warned:  # e.g. a namespace without QWIT's search attributes
                log.warning("can't count the waiting flows: %s", err.message)
                warned = True
        await asyncio.sleep(every)


async def serve(
    client: temporalio.client.Client,
    *members: type[Step] | type[Flow] | ModuleType,
    task_queue: str | None = None,
    stop: asyncio.Event | None = None,
    waiting_every: float | None = None,
    **worker_options: Any,
) -> None:
    """Run a worker until SIGINT or SIGTERM (or ``stop`` is set), then shut
    it down gracefully. With ``waiting_every``, it also keeps the gauge
    ``qwit_flows_waiting`` (see ``count_waiting``)."""
    worker = create_worker(client, *members, task_queue=task_queue, **worker_options)
    counting = (
        asyncio.ensure_future(count_waiting(client, waiting_every, task_queue))
        if waiting_every
        else None
    )
    try:
        with stop_on_signals(stop) as stopping:
            async with worker:
                await stopping.wait()
    finally:
        if counting is not None:
            counting.cancel()
