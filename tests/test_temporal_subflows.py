"""Sub-flows, cancellation and failing compensation (CONTRACT sections 2 and 4),
against a real Temporal dev server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus

import qwit
from qwit.temporal import create_worker
from tests import ledger
from tests.history_flows import HoldChildStart
from tests.ledger import Effect


def new_ledger() -> str:
    return uuid.uuid4().hex


class O1(Effect):
    pass


class O2(Effect):
    pass


class I1(Effect):
    pass


class I2(Effect):
    pass


class Inner(qwit.Flow):
    def build_flow(self) -> None:
        self.step(I1)
        self.step(I2)


class Outer(qwit.Flow):
    def build_flow(self) -> None:
        self.step(O1)
        self.step(Inner, {"scope": "inner-only"})
        self.step(O2)


async def history_events(temporal_client: Any, workflow_id: str) -> list[Any]:
    history = await temporal_client.get_workflow_handle(workflow_id).fetch_history()
    return list(history.events)


def scheduled_activities(events: list[Any]) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


async def test_sub_flow_args_scoping_and_child_workflow(client, worker, temporal_client):
    run = new_ledger()
    flow_id = f"outer-{run}"
    async with worker(Outer):
        result = await client.run(Outer, {"ledger": run}, id=flow_id)
    # the sub-flow's static args are seen by its steps, not by the parent's later steps
    assert result == {
        "ledger": run,
        "out_O1": "-",
        "out_I1": "inner-only",
        "out_I2": "inner-only",
        "out_O2": "-",
    }
    events = await history_events(temporal_client, flow_id)
    children = [
        e.start_child_workflow_execution_initiated_event_attributes
        for e in events
        if e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
    ]
    assert [(c.workflow_type.name, c.workflow_id) for c in children] == [
        ("qwit.Flow", f"{flow_id}/~2")
    ]
    child_events = await history_events(temporal_client, f"{flow_id}/~2")
    assert scheduled_activities(child_events) == ["I1.step_forward", "I2.step_forward"]
    assert ledger.applied(run) == ["O1", "I1", "I2", "O2"]
    assert ledger.undone(run) == []


async def test_failure_after_a_completed_sub_flow_undoes_it_in_its_own_execution(
    client, worker, temporal_client
):
    run = new_ledger()
    flow_id = f"outer-{run}"
    async with worker(Outer):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(Outer, {"ledger": run, "fail": "O2"}, id=flow_id)
    assert info.value.step == "O2"
    assert info.value.compensated == ["O2", "I2", "I1", "O1"]
    assert ledger.entries(run) == [
        ("do", "O1"),
        ("do", "I1"),
        ("do", "I2"),
        ("undo", "I2"),
        ("undo", "I1"),
        ("undo", "O1"),
    ]
    # the sub-flow's undo is recorded in the sub-flow's execution, not the parent's
    child = scheduled_activities(await history_events(temporal_client, f"{flow_id}/~2"))
    assert child == ["I1.step_forward", "I2.step_forward", "I2.step_back", "I1.step_back"]
    parent = scheduled_activities(await history_events(temporal_client, flow_id))
    assert parent == ["O1.step_forward", "O2.step_forward", "O2.step_back", "O1.step_back"]


async def test_failure_inside_a_sub_flow_rolls_it_back_then_the_parent(client, worker):
    run = new_ledger()
    async with worker(Outer):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(Outer, {"ledger": run, "fail": "I2", "fail_after": True})
    err = info.value
    assert err.step == "I2"
    assert err.reason == "StepError: I2 failed after its effect"
    assert err.compensated == ["I2", "I1", "O1"]
    assert ledger.applied(run) == ["O1", "I1", "I2"]
    ledger.assert_fully_undone(run)


class A(Effect):
    pass


class B(Effect):
    pass


class C(Effect):
    pass


class D(Effect):
    pass


class E(Effect):
    pass


class Level3(qwit.Flow):
    def build_flow(self) -> None:
        self.step(C)
        self.step(D)


class Level2(qwit.Flow):
    def build_flow(self) -> None:
        self.step(B)
        self.step(Level3)


class Level1(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Level2)
        self.step(E)


@pytest.mark.parametrize(
    ("fail", "compensated"),
    [
        (None, None),
        ("E", ["E", "D", "C", "B", "A"]),
        ("D", ["D", "C", "B", "A"]),
        ("B", ["B", "A"]),
    ],
)
async def test_three_levels_of_nesting(client, worker, fail, compensated):
    run = new_ledger()
    async with worker(Level1):
        if fail is None:
            result = await client.run(Level1, {"ledger": run})
            assert set(result) == {"ledger", "out_A", "out_B", "out_C", "out_D", "out_E"}
            assert ledger.applied(run) == ["A", "B", "C", "D", "E"]
            assert ledger.undone(run) == []
            return
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(Level1, {"ledger": run, "fail": fail, "fail_after": True})
    assert info.value.step == fail
    assert info.value.compensated == compensated
    ledger.assert_fully_undone(run)
    assert ledger.applied(run)[-1] == fail


# -- cancellation ------------------------------------------------------------------


class Slow(Effect):
    """Applies its effect, then works until cancelled, heartbeating."""

    heartbeat_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "do", "Slow")
        ledger.record(args["ledger"], "started", "Slow")
        try:
            while True:
                qwit.heartbeat()
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            ledger.record(args["ledger"], "learned-cancel", "Slow")
            raise

    async def step_back(self, args: dict[str, Any]) -> None:
        if "Slow" in ledger.applied(args["ledger"]):
            ledger.record(args["ledger"], "undo", "Slow")


class SlowSync(Effect):
    """A plain (threaded) step: learns of the cancel through its context."""

    heartbeat_timeout = 2

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:  # type: ignore[override]
        import time

        ledger.record(args["ledger"], "do", "SlowSync")
        ledger.record(args["ledger"], "started", "SlowSync")
        while not qwit.context().cancelled:
            qwit.heartbeat()
            time.sleep(0.05)
        ledger.record(args["ledger"], "learned-cancel", "SlowSync")
        raise RuntimeError("stopped: the flow was cancelled")

    def step_back(self, args: dict[str, Any]) -> None:  # type: ignore[override]
        if "SlowSync" in ledger.applied(args["ledger"]):
            ledger.record(args["ledger"], "undo", "SlowSync")


class CancelMe(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Slow)
        self.step(C)


class CancelMeSync(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(SlowSync)
        self.step(C)


@pytest.mark.parametrize(("flow", "slow"), [(CancelMe, "Slow"), (CancelMeSync, "SlowSync")])
async def test_cancel_during_a_step_rolls_back_it_and_the_completed_ones(
    client, worker, flow, slow
):
    run = new_ledger()
    async with worker(flow):
        handle = await client.start(flow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", slow)
        await handle.cancel()
        with pytest.raises(qwit.FlowCancelled) as info:
            await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    assert isinstance(info.value, qwit.FlowRolledBack)
    assert info.value.step == slow
    assert info.value.compensated == [slow, "A"]
    assert ledger.marks(run, "learned-cancel") == [slow]
    assert ledger.applied(run) == ["A", slow]
    ledger.assert_fully_undone(run)
    assert state.status == "cancelled"
    assert [s.status for s in state.steps] == ["compensated", "compensated", "pending"]


async def test_a_cancel_from_temporals_cli_rolls_back_too(client, worker, dev_server):
    import subprocess

    from qwit.temporal import find_temporal_cli

    run = new_ledger()
    async with worker(CancelMe):
        handle = await client.start(CancelMe, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        proc = await asyncio.to_thread(
            subprocess.run,
            [
                find_temporal_cli(),
                "workflow",
                "cancel",
                "--address",
                dev_server.address,
                "--workflow-id",
                handle.id,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        with pytest.raises(qwit.FlowCancelled) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert info.value.compensated == ["Slow", "A"]
    ledger.assert_fully_undone(run)


class CancelInside(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(CancelMe)
        self.step(E)


async def test_cancel_during_a_step_of_a_sub_flow(client, worker):
    run = new_ledger()
    async with worker(CancelInside):
        handle = await client.start(CancelInside, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel()
        with pytest.raises(qwit.FlowCancelled) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert info.value.compensated == ["Slow", "A", "A"]
    assert ledger.entries(run) == [
        ("do", "A"),
        ("do", "A"),
        ("do", "Slow"),
        ("started", "Slow"),
        ("learned-cancel", "Slow"),
        ("undo", "Slow"),
        ("undo", "A"),
        ("undo", "A"),
    ]


class StartRaced(qwit.Flow):
    def build_flow(self) -> None:
        self.step(CancelMe)


async def test_a_cancel_while_a_sub_flow_starts_stops_the_sub_flow(
    client, temporal_client, task_queue
):
    """The cancel lands while the parent's task that starts the child is in
    flight: the parent learns of it before it learns the child started. The
    started child must still be cancelled and awaited (it undoes itself),
    not left to be terminated when its parent closes."""
    codec = HoldChildStart()
    holding = codec.client(temporal_client)
    run = new_ledger()
    async with create_worker(holding, StartRaced, task_queue=task_queue):
        handle = await client.start(StartRaced, {"ledger": run})
        await asyncio.wait_for(codec.holding.wait(), 30)
        await handle.cancel()
        codec.release.set()
        with pytest.raises(qwit.FlowCancelled):
            await asyncio.wait_for(handle.result(), 30)
        events = await history_events(temporal_client, handle.id)
        [child] = [
            e.start_child_workflow_execution_initiated_event_attributes.workflow_id
            for e in events
            if e.event_type == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED
        ]
        described = await temporal_client.get_workflow_handle(child).describe()
    assert described.status != WorkflowExecutionStatus.TERMINATED
    assert described.status != WorkflowExecutionStatus.RUNNING
    ledger.assert_fully_undone(run)


class Parked(qwit.Flow):
    """A completed sub-flow, then a slow step: the cancel finds the sub-flow parked."""

    def build_flow(self) -> None:
        self.step(Level3)
        self.step(Slow)


async def test_cancel_after_a_sub_flow_completed(client, worker):
    run = new_ledger()
    async with worker(Parked):
        handle = await client.start(Parked, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel()
        with pytest.raises(qwit.FlowCancelled) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert info.value.compensated == ["Slow", "D", "C"]
    ledger.assert_fully_undone(run)


class SlowBack(Effect):
    """Its undo takes a while: time to cancel during the rollback."""

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo-started", "SlowBack")
        await asyncio.sleep(1.0)
        await super().step_back(args)


class RollbackThenCancel(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(SlowBack)
        self.step(C)


async def test_cancel_during_the_rollback_changes_nothing(client, worker):
    run = new_ledger()
    async with worker(RollbackThenCancel):
        handle = await client.start(RollbackThenCancel, {"ledger": run, "fail": "C"})
        await ledger.wait_for_mark(run, "undo-started", "SlowBack")
        await handle.cancel()
        await handle.cancel()
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert type(info.value) is qwit.FlowRolledBack
    assert info.value.step == "C"
    assert info.value.compensated == ["C", "SlowBack", "A"]
    ledger.assert_fully_undone(run)


# -- failing compensation ------------------------------------------------------------


class BadBack(Effect):
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo-attempt", "BadBack")
        raise ConnectionError("the refund service is down")


class BadBackFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(BadBack)
        self.step(Inner)
        self.step(C)


async def test_failing_compensation_still_undoes_the_rest(client, worker):
    run = new_ledger()
    async with worker(BadBackFlow):
        with pytest.raises(qwit.CompensationFailed) as info:
            await client.run(BadBackFlow, {"ledger": run, "fail": "C"})
        state = await client.get_handle(info.value.flow_id).state()
    err = info.value
    assert err.step == "C"
    assert err.compensated == ["C", "I2", "I1", "A"]
    assert err.failed_compensations == ["BadBack"]
    assert ledger.marks(run, "undo-attempt") == ["BadBack", "BadBack"]
    assert ledger.undone(run) == ["I2", "I1", "A"]
    assert state.status == "compensation_failed"
    assert [s.status for s in state.steps] == [
        "compensated",
        "compensation_failed",
        "compensated",
        "compensated",
    ]


def test_default_back_retry_is_generous():
    budget = qwit.Step.back_retry or qwit._options.DEFAULT_BACK_RETRY
    assert budget.max_attempts is not None and budget.max_attempts >= 10
    total = budget.budget()
    assert total is not None and total >= 20 * 60


async def test_state_of_an_ended_flow_needs_no_worker(client, worker):
    run = new_ledger()
    async with worker(Outer):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(Outer, {"ledger": run, "fail": "O2"})
    # no worker polls the task queue now: the state is rebuilt from the history
    state = await client.get_handle(info.value.flow_id).state()
    assert state.status == "rolled_back"
    assert [(s.name, s.status) for s in state.steps] == [
        ("O1", "compensated"),
        ("Inner", "compensated"),
        ("O2", "compensated"),
    ]
    assert [s.status for s in state.steps[1].steps] == ["compensated", "compensated"]
    assert state.failure is not None
    assert state.failure.compensated == ["O2", "I2", "I1", "O1"]
