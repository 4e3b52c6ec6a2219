"""Temporal's hard limits never terminate a flow: QWIT fails the step and rolls
back instead (dev server with `limit.blobSize.*` set low)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import temporalio.client

import qwit
from qwit.temporal import DevServer, connect_temporal, create_worker
from tests import ledger
from tests.ledger import Effect

LIMIT = 20_000


@pytest.fixture(scope="module")
async def small_server() -> AsyncIterator[temporalio.client.Client]:
    config = [f"limit.blobSize.error={LIMIT}", f"limit.blobSize.warn={LIMIT // 2}"]
    async with DevServer(dynamic_config=config) as server:
        yield await connect_temporal(target_host=server.address)


@pytest.fixture
async def small(small_server: temporalio.client.Client) -> Any:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=small_server, task_queue=queue)

    class Env:
        def __init__(self) -> None:
            self.client = client

        def worker(self, *members: Any) -> Any:
            return create_worker(small_server, *members, task_queue=queue)

    return Env()


class Before(Effect, name="limits.before"):
    pass


class Blob(Effect, name="limits.blob"):
    """Returns `size` bytes under its own key."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        await super().step_forward(args)
        return {f"blob_{args['eid']}": "x" * args["size"]}


class NoUndoBlob(qwit.Step, name="limits.no_undo_blob"):
    """A big output, and nothing to undo."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {f"blob_{args['eid']}": "x" * args["size"]}


class BigOutput(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(NoUndoBlob, {"eid": "b1", "size": 3 * LIMIT})
        self.step(Before)


class TooBigToUndo(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(Blob, {"eid": "b1", "size": LIMIT // 2})
        self.step(Blob, {"eid": "b2", "size": LIMIT // 2})
        self.step(Before)


class Accumulating(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(NoUndoBlob, {"eid": "n1", "size": LIMIT // 2})
        self.step(NoUndoBlob, {"eid": "n2", "size": LIMIT // 2})
        self.step(Before)


async def flow_status(client: temporalio.client.Client, flow_id: str) -> Any:
    return (await client.get_workflow_handle(flow_id).describe()).status


async def test_an_output_over_the_limit_fails_the_step_once_and_rolls_back(small, small_server):
    run = uuid.uuid4().hex
    async with small.worker(BigOutput):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await small.client.run(BigOutput, {"ledger": run})
        state = await small.client.get_handle(info.value.flow_id).state()
    # the worker refuses to send it, as a final failure QWIT names
    assert info.value.step == "limits.no_undo_blob"
    assert info.value.error_type == "qwit.PayloadTooLarge"
    assert "returned 60014 bytes, over the 20000-byte payload limit" in info.value.reason
    assert state.steps[1].attempts == 1
    ledger.assert_fully_undone(run)
    assert await flow_status(small_server, info.value.flow_id) == (
        temporalio.client.WorkflowExecutionStatus.FAILED
    )


async def test_an_output_too_big_to_undo_fails_its_step_which_is_undone(small):
    run = uuid.uuid4().hex
    async with small.worker(TooBigToUndo):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await small.client.run(TooBigToUndo, {"ledger": run})
    err = info.value
    assert err.error_type == "qwit.PayloadTooLarge"
    assert err.step == "limits.blob"
    assert "its undo would not fit" in err.reason
    # the step applied its effect, then failed: it is undone with its args alone
    assert err.compensated == ["limits.blob", "limits.blob", "limits.before"]
    assert ledger.applied(run) == ["limits.before", "b1", "b2"]
    ledger.assert_fully_undone(run)


async def test_the_output_that_pushes_the_args_over_the_limit_fails_its_step(small):
    # Two steps without step_back, each returning half the limit: the second
    # takes the flow's args (and so its result) over it. That step fails with
    # PayloadTooLarge, not retried, and the flow rolls back at once.
    run = uuid.uuid4().hex
    async with small.worker(Accumulating):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await small.client.run(Accumulating, {"ledger": run})
        state = await small.client.get_handle(info.value.flow_id).state()
    err = info.value
    assert err.error_type == "qwit.PayloadTooLarge"
    assert err.step == "limits.no_undo_blob"
    assert f"{LIMIT}-byte payload limit" in err.reason
    assert err.compensated == ["limits.no_undo_blob", "limits.no_undo_blob", "limits.before"]
    assert [s.status for s in state.steps] == [
        "compensated",
        "compensated",
        "compensated",
        "pending",
    ]
    assert [s.attempts for s in state.steps] == [1, 1, 1, 0]
    ledger.assert_fully_undone(run)


async def test_start_args_over_the_namespace_limit_are_refused(small):
    with pytest.raises(qwit.PayloadTooLarge, match=f"{LIMIT}-byte payload limit"):
        await small.client.start(Accumulating, {"ledger": "x", "blob": "y" * LIMIT})

    class BigStatic(qwit.Flow, name="limits.big_static"):
        def build_flow(self) -> None:
            self.step(Accumulating, {"blob": "y" * LIMIT})

    with pytest.raises(qwit.PayloadTooLarge, match=f"{LIMIT}-byte payload limit"):
        await small.client.start(BigStatic, {"ledger": "x"})


class Many(qwit.Flow):
    def build_flow(self) -> None:
        for _ in range(2001):
            self.step(Before)


async def test_a_plan_too_long_for_one_history_is_refused(client):
    with pytest.raises(qwit.FlowDefinitionError, match="2001 steps"):
        await client.start(Many, {"ledger": "x"})


def _long(key: type[Exception] | None) -> type[qwit.Flow]:
    """40 steps of 2 KB; on a failure matched by ``key``, ABORT."""
    on_failure: Any = {key: qwit.ABORT} if key else qwit.ROLLBACK
    name = key.__name__ if key else "rollback"

    class Long(qwit.Flow, name=f"limits.long.{name}"):
        def build_flow(self) -> None:
            for i in range(40):
                self.step(Blob, {"eid": f"s{i}", "size": 2000}, on_failure=on_failure)

    return Long


@pytest.mark.parametrize("key", [None, qwit.HistoryTooLarge, qwit.QwitError])
async def test_a_history_near_its_limit_stops_going_forward(small, monkeypatch, key):
    """It rolls back; or, where HistoryTooLarge is matched by its class (or
    QwitError's) in on_failure, it aborts."""
    from qwit.temporal import _workflow

    # A tiny budget stands in for Temporal's 50 MB: the flow must stop and undo.
    # (On this module's own server: its history only replays with that budget.)
    monkeypatch.setattr(_workflow, "HISTORY_BYTES_BUDGET", 40_000)
    flow = _long(key)
    run = uuid.uuid4().hex
    async with small.worker(flow):
        with pytest.raises(qwit.FlowAborted if key else qwit.FlowRolledBack) as info:
            await small.client.run(flow, {"ledger": run})
    assert info.value.error_type == "qwit.HistoryTooLarge"
    applied = ledger.applied(run)
    assert 3 < len(applied) < 40
    if key:
        assert ledger.undone(run) == []  # aborted: nothing undone
    else:
        ledger.assert_fully_undone(run)


class BlobsSub(qwit.Flow, name="limits.blobs_sub"):
    def build_flow(self) -> None:
        self.step(Before, {"eid": "sub-before"})
        self.step(NoUndoBlob, {"eid": "s1", "size": LIMIT // 3})
        self.step(NoUndoBlob, {"eid": "s2", "size": LIMIT // 3})


class BigSubOutputs(qwit.Flow, name="limits.big_sub_outputs"):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(NoUndoBlob, {"eid": "p1", "size": LIMIT // 3})
        self.step(BlobsSub)


async def test_a_sub_flow_whose_outputs_outgrow_the_limit_rolls_back(small, small_server):
    # Before the fix the sub-flow's outputs reached the parent and the
    # parent's result could never be sent: RUNNING forever, nothing undone.
    run = uuid.uuid4().hex
    async with small.worker(BigSubOutputs):
        handle = await small.client.start(BigSubOutputs, {"ledger": run})
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 30)
        state = await handle.state()
    err = info.value
    assert err.error_type == "qwit.PayloadTooLarge"
    assert err.step == "limits.no_undo_blob"
    assert [c.path for c in err.compensations] == ["3.3", "3.2", "3.1", "2", "1"]
    assert state.status == "rolled_back"
    ledger.assert_fully_undone(run)
    assert await flow_status(small_server, handle.id) == (
        temporalio.client.WorkflowExecutionStatus.FAILED
    )


class Shouts(qwit.Step, name="limits.shouts"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("x" * args["size"], retry=False)


class ShoutingFlow(qwit.Flow, name="limits.shouting"):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(Shouts)


@pytest.mark.parametrize("size", [3 * LIMIT])
async def test_a_huge_error_message_still_ends_the_flow(small, small_server, size):
    run = uuid.uuid4().hex
    async with small.worker(ShoutingFlow):
        handle = await small.client.start(ShoutingFlow, {"ledger": run, "size": size})
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert info.value.error_type == "qwit.StepError"
    assert info.value.reason.endswith("more characters cut]")
    assert len(info.value.reason) < 5000
    ledger.assert_fully_undone(run)


async def test_a_megabyte_error_message_on_the_default_limit(client, worker):
    # ~1 MB: repeated in the flow's end (error, reason, message) it went over
    # the default 2 MB payload limit and the flow never ended.
    run = uuid.uuid4().hex
    async with worker(ShoutingFlow):
        handle = await client.start(ShoutingFlow, {"ledger": run, "size": 1_000_000})
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 30)
    assert len(info.value.reason) < 5000
    ledger.assert_fully_undone(run)


class SkipsTooLarge(qwit.Flow, name="limits.skips_too_large"):
    def build_flow(self) -> None:
        self.step(Before)
        self.step(NoUndoBlob, {"eid": "n1", "size": LIMIT // 2})
        self.step(NoUndoBlob, {"eid": "n2", "size": LIMIT // 2}, on_failure={
            qwit.PayloadTooLarge: qwit.SKIP
        })  # fmt: skip


async def test_payload_too_large_is_matched_by_its_class(small):
    run = uuid.uuid4().hex
    async with small.worker(SkipsTooLarge):
        result = await small.client.run(SkipsTooLarge, {"ledger": run})
    assert "blob_n1" in result and "blob_n2" not in result


class MapElement(qwit.Step, name="limits.a_map_element_with_a_long_name"):
    """Fails (for good) when it is the element ``args['fail_at']``."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, int]:
        index = qwit.context().index
        if index == args["fail_at"]:
            raise qwit.StepError("fails on purpose", retry=False)
        return {}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class WideRollback(qwit.Flow):
    def build_flow(self) -> None:
        self.map(MapElement, over="items", item="item", into="out", max_concurrency=100)


async def test_a_rollback_whose_names_alone_are_over_the_limit_still_ends(small, small_server):
    # 800 undone elements: 40 bytes of name each, about 32 KB of names alone,
    # over the 20 KB limit. The flow ends anyway, its lists cut and saying so
    # (before, its failure could not be written and the flow never ended).
    items = list(range(801))
    async with small.worker(WideRollback):
        handle = await small.client.start(WideRollback, {"items": items, "fail_at": 800})
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(handle.result(), 60)
    failed = info.value
    assert 0 < len(failed.compensated) < 800
    assert set(failed.compensated) == {MapElement.name}
    assert "names of steps left out of the lists of undos to fit" in failed.reason
    assert "800 undone" in failed.reason or "801 undone" in failed.reason
    assert await flow_status(small_server, handle.id) == (
        temporalio.client.WorkflowExecutionStatus.FAILED
    )


def test_a_failure_is_made_to_fit_with_its_message_and_the_undos_tracebacks():
    from qwit._errors import Compensation, ErrorInfo, FailureInfo
    from qwit._jsonargs import json_size
    from qwit.temporal._workflow import (
        FAILURE_MARGIN,
        MAX_FAILURE_MESSAGE,
        failure_error,
        fit_failure,
    )

    broken = ErrorInfo(type="ValueError", message="m" * 300, traceback="t" * 3000)
    undos = [
        Compensation(name="s", path=str(i), status="compensation_failed", error=broken)
        for i in range(10)
    ]
    info = FailureInfo(
        kind="compensation_failed",
        flow_id="f",
        step="s",
        reason="é" * 4000,  # 8,000 bytes of UTF-8
        compensated=[],
        failed_compensations=["s"] * 10,
        compensations=undos,
    )
    limit = 40_000
    fitted = fit_failure(info, limit)
    # the undos' details stay, without their tracebacks (the first cut is enough)
    assert [c.path for c in fitted.compensations] == [str(i) for i in range(10)]
    assert all(c.error is not None and c.error.traceback == "" for c in fitted.compensations)
    assert json_size(fitted.model_dump(mode="json")) <= limit - FAILURE_MARGIN
    error = failure_error(fitted, "a.flow")
    assert len(error.message.encode()) <= MAX_FAILURE_MESSAGE
    assert error.message.startswith("a.flow: flow 'f'")
    assert error.details[0]["reason"] == info.reason  # the whole reason, in the details


def test_a_state_whose_events_outgrow_the_limit_keeps_the_newest():
    # An operator retried a step again and again: each retry adds events,
    # a failed one with its error (up to 4 KB). The query's answer must
    # still fit; before, the events were kept whole and state() raised
    # temporalio's "Blob data size exceeds limit".
    from qwit._jsonargs import json_size
    from qwit._state import FlowEvent, FlowState
    from qwit.temporal._workflow import PAYLOAD_MARGIN, fit_state

    events = [
        FlowEvent(
            seq=i + 1,
            kind="step",
            path="1",
            name="s",
            status="failed" if i % 2 else "running",
            error="e" * 4000 if i % 2 else None,
        )
        for i in range(40)
    ]
    state = FlowState(
        flow="f", flow_id="f-1", status="waiting", args={"a": 1}, steps=[], events=events
    )
    limit = 20_000
    fitted = fit_state(state, limit)
    assert json_size(fitted.model_dump(mode="json")) <= limit - PAYLOAD_MARGIN
    assert fitted.events, "the newest events stay"
    assert [e.seq for e in fitted.events] == list(
        range(41 - len(fitted.events), 41)
    )  # the newest, in order, numbered as they were
    assert fit_state(state, 2_000_000) == state  # (room enough: nothing left out)


async def test_a_retry_of_a_failed_undo_with_args_over_the_limit_is_refused(small):
    from qwit.testing import wait_for_status
    from tests.test_temporal_reactions import NeedsAccountFlow

    run = uuid.uuid4().hex
    async with small.worker(NeedsAccountFlow):
        handle = await small.client.start(NeedsAccountFlow, {"ledger": run, "fail": "react.C"})
        await wait_for_status(handle, "waiting", 30)
        # Each fits; the undo gets both (an operator's args add up), which
        # would not. (One arg over the limit can't even be sent: Temporal
        # refuses an update whose rejection would carry it back.)
        await handle.react(qwit.RETRY, args={"a": "x" * (LIMIT // 2)})
        for _ in range(600):  # until it has failed again, and waits anew
            state = await handle.state()
            if state.status == "waiting" and state.steps[1].back_attempts == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the undo was not retried: {state}")
        with pytest.raises(qwit.ReactionError, match="the undo's args would take"):
            await handle.react(qwit.RETRY, args={"b": "x" * (LIMIT // 2)})
        # the flow still waits, and takes a decision that fits
        await handle.react(qwit.RETRY, args={"refund_account": "acct-9"})
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
    ledger.assert_fully_undone(run)


class Padded(Effect, name="limits.padded"):
    """Sent every arg (the large pad too), as an untyped step is."""


class WideAndHeavy(qwit.Flow, name="limits.wide_and_heavy"):
    def build_flow(self) -> None:
        self.step(Before)
        with self.parallel():
            self.step(Padded, {"eid": "p1"})
            self.step(Padded, {"eid": "p2"})
            self.step(Padded, {"eid": "p3"})


async def test_branches_whose_calls_outgrow_one_workflow_task_start_over_several(
    client: qwit.Client, worker: Any
):
    # Three branches sent 1.5 MB each (each under the 2 MB payload limit) are
    # 4.5 MB of commands: past gRPC's 4 MB for one workflow task, Temporal
    # terminated the flow and nothing was undone. They now start over
    # several tasks, and the flow completes.
    run = ledger_run = uuid.uuid4().hex
    async with worker(WideAndHeavy):
        handle = await client.start(WideAndHeavy, {"ledger": run, "pad": "p" * 1_500_000})
        result = await asyncio.wait_for(handle.result(), 120)
    assert sorted(k for k in result if k.startswith("out_")) == [
        "out_limits.before",
        "out_p1",
        "out_p2",
        "out_p3",
    ]
    assert sorted(ledger.applied(ledger_run)) == ["limits.before", "p1", "p2", "p3"]
