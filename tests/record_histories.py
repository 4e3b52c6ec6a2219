"""Record the workflow histories replayed by tests/test_replay.py.

    python -m tests.record_histories [NAME ...]

Starts its own dev server and worker, runs each scenario and writes
tests/histories/plan<N>.<name>.json, N the plan version of this QWIT (the
files without a version were recorded with plan version 1). Existing files
are kept unless named.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import temporalio.client
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

import qwit
from qwit._plan import PLAN_VERSION
from qwit.temporal import DevServer, connect_temporal, create_worker
from qwit.testing import wait_for_status
from tests.history_flows import (
    AbortedOrder,
    ApprovedOrder,
    ApprovedQuote,
    Cancellable,
    EndsWithASlowWave,
    GreetAll,
    GreetAllBesideWaits,
    HeldOrder,
    HoldChildStart,
    OrderFlow,
    ParallelOrder,
    Quote,
    RefundOrder,
    ShippedOrder,
)

HISTORIES = Path(__file__).parent / "histories"

Scenario = Callable[[qwit.Client], Awaitable[str]]


async def ended_with(handle: qwit.FlowHandle, error: type[qwit.FlowFailed]) -> str:
    """The flow's id, once it has ended with ``error`` (and nothing else)."""
    with contextlib.suppress(error):
        await handle.result()
        raise AssertionError(f"flow {handle.id} should have ended with {error.__name__}")
    return handle.id


async def completed(client: qwit.Client) -> str:
    handle = await client.start(OrderFlow, {"order_id": 1}, id="history-completed")
    await handle.result()
    return handle.id


async def rolled_back(client: qwit.Client) -> str:
    handle = await client.start(
        OrderFlow, {"order_id": 2, "fail_payment": True}, id="history-rolled-back"
    )
    return await ended_with(handle, qwit.FlowRolledBack)


async def subflow_completed(client: qwit.Client) -> str:
    handle = await client.start(ShippedOrder, {"order_id": 3}, id="history-subflow-completed")
    await handle.result()
    return handle.id


async def subflow_rolled_back(client: qwit.Client) -> str:
    handle = await client.start(
        ShippedOrder, {"order_id": 4, "fail_notify": True}, id="history-subflow-rolled-back"
    )
    return await ended_with(handle, qwit.FlowRolledBack)


async def cancelled(client: qwit.Client) -> str:
    handle = await client.start(Cancellable, {"order_id": 5}, id="history-cancelled")
    for _ in range(200):
        state = await handle.state()
        if state.steps[-1].status == "running":
            break
        await asyncio.sleep(0.05)
    await handle.cancel()
    return await ended_with(handle, qwit.FlowCancelled)


async def until_waiting(handle: qwit.FlowHandle) -> None:
    await wait_for_status(handle, "waiting", timeout=20)


async def waited_retry(client: qwit.Client) -> str:
    handle = await client.start(ApprovedOrder, {"order_id": 6}, id="history-waited-retry")
    await until_waiting(handle)
    await handle.react(qwit.RETRY, args={"approved": True, "approver": "alice"})
    await handle.result()
    return handle.id


async def waited_then_final(client: qwit.Client) -> str:
    handle = await client.start(ApprovedQuote, {"order_id": 16}, id="history-waited-then-final")
    await until_waiting(handle)
    await handle.react(qwit.RETRY, args={"approved": True})
    await handle.result()
    return handle.id


async def waited_rollback(client: qwit.Client) -> str:
    handle = await client.start(ApprovedOrder, {"order_id": 7}, id="history-waited-rollback")
    await until_waiting(handle)
    await handle.react(qwit.ROLLBACK)
    return await ended_with(handle, qwit.FlowRolledBack)


async def waited_compensation(client: qwit.Client) -> str:
    handle = await client.start(
        RefundOrder, {"order_id": 8, "fail_notify": True}, id="history-waited-compensation"
    )
    await until_waiting(handle)
    await handle.react(qwit.SKIP)
    return await ended_with(handle, qwit.CompensationFailed)


async def parallel_completed(client: qwit.Client) -> str:
    handle = await client.start(
        ParallelOrder, {"order_id": 9, "users": ["ann", "bo", "cy"]}, id="history-parallel"
    )
    await handle.result()
    return handle.id


async def parallel_rolled_back(client: qwit.Client) -> str:
    handle = await client.start(
        ParallelOrder,
        {"order_id": 10, "users": ["ann", "bo", "cy"], "fail_notify": True},
        id="history-parallel-rolled-back",
    )
    return await ended_with(handle, qwit.FlowRolledBack)


async def parallel_waited(client: qwit.Client) -> str:
    handle = await client.start(
        ParallelOrder,
        {"order_id": 11, "users": ["ann"], "fail_pack": True},
        id="history-parallel-waited",
    )
    await until_waiting(handle)
    await handle.react(qwit.RETRY, args={"fail_pack": False}, path="2.3")
    await handle.result()
    return handle.id


async def until_bob_ran_in_anns_place(handle: qwit.FlowHandle) -> None:
    """Until ann's element of a map (one at a time) waits and bob's, run in
    her place meanwhile, is done."""
    for _ in range(200):
        state = await handle.state()
        if state.waits and state.steps[0].steps[1].status == "done":
            return
        await asyncio.sleep(0.05)


async def subflow_gave_place(client: qwit.Client) -> str:
    handle = await client.start(
        GreetAll, {"users": ["ann", "bob"], "hold": "ann"}, id="history-subflow-gave-place"
    )
    await until_bob_ran_in_anns_place(handle)
    await handle.react(qwit.RETRY, args={"hold": None}, path="1.1.1")
    await handle.result()
    return handle.id


async def subflow_indexed(client: qwit.Client) -> str:
    # each element's step is told its index (the sub-flows' inputs carry it)
    handle = await client.start(GreetAll, {"users": ["ann", "bob"]}, id="history-subflow-indexed")
    await handle.result()
    return handle.id


async def block_wait_gave_place(client: qwit.Client) -> str:
    handle = await client.start(
        GreetAllBesideWaits,
        {"users": ["ann", "bob"], "hold": "ann"},
        id="history-block-wait-gave-place",
    )
    await until_bob_ran_in_anns_place(handle)
    await handle.react(qwit.RETRY, args={"hold": None}, path="1.1.1.1")
    await handle.result()
    return handle.id


async def subflow_undo_took_place(client: qwit.Client) -> str:
    # ann's element waits (its place given to bob's); ROLLBACK: it takes a
    # place again before it undoes anything
    handle = await client.start(
        GreetAll, {"users": ["ann", "bob"], "hold": "ann"}, id="history-subflow-undo-took-place"
    )
    await until_bob_ran_in_anns_place(handle)
    await handle.react(qwit.ROLLBACK, path="1.1.1")
    with contextlib.suppress(qwit.FlowFailed):
        await handle.result()
    return handle.id


async def cancelled_in_place_first(client: qwit.Client) -> str:
    # ann's element waits (its place given to bob's, whose step is slow); a
    # cancel stops and undoes bob's element first, then ann's
    handle = await client.start(
        GreetAll,
        {"users": ["ann", "bob"], "hold": "ann", "slow": "bob"},
        id="history-cancelled-in-place-first",
    )
    for _ in range(200):
        state = await handle.state()
        if state.waits and state.steps[0].steps[1].status == "running":
            break
        await asyncio.sleep(0.05)
    await handle.cancel()
    return await ended_with(handle, qwit.FlowCancelled)


async def cancelled_at_the_end(client: qwit.Client) -> str:
    # cancelled while its last step runs, which completes anyway: the flow is
    # cancelled all the same
    handle = await client.start(
        EndsWithASlowWave, {"user": "ann"}, id="history-cancelled-at-the-end"
    )
    for _ in range(200):
        state = await handle.state()
        if state.steps[1].status == "running":
            break
        await asyncio.sleep(0.05)
    await handle.cancel()
    return await ended_with(handle, qwit.FlowCancelled)


async def decided_at_once(client: qwit.Client) -> str:
    # two decisions sent together: the first stands, the other is refused
    handle = await client.start(ApprovedOrder, {"order_id": 17}, id="history-decided-at-once")
    await until_waiting(handle)
    tried = await asyncio.gather(
        handle.react(qwit.RETRY, args={"approved": True, "approver": "alice"}),
        handle.react(qwit.ROLLBACK),
        return_exceptions=True,
    )
    assert sum(isinstance(t, qwit.ReactionError) for t in tried) == 1, tried
    with contextlib.suppress(qwit.FlowFailed):
        await handle.result()
    return handle.id


async def subflow_aborted(client: qwit.Client) -> str:
    handle = await client.start(AbortedOrder, {"order_id": 12}, id="history-subflow-aborted")
    return await ended_with(handle, qwit.FlowAborted)


async def recovered(client: qwit.Client) -> str:
    handle = await client.start(Quote, {"order_id": 13, "carrier_down": True}, id="history-quote")
    await handle.result()
    return handle.id


async def recovery_rolled_back(client: qwit.Client) -> str:
    handle = await client.start(
        Quote,
        {"order_id": 14, "carrier_down": True, "fail_payment": True},
        id="history-quote-rolled-back",
    )
    return await ended_with(handle, qwit.FlowRolledBack)


async def cancelled_in_place(client: qwit.Client) -> str:
    handle = await client.start(HeldOrder, {"order_id": 15}, id="history-cancelled-in-place")
    for _ in range(200):
        state = await handle.state()
        if state.steps[1].status == "running":
            break
        await asyncio.sleep(0.05)
    await handle.cancel(rollback=False)
    return await ended_with(handle, qwit.FlowCancelled)


async def redriven(client: qwit.Client) -> str:
    first = await client.start(AbortedOrder, {"order_id": 16}, id="history-redriven")
    await ended_with(first, qwit.FlowAborted)
    again = await client.redrive(first.id)
    # the jammed label still jams: the redriven run aborts again, after undoing
    # and re-running what it resumes from
    return await ended_with(again, qwit.FlowAborted)


async def subflow_start_cancelled(client: qwit.Client, codec: HoldChildStart) -> str:
    # served by a worker whose codec holds the command that starts the child
    handle = await client.start(ShippedOrder, {"order_id": 12}, id="history-start-cancelled")
    await codec.holding.wait()
    await handle.cancel()
    codec.release.set()
    return await ended_with(handle, qwit.FlowCancelled)


HELD: dict[str, Callable[[qwit.Client, HoldChildStart], Awaitable[str]]] = {
    "subflow_start_cancelled": subflow_start_cancelled,
}
"""Scenarios run on a worker of their own, whose codec is a ``HoldChildStart``."""

SCENARIOS: dict[str, Scenario] = {
    "recovered": recovered,
    "recovery_rolled_back": recovery_rolled_back,
    "cancelled_in_place": cancelled_in_place,
    "redriven": redriven,
    "subflow_aborted": subflow_aborted,
    "parallel_completed": parallel_completed,
    "parallel_rolled_back": parallel_rolled_back,
    "parallel_waited": parallel_waited,
    "subflow_gave_place": subflow_gave_place,
    "subflow_indexed": subflow_indexed,
    "block_wait_gave_place": block_wait_gave_place,
    "decided_at_once": decided_at_once,
    "cancelled_in_place_first": cancelled_in_place_first,
    "cancelled_at_the_end": cancelled_at_the_end,
    "subflow_undo_took_place": subflow_undo_took_place,
    "waited_retry": waited_retry,
    "waited_then_final": waited_then_final,
    "waited_rollback": waited_rollback,
    "waited_compensation": waited_compensation,
    "completed": completed,
    "rolled_back": rolled_back,
    "subflow_completed": subflow_completed,
    "subflow_rolled_back": subflow_rolled_back,
    "cancelled": cancelled,
}


def child_ids(history: WorkflowHistory) -> list[str]:
    return [
        e.start_child_workflow_execution_initiated_event_attributes.workflow_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
    ]


async def record(names: list[str]) -> None:
    HISTORIES.mkdir(exist_ok=True)
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        queue = f"record-{uuid.uuid4().hex[:8]}"
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        async with create_worker(
            temporal,
            OrderFlow,
            ShippedOrder,
            Cancellable,
            ApprovedOrder,
            ApprovedQuote,
            RefundOrder,
            ParallelOrder,
            AbortedOrder,
            GreetAll,
            GreetAllBesideWaits,
            EndsWithASlowWave,
            Quote,
            HeldOrder,
            task_queue=queue,
        ):
            for name in names:
                if name in HELD:
                    flow_id = await held(temporal, name)
                else:
                    flow_id = await SCENARIOS[name](client)
                todo = [(f"plan{PLAN_VERSION}.{name}", flow_id)]
                while todo:
                    file, flow_id = todo.pop(0)
                    history = await temporal.get_workflow_handle(flow_id).fetch_history()
                    (HISTORIES / f"{file}.json").write_text(history.to_json())
                    print(f"recorded {file}: {len(history.events)} events")
                    todo += [(f"{file}.child{i + 1}", c) for i, c in enumerate(child_ids(history))]


async def held(temporal: temporalio.client.Client, name: str) -> str:
    """Run ``HELD[name]`` on a queue served by a worker holding child starts."""
    codec = HoldChildStart()
    holding = codec.client(temporal)
    queue = f"record-held-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal, task_queue=queue)
    async with create_worker(holding, ShippedOrder, task_queue=queue):
        return await HELD[name](client, codec)


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:] or [*SCENARIOS, *HELD]))
