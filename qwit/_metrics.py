"""The metrics QWIT records, what each means, and their labels.

The saga interpreter records them through its runtime (``FlowRuntime.record``)
so that every engine can export them its own way. On Temporal they go
through Temporal's own runtime telemetry (``workflow.metric_meter()``): the
worker's one Prometheus endpoint (``qwit-worker --metrics-address``) serves
them beside the SDK's own metrics, nothing is recorded twice when a flow
replays, and no other dependency is needed; Temporal adds ``namespace``,
``task_queue`` and ``workflow_type`` to every one. On PostgreSQL a worker
keeps them in a ``Metrics`` table of its own and serves it as Prometheus
text (``serve_metrics``); its drivers record nothing while they replay a
journal. ``qwit.local`` records none (it is for tests and scripts).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
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
        "visibility, or from PostgreSQL, every few seconds).",
        (),
    ),
}

#: Seconds between two counts of the waiting flows (``qwit_flows_waiting``)
#: by a worker.
WAITING_EVERY = 15.0

#: Histogram buckets, in seconds, of QWIT's durations (Temporal's defaults are
#: for milliseconds).
BUCKETS: dict[str, list[float]] = {
    "qwit_step_seconds": [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900],
    "qwit_wait_seconds": [1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600],
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """QWIT's metrics (``METRICS``) kept in the process, for engines that
    have no telemetry of their own to record them in; ``render()`` gives
    them as Prometheus text."""

    def __init__(self) -> None:
        self._values: dict[str, dict[Labels, float]] = {}
        #: histogram -> labels -> (count per bucket, sum, count)
        self._histograms: dict[str, dict[Labels, tuple[list[int], float, int]]] = {}

    def record(self, metric: str, value: float, **labels: str) -> None:
        """Add ``value`` to a counter, observe it in a histogram, or set a
        gauge to it.

        Raises:
            KeyError: ``metric`` is not one of QWIT's.
        """
        kind = METRICS[metric][0]
        key = tuple(sorted(labels.items()))
        if kind == "histogram":
            bounds = BUCKETS[metric]
            series = self._histograms.setdefault(metric, {})
            counts, total, count = series.get(key) or ([0] * len(bounds), 0.0, 0)
            index = bisect.bisect_left(bounds, value)
            if index < len(bounds):
                counts[index] += 1
            series[key] = (counts, total + value, count + 1)
            return
        values = self._values.setdefault(metric, {})
        values[key] = value if kind == "gauge" else values.get(key, 0.0) + value

    def value(self, metric: str, **labels: str) -> float:
        """The sum of a counter's or gauge's series whose labels include
        ``labels`` (a histogram: its count)."""
        if METRICS[metric][0] == "histogram":
            series = {k: float(v[2]) for k, v in self._histograms.get(metric, {}).items()}
        else:
            series = self._values.get(metric, {})
        wanted = set(labels.items())
        return sum(v for k, v in series.items() if wanted <= set(k))

    def render(self) -> str:
        """Prometheus text (exposition format 0.0.4)."""
        lines: list[str] = []
        for metric, (kind, _, description, _) in METRICS.items():
            values = self._values.get(metric, {})
            histograms = self._histograms.get(metric, {})
            if not values and not histograms:
                continue
            lines.append(f"# HELP {metric} {description}")
            lines.append(f"# TYPE {metric} {kind}")
            for key, value in sorted(values.items()):
                lines.append(f"{metric}{_labels(key)} {_number(value)}")
            for key, (counts, total, count) in sorted(histograms.items()):
                running = 0
                for bound, n in zip(BUCKETS[metric], counts, strict=True):
                    running += n
                    lines.append(f"{metric}_bucket{_labels(key, le=_number(bound))} {running}")
                lines.append(f"{metric}_bucket{_labels(key, le='+Inf')} {count}")
                lines.append(f"{metric}_sum{_labels(key)} {_number(total)}")
                lines.append(f"{metric}_count{_labels(key)} {count}")
        return "\n".join(lines) + "\n"


def _labels(key: Labels, **extra: str) -> str:
    pairs = [*key, *extra.items()]
    if not pairs:
        return ""
    escaped = (
        (k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in pairs
    )
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


async def serve_metrics(address: str, metrics: Metrics) -> asyncio.AbstractServer:
    """Serve ``metrics`` as Prometheus text at ``http://ADDRESS/metrics``
    (``ADDRESS`` is ``HOST:PORT``); close the returned server to stop."""
    host, _, port = address.rpartition(":")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            request = await reader.readline()
            while (await reader.readline()).strip():
                pass  # the headers
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1] == "/metrics":
                status, body = "200 OK", metrics.render().encode()
            else:
                status, body = "404 Not Found", b"not found: try /metrics\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if parts and parts[0] != "HEAD" else b"")
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, host, int(port))
