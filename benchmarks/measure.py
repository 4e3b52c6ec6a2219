"""Measurements: each runs QWIT and the hand-written saga alternately, so that
the machine's noise falls on both alike."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import temporalio.client
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import History, HistoryEvent

from benchmarks.procs import WorkerProcess, cpu_seconds
from benchmarks.shapes import Shape
from benchmarks.sides import Side

_STARTED = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def alternate(sides: Sequence[Side], rep: int) -> Sequence[Side]:
    """Both sides, the first one changing every repetition."""
    return sides if rep % 2 == 0 else list(reversed(sides))


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p50 of an even count: the lower middle)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def run_once(side: Side, shape: Shape) -> tuple[str, float]:
    """Start one flow and wait for its end; its id and milliseconds."""
    started = time.perf_counter()
    run = await side.start(shape)
    await run.result()
    return run.id, (time.perf_counter() - started) * 1000


async def warm_up(sides: Sequence[Side], shapes: Sequence[Shape], times: int) -> None:
    for rep in range(times):
        for shape in shapes:
            for side in alternate(sides, rep):
                await run_once(side, shape)


Samples = dict[str, dict[str, list[float]]]
Ids = dict[str, dict[str, list[str]]]


async def latency(sides: Sequence[Side], shapes: Sequence[Shape], reps: int) -> tuple[Samples, Ids]:
    """Milliseconds from start to result of one flow at a time, by shape and
    side; and the workflow ids of those flows."""
    samples: Samples = {shape.key: {side.name: [] for side in sides} for shape in shapes}
    ids: Ids = {shape.key: {side.name: [] for side in sides} for shape in shapes}
    for rep in range(reps):
        for shape in shapes:
            for side in alternate(sides, rep):
                workflow_id, ms = await run_once(side, shape)
                samples[shape.key][side.name].append(ms)
                ids[shape.key][side.name].append(workflow_id)
        if reps >= 10 and (rep + 1) % max(1, reps // 4) == 0:
            progress(f"    {rep + 1}/{reps}")
    return samples, ids


async def throughput_round(
    side: Side, shape: Shape, flows: int, worker: WorkerProcess, server_pid: int
) -> dict[str, float]:
    """``flows`` flows started at once on one worker, until the last ends."""
    worker_cpu, server_cpu, client_cpu = (
        cpu_seconds(worker.pid),
        cpu_seconds(server_pid),
        time.process_time(),
    )
    started = time.perf_counter()
    runs = await asyncio.gather(*(side.start(shape) for _ in range(flows)))
    await asyncio.gather(*(run.result() for run in runs))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "flows_per_s": flows / seconds,
        "steps_per_s": flows * shape.activities / seconds,
        "worker_cpu_ms_per_flow": (cpu_seconds(worker.pid) - worker_cpu) * 1000 / flows,
        "server_cpu_ms_per_flow": (cpu_seconds(server_pid) - server_cpu) * 1000 / flows,
        "client_cpu_ms_per_flow": (time.process_time() - client_cpu) * 1000 / flows,
    }


async def throughput(
    sides: Sequence[Side],
    shape: Shape,
    flows: int,
    rounds: int,
    workers: dict[str, WorkerProcess],
    server_pid: int,
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    for rep in range(rounds):
        for side in alternate(sides, rep):
            result = await throughput_round(side, shape, flows, workers[side.name], server_pid)
            results[side.name].append(result)
            progress(
                f"    {side.name}: {result['flows_per_s']:.1f} flows/s, "
                f"worker {result['worker_cpu_ms_per_flow']:.1f} ms CPU/flow"
            )
    return results


def _payload_bytes(payloads: Any) -> int:
    return sum(p.ByteSize() for p in payloads.payloads)


def _args_bytes(payloads: Any) -> int:
    """Bytes of the args in an activity's input: QWIT's call sends them as
    its ``args`` field; the hand-written saga's input is all args."""
    size = 0
    for payload in payloads.payloads:
        data = json.loads(payload.data)
        if isinstance(data, dict) and "key" in data:  # QWIT's call
            args = data.get("args")
            size += len(json.dumps(args, separators=(",", ":"))) if args else 0
        else:
            size += len(payload.data)
    return size


def history_figures(events: Sequence[HistoryEvent]) -> dict[str, int]:
    """Size of a workflow's history, and where its bytes go."""
    figures = {
        "events": len(events),
        "bytes": History(events=events).ByteSize(),
        "workflow_tasks": 0,
        "activities_forward": 0,
        "activities_back": 0,
        "markers": 0,
        "input_bytes": 0,
        "activity_input_bytes": 0,
        "activity_args_bytes": 0,
        "activity_summary_bytes": 0,
        "activity_result_bytes": 0,
        "marker_bytes": 0,
        "result_bytes": 0,
    }
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            attrs = event.workflow_execution_started_event_attributes
            figures["input_bytes"] += _payload_bytes(attrs.input)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            figures["workflow_tasks"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled = event.activity_task_scheduled_event_attributes
            back = scheduled.activity_type.name.endswith(".step_back")
            figures["activities_back" if back else "activities_forward"] += 1
            figures["activity_input_bytes"] += _payload_bytes(scheduled.input)
            figures["activity_args_bytes"] += _args_bytes(scheduled.input)
            if event.HasField("user_metadata"):
                figures["activity_summary_bytes"] += event.user_metadata.ByteSize()
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            completed = event.activity_task_completed_event_attributes
            figures["activity_result_bytes"] += _payload_bytes(completed.result)
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            figures["markers"] += 1
            marker = event.marker_recorded_event_attributes
            figures["marker_bytes"] += sum(_payload_bytes(p) for p in marker.details.values())
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
            done = event.workflow_execution_completed_event_attributes
            figures["result_bytes"] += _payload_bytes(done.result)
    return figures


async def history(client: temporalio.client.Client, workflow_id: str) -> dict[str, int]:
    fetched = await client.get_workflow_handle(workflow_id).fetch_history()
    return history_figures(fetched.events)


def _ms(event: HistoryEvent) -> float:
    return event.event_time.ToNanoseconds() / 1e6


def step_phases(events: Sequence[HistoryEvent]) -> dict[str, float]:
    """Where a flow's time goes, from the server's own event times (ms).

    Per step, medians over the flow's steps:

    - ``activity``: the activity scheduled until its completion is recorded
      (its dispatch to the worker, the work, the result's way back);
    - ``task_dispatch``: the next workflow task scheduled until a worker
      picked it up (the server's transfer queue and matching);
    - ``task_run``: that workflow task picked up until completed (the
      worker's SDK and workflow code, and the round trips to the server).

    Once per flow: ``first_task_run``, the first workflow task picked up
    until completed (the workflow created from its input, its first step
    scheduled).
    """
    phases: dict[str, list[float]] = {"activity": [], "task_dispatch": [], "task_run": []}
    first_task_run: float | None = None
    scheduled: dict[int, float] = {}
    task_scheduled = task_started = 0.0
    after_activity = False
    for event in events:
        kind, at = event.event_type, _ms(event)
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            done = event.activity_task_completed_event_attributes
            phases["activity"].append(at - scheduled[done.scheduled_event_id])
            after_activity = True
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            task_scheduled = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            task_started = at
            if after_activity:
                phases["task_dispatch"].append(at - task_scheduled)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            if first_task_run is None:
                first_task_run = at - task_started
            elif after_activity:
                phases["task_run"].append(at - task_started)
            after_activity = False
    found = {name: statistics.median(values) for name, values in phases.items() if values}
    if first_task_run is not None:
        found["first_task_run"] = first_task_run
    return found


async def step_phase_medians(
    client: temporalio.client.Client, ids: dict[str, list[str]], flows: int
) -> dict[str, dict[str, float]]:
    """``step_phases`` of the last ``flows`` flows of each side, medians."""
    found: dict[str, dict[str, float]] = {}
    for side, side_ids in ids.items():
        per_flow = []
        for workflow_id in side_ids[-flows:]:
            fetched = await client.get_workflow_handle(workflow_id).fetch_history()
            per_flow.append(step_phases(fetched.events))
        found[side] = {name: statistics.median(p[name] for p in per_flow) for name in per_flow[0]}
    return found


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
