"""Parallel blocks and maps: QWIT against a hand-written temporalio workflow
that does the same with ``asyncio.gather`` and a semaphore, and compensates by
hand the same way (on a failure: cancel the siblings, wait for them, undo what
completed, at most the map's concurrency at once).

Both sides run ``benchmarks.work`` under the same activity names
(``item.step_forward``, ``item.step_back``); the failing runs fail their last
branch or element without retry, so every other one is undone.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import temporalio.client
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

import qwit
from benchmarks import work
from benchmarks.hand_workflow import PARALLEL_WORKFLOW, ParallelInput
from benchmarks.procs import cpu_seconds


@dataclass(frozen=True)
class ParallelShape:
    """A parallel block of ``branches`` steps, or a map over ``items`` elements."""

    key: str
    branches: int = 0
    items: int = 0
    concurrency: int = 50
    fail: bool = False

    @property
    def activities(self) -> int:
        return self.branches or self.items


PARALLEL_SHAPES = (
    ParallelShape("parallel_5", branches=5),
    ParallelShape("parallel_5_fail", branches=5, fail=True),
    ParallelShape("map_100", items=100),
    ParallelShape("map_100_fail", items=100, fail=True),
    ParallelShape("map_1000", items=1000),
    ParallelShape("map_1000_fail", items=1000, fail=True),
)

# -- QWIT ---------------------------------------------------------------------


class Item(qwit.Step, name="item"):
    """Branch or element ``i`` (from its path or its index); fails for good
    when it is the one ``args['fail']`` names."""

    retry = qwit.Retry(max_attempts=3)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, str]:
        ctx = qwit.context()
        i = ctx.index if ctx.index is not None else int(ctx.path.rsplit(".", 1)[1]) - 1
        if args.get("fail") == i:
            raise qwit.StepError(f"item {i} failed on purpose", retry=False)
        return work.forward(i)

    async def step_back(self, args: dict[str, Any]) -> None:
        work.back(0)


def _qwit_flow(shape: ParallelShape) -> type[qwit.Flow]:
    class Shape(qwit.Flow, name=f"bench.{shape.key}"):
        def build_flow(self) -> None:
            if shape.branches:
                with self.parallel():
                    for _ in range(shape.branches):
                        self.step(Item)
            else:
                self.map(
                    Item, over="items", item="i", into="out", max_concurrency=shape.concurrency
                )

    return Shape


QWIT_FLOWS = {shape.key: _qwit_flow(shape) for shape in PARALLEL_SHAPES}


def qwit_args(shape: ParallelShape) -> dict[str, Any]:
    args: dict[str, Any] = {"fail": shape.activities - 1} if shape.fail else {}
    if shape.items:
        args["items"] = list(range(shape.items))
    return args


# -- runs ---------------------------------------------------------------------


async def _run_qwit(client: qwit.Client, shape: ParallelShape) -> str:
    handle = await client.start(
        QWIT_FLOWS[shape.key], qwit_args(shape), id=f"qwit.{shape.key}-{uuid.uuid4().hex}"
    )
    try:
        result = await handle.result()
    except qwit.FlowRolledBack as failed:
        if not shape.fail or len(failed.compensated) < shape.activities - 1:
            undid = len(failed.compensated)
            raise AssertionError(f"qwit {shape.key}: rolled back, undid {undid}") from None
        return handle.id
    if shape.fail:
        raise AssertionError(f"qwit {shape.key}: completed, but an item fails")
    outputs = len(result["out"]) if shape.items else sum(k.startswith("r") for k in result)
    if outputs != shape.activities:
        raise AssertionError(f"qwit {shape.key}: {outputs} outputs")
    return handle.id


async def _run_hand(client: temporalio.client.Client, task_queue: str, shape: ParallelShape) -> str:
    workflow_id = f"hand.{shape.key}-{uuid.uuid4().hex}"
    handle = await client.start_workflow(
        PARALLEL_WORKFLOW,
        ParallelInput(
            count=shape.activities,
            concurrency=shape.concurrency if shape.items else None,
            fail=shape.activities - 1 if shape.fail else None,
        ),
        id=workflow_id,
        task_queue=task_queue,
        result_type=dict,
    )
    try:
        result = await handle.result()
    except WorkflowFailureError as err:
        cause = err.cause
        if shape.fail and isinstance(cause, ApplicationError) and cause.type == "SagaRolledBack":
            return workflow_id
        raise
    if shape.fail or len(result["out"]) != shape.activities:
        raise AssertionError(f"hand {shape.key}: wrong outcome")
    return workflow_id


async def measure(env: Any, reps: int, big_reps: int, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Latency (ms), history and worker CPU per flow of every shape but those
    named in ``skip``, both sides, alternating which goes first."""
    from benchmarks.measure import history, progress

    qwit_side, hand_side = env.sides
    found: dict[str, Any] = {}
    for shape in PARALLEL_SHAPES:
        if shape.key in skip:
            continue
        runs = big_reps if shape.activities >= 1000 else reps
        samples: dict[str, list[float]] = {"qwit": [], "hand": []}
        cpu: dict[str, list[float]] = {"qwit": [], "hand": []}
        last: dict[str, str] = {}
        for rep in range(runs):
            for side in ("qwit", "hand") if rep % 2 == 0 else ("hand", "qwit"):
                pid = env.workers[side].pid
                before = cpu_seconds(pid)
                started = time.perf_counter()
                if side == "qwit":
                    last[side] = await _run_qwit(qwit_side.client, shape)
                else:
                    last[side] = await _run_hand(
                        hand_side.client, env.workers["hand"].task_queue, shape
                    )
                samples[side].append((time.perf_counter() - started) * 1000)
                cpu[side].append((cpu_seconds(pid) - before) * 1000)
        found[shape.key] = {
            side: {
                "latency_p50_ms": statistics.median(samples[side]),
                "worker_cpu_ms_per_flow": sum(cpu[side]) / runs,
                "latency_runs_ms": samples[side],
                "worker_cpu_runs_ms": cpu[side],
                **(await history(env.plain, last[side])),
            }
            for side in ("qwit", "hand")
        }
        progress(
            f"    {shape.key}: qwit {found[shape.key]['qwit']['latency_p50_ms']:.0f} ms, "
            f"hand {found[shape.key]['hand']['latency_p50_ms']:.0f} ms"
        )
    return found
