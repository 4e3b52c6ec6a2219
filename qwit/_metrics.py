"""The metrics QWIT records, what each means, and their labels.

The saga interpreter records them through its runtime (``FlowRuntime.record``)
so that every engine can export them its own way. On Temporal they go
through Temporal's own runtime telemetry (``workflow.metric_meter()``): the
worker's one Prometheus endpoint (``qwit-worker --metrics-address``) serves
them beside the SDK's own metrics, nothing is recorded twice when a flow
replays, and no other dependency is needed; Temporal adds ``namespace``,
``task_queue`` and ``workflow_type`` to every one. ``qwit.local`` records
none (it is for tests and scripts).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["counter", "histogram", "gauge"]

#: name -> (kind, unit, description, labels).
METRICS: dict[str, tuple[Kind, str, str, tuple[str, ...]]] = {
    "qwit_flows_started": (
        "counter",
        "",
        "Flows (and sub-flows) that started.",
        ("flow",),
    ),
    "qwit_flows_ended": (
        "counter",
        "",
        "Flows (and sub-flows) that ended, by outcome (completed, rolled_back, "
        "cancelled, compensation_failed, aborted).",
        ("flow", "outcome"),
    ),
    "qwit_steps": (
        "counter",
        "",
        "Runs of one direction of a step (its retries included), by outcome "
        "(done, failed, cancelled).",
        ("step", "direction", "outcome"),
    ),
    "qwit_step_seconds": (
        "histogram",
        "s",
        "How long one direction of a step took, its retries included.",
        ("step", "direction"),
    ),
    "qwit_compensations": (
        "counter",
        "",
        "Undos of steps by a rollback, by outcome (compensated, compensation_failed).",
        ("step", "outcome"),
    ),
    "qwit_waits": (
        "counter",
        "",
        "Times a step began waiting for an operator.",
        ("step",),
    ),
    "qwit_wait_seconds": (
        "histogram",
        "s",
        "How long a step waited for an operator's decision.",
        ("step",),
    ),
    "qwit_flows_waiting": (
        "gauge",
        "",
        "Flows waiting for an operator now (counted by the worker from Temporal's "
        "visibility, every few seconds).",
        (),
    ),
}
