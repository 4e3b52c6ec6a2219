"""Recovery beyond rollback, on every engine: cancel modes (more to come:
retried segments, fallbacks, final steps, stopping a rollback, redrive)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

import qwit
from qwit.testing import wait_for_status
from tests import ledger
from tests.ledger import Effect
from tests.test_conformance import Env, env, new_ledger, outcome
from tests.test_temporal_reactions import failing_flow
from tests.test_temporal_subflows import A, B, C, CancelMe, Slow

__all__ = ["env"]


class SlowSub(qwit.Flow, name="recovery.slow_sub"):
    def build_flow(self) -> None:
        self.step(B)
        self.step(Slow)


class CancelInside(qwit.Flow, name="recovery.cancel_inside"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(SlowSub)
        self.step(C)


# -- cancel modes ----------------------------------------------------------------


@pytest.mark.parametrize("flow", [CancelMe, CancelInside])
async def test_a_cancel_without_rollback_stops_the_flow_where_it_is(env: Env, flow):
    """The step in flight is cancelled (here it applied its effect first),
    nothing is undone, nothing after it runs; the flow ends cancelled with
    ``rolled_back`` False, and a second cancel (with rollback) changes nothing."""
    run = new_ledger()
    async with env.serve(flow):
        handle = await env.client.start(flow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel(rollback=False)
        await handle.cancel()
        kind, err = await outcome(handle)
        state = await handle.state()
    assert kind == "cancelled"
    assert isinstance(err, qwit.FlowCancelled)
    assert err.rolled_back is False
    assert err.compensated == [] and err.compensations == []
    assert ledger.undone(run) == []
    assert ledger.marks(run, "learned-cancel") == ["Slow"]
    assert sorted(ledger.applied(run)) == sorted(
        ["A", "Slow"] + (["B"] if flow is CancelInside else [])
    )
    assert state.status == "cancelled"
    assert state.steps[-1].status == "pending"


async def test_a_cancel_with_rollback_still_undoes_everything(env: Env):
    run = new_ledger()
    async with env.serve(CancelMe):
        handle = await env.client.start(CancelMe, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel(rollback=True)
        await handle.cancel(rollback=False)  # the first cancel decides
        kind, err = await outcome(handle)
    assert kind == "cancelled"
    assert err.rolled_back is True
    assert err.compensated == ["Slow", "A"]
    ledger.assert_fully_undone(run)


@pytest.mark.parametrize("rollback", [True, False])
async def test_a_waiting_flow_can_be_cancelled_either_way(env: Env, rollback: bool):
    run = new_ledger()
    flow = failing_flow(qwit.WAIT)
    async with env.serve(flow):
        handle = await env.client.start(
            flow, {"ledger": run, "fail": "react.F", "fail_after": True}
        )
        await wait_for_status(handle, "waiting", timeout=30)
        await handle.cancel(rollback=rollback)
        kind, err = await outcome(handle)
    assert kind == "cancelled"
    assert err.rolled_back is rollback
    if rollback:
        assert err.compensated == ["react.F", "react.A"]
        ledger.assert_fully_undone(run)
    else:
        assert ledger.undone(run) == []
        assert ledger.applied(run) == ["react.A", "react.F"]


# -- stopping a rollback, undo limits ----------------------------------------------


class StopsRollback(Effect, name="recovery.stops_rollback"):
    """Its undo fails for good, and stops the rollback there."""

    back_on_failure = qwit.ABORT
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.05)

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo-attempt", "S")
        raise RuntimeError("the refund service is down")


class StopInSequence(qwit.Flow, name="recovery.stop_in_sequence"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(StopsRollback, {"eid": "S"})
        self.step(B)
        self.step(C)


class StopsInside(qwit.Flow, name="recovery.stops_inside"):
    def build_flow(self) -> None:
        self.step(StopsRollback, {"eid": "S"})
        self.step(B)


class StopInSubflow(qwit.Flow, name="recovery.stop_in_subflow"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(StopsInside)
        self.step(C)


class StopInBlock(qwit.Flow, name="recovery.stop_in_block"):
    def build_flow(self) -> None:
        self.step(A)
        with self.parallel():
            self.step(StopsRollback, {"eid": "S"})
            self.step(B)
        self.step(C)


@pytest.mark.parametrize("flow", [StopInSequence, StopInSubflow, StopInBlock])
async def test_an_undo_that_fails_with_abort_stops_the_rollback_there(env: Env, flow):
    """What came before the failed undo (A) stays as it was and is named in
    ``not_compensated``; what came after it was undone (B; in a block, B is
    undone beside it)."""
    run = new_ledger()
    async with env.serve(flow):
        handle = await env.client.start(flow, {"ledger": run, "fail": "C", "fail_after": True})
        kind, err = await outcome(handle)
    assert kind == "compensation_failed"
    assert isinstance(err, qwit.CompensationFailed)
    assert err.failed_compensations == ["recovery.stops_rollback"]
    assert err.not_compensated == ["A"]
    assert sorted(err.compensated) == ["B", "C"]
    assert sorted(ledger.undone(run)) == ["B", "C"]
    assert ledger.marks(run, "undo-attempt") == ["S", "S"]
    assert "left as they were: A" in str(err)


class SlowUndo(Effect, name="recovery.slow_undo"):
    """Its first undo outlives ``back_timeout``; the next is quick."""

    timeout = 60
    back_timeout = 0.5
    back_retry = qwit.Retry(max_attempts=3, initial_interval=0.05)

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo-attempt", "SlowUndo")
        if len(ledger.marks(args["ledger"], "undo-attempt")) == 1:
            await asyncio.sleep(10)
        ledger.record(args["ledger"], "undo", "SlowUndo")


class SlowUndoFlow(qwit.Flow, name="recovery.slow_undo_flow"):
    def build_flow(self) -> None:
        self.step(SlowUndo)
        self.step(C)


async def test_back_timeout_limits_one_undo_attempt(env: Env):
    run = new_ledger()
    async with env.serve(SlowUndoFlow):
        handle = await env.client.start(
            SlowUndoFlow, {"ledger": run, "fail": "C", "fail_after": True}
        )
        kind, _ = await outcome(handle)
    assert kind == "rolled_back"
    assert ledger.marks(run, "undo-attempt") == ["SlowUndo", "SlowUndo"]
    assert ledger.undone(run) == ["C", "SlowUndo"]


def test_back_timeout_is_a_step_option_and_is_planned():
    from qwit._flow import compile_flow

    class Uses(qwit.Flow, name="recovery.uses_back_timeout"):
        def build_flow(self) -> None:
            self.step(SlowUndo)
            self.step(C, back_timeout=timedelta(seconds=7))

    plan = compile_flow(Uses)
    assert [s.limit("step_back") for s in plan.steps] == [0.5, 7.0]  # type: ignore[union-attr]
    assert [s.limit("step_forward") for s in plan.steps] == [60.0, 300.0]  # type: ignore[union-attr]

    class Bad(qwit.Flow, name="recovery.bad_back_timeout"):
        def build_flow(self) -> None:
            self.step(C, back_timeout=-1)

    with pytest.raises(qwit.FlowDefinitionError, match="back_timeout"):
        compile_flow(Bad)
