"""A map over 10,000 items on a real Temporal dev server, completing and failing.

    python -m tests.reliability.big_map [--items 10000] [--fail-at 9990] [--concurrency 200]

Runs one flow (a step, a map over ``--items`` elements, a step) to its end,
then the same flow failing at element ``--fail-at``, on one in-process worker.
Each element records its effect and its undo in memory; the run checks that
the completed map applied every element exactly once and undid nothing, that
the failed one undid every element it applied exactly once (and nothing it
did not apply), then the step before the map, last; and that every workflow
of the flow (the root and the map's shards) stayed within Temporal's limits.
It prints the wall time of each flow, the number of shards and the largest
history among them. Exits non-zero on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import temporalio.client

import qwit
from qwit.temporal import DevServer, connect_temporal, create_worker

#: Temporal's limits per workflow execution (history events, bytes).
MAX_EVENTS = 51_200
MAX_BYTES = 50 * 1024 * 1024

_lock = threading.Lock()
_done: dict[str, Counter[int]] = {}
_undone: dict[str, Counter[int]] = {}
_order: dict[str, list[str]] = {}


class Element(qwit.Step, name="big_map.element"):
    retry = qwit.Retry(max_attempts=3, initial_interval=0.2)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, int]:
        index = qwit.context().index
        assert index is not None
        if index == args.get("fail_at"):
            raise qwit.StepError(f"element {index} fails on purpose", retry=False)
        with _lock:
            _done[args["run"]][index] += 1
        return {"n": index}

    async def step_back(self, args: dict[str, Any]) -> None:
        index = qwit.context().index
        assert index is not None
        with _lock:
            if _done[args["run"]][index]:  # only what was applied
                _undone[args["run"]][index] += 1


class Edge(qwit.Step, name="big_map.edge"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, bool]:
        with _lock:
            _order[args["run"]].append(f"do {args['edge']}")
        return {f"edge_{args['edge']}": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        with _lock:
            _order[args["run"]].append(f"undo {args['edge']}")


class BigMap(qwit.Flow, name="big_map.flow"):
    def build_flow(self) -> None:
        self.step(Edge, {"edge": "before"})
        self.map(Element, over="items", item="item", into="out", max_concurrency=CONCURRENCY)
        self.step(Edge, {"edge": "after"})


CONCURRENCY = 200


async def _histories(temporal: temporalio.client.Client, flow_id: str) -> tuple[int, int, int]:
    """(workflows, most events, most bytes) of the flow and its shards."""
    most_events = most_bytes = count = 0
    async for execution in temporal.list_workflows(
        f"WorkflowId = '{flow_id}' OR WorkflowId STARTS_WITH '{flow_id}/~'"
    ):
        history = await temporal.get_workflow_handle(execution.id).fetch_history()
        count += 1
        most_events = max(most_events, len(history.events))
        most_bytes = max(most_bytes, sum(e.ByteSize() for e in history.events))
    return count, most_events, most_bytes


async def one(
    client: qwit.Client, temporal: temporalio.client.Client, items: int, fail_at: int | None
) -> list[str]:
    run = uuid.uuid4().hex
    _done[run], _undone[run], _order[run] = Counter(), Counter(), []
    args: dict[str, Any] = {"run": run, "items": list(range(items))}
    if fail_at is not None:
        args["fail_at"] = fail_at
    started = time.perf_counter()
    handle = await client.start(BigMap, args, id=f"big-map-{run[:8]}")
    problems: list[str] = []
    try:
        result = await handle.result()
        outcome = "completed"
        if len(result["out"]) != items or any(o["n"] != i for i, o in enumerate(result["out"])):
            problems.append("the outputs are not one per element, in order")
    except qwit.FlowRolledBack as failed:
        outcome = f"rolled back ({failed.reason})"
    seconds = time.perf_counter() - started
    done, undone = _done[run], _undone[run]
    twice = [i for i, n in done.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} elements applied more than once")
    if fail_at is None:
        if len(done) != items:
            problems.append(f"{len(done)} of {items} elements applied")
        if undone:
            problems.append(f"{len(undone)} elements undone in a completed flow")
    else:
        if set(undone) != set(done):
            problems.append(f"{len(done)} applied, {len(undone)} undone")
        if any(n != 1 for n in undone.values()):
            problems.append("an element undone more than once")
        if _order[run] != ["do before", "undo before"]:
            problems.append(f"the step before the map: {_order[run]}")
    count, events, size = await _histories(temporal, handle.id)
    if events > MAX_EVENTS or size > MAX_BYTES:
        problems.append(f"a history of {events} events, {size} bytes: over Temporal's limits")
    print(
        f"{items} items{'' if fail_at is None else f', failing at {fail_at}'}: {outcome} in "
        f"{seconds:.1f} s; {len(done)} applied, {sum(undone.values())} undone; "
        f"{count} workflows (root and shards), the largest history {events} events, "
        f"{size / 1e6:.1f} MB",
        flush=True,
    )
    return problems


async def main(items: int, fail_at: int, concurrency: int) -> int:
    global CONCURRENCY
    CONCURRENCY = concurrency
    queue = f"big-map-{uuid.uuid4().hex[:8]}"
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        async with create_worker(
            temporal,
            BigMap,
            task_queue=queue,
            max_concurrent_activities=concurrency,
        ):
            problems = await one(client, temporal, items, None)
            problems += await one(client, temporal, items, fail_at)
    for problem in problems:
        print(f"VIOLATION: {problem}")
    print("OK" if not problems else f"{len(problems)} violations")
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--fail-at", type=int, default=9_990)
    parser.add_argument("--concurrency", type=int, default=200)
    ns = parser.parse_args()
    sys.exit(asyncio.run(main(ns.items, ns.fail_at, ns.concurrency)))
