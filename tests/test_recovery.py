"""Recovery beyond rollback, on every engine: cancel modes (more to come:
retried segments, fallbacks, final steps, stopping a rollback, redrive)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

import qwit
from qwit.testing import wait_for_status
from tests import ledger
from tests import parallel_ledger as pl
from tests.ledger import Effect
from tests.parallel_ledger import Work
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
async def test_a_cancel_names_the_step_in_flight_even_inside_a_sub_flow(env: Env, flow):
    run = new_ledger()
    async with env.serve(flow):
        handle = await env.client.start(flow, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel()
        kind, err = await outcome(handle)
    assert (kind, err.step) == ("cancelled", "Slow")
    ledger.assert_fully_undone(run)


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
    assert err.step == "Slow"  # the step in flight, inside the sub-flow too
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


class LeftBehind(qwit.Flow, name="recovery.left_behind"):
    def build_flow(self) -> None:
        self.step(B)
        self.step(C)


class StopAfterSubflow(qwit.Flow, name="recovery.stop_after_subflow"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(LeftBehind)
        self.step(StopsRollback, {"eid": "S"})
        self.step(C, {"eid": "last"})


async def test_what_a_stopped_rollback_leaves_is_named_newest_first(env: Env):
    # as the rollback would have undone them: the sub-flow's steps too
    # (before, they were listed in plan order after the later steps)
    run = new_ledger()
    async with env.serve(StopAfterSubflow):
        handle = await env.client.start(StopAfterSubflow, {"ledger": run, "fail": "last"})
        kind, err = await outcome(handle)
    assert kind == "compensation_failed"
    assert err.not_compensated == ["C", "B", "A"]


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


# -- fallbacks -------------------------------------------------------------------


class Quote(qwit.Step, name="recovery.quote"):
    """A carrier's quote; when the carrier fails, a flat rate stands in.

    Flow args: ``carrier`` = "down" (fails before booking anything) or
    "flaky" (books a hold, then fails); ``flat`` = "down" (the fallback
    fails too) or "once" (fails on its first attempt)."""

    on_failure = qwit.FALLBACK
    retry = qwit.Retry(max_attempts=2, initial_interval=0.05)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        run = args["ledger"]
        ledger.record(run, "key-forward", qwit.context().idempotency_key)
        if args.get("carrier") == "down":
            raise qwit.StepError("carrier down", retry=False)
        ledger.record(run, "do", "hold")
        if args.get("carrier") == "flaky":
            raise qwit.StepError("carrier lost the quote", retry=False)
        return {"quote": "carrier"}

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        run = args["ledger"]
        ledger.record(run, "fallback", f"{error.type}: {error.message}")
        ledger.record(run, "key-fallback", qwit.context().idempotency_key)
        flat = args.get("flat")
        if flat == "down" or (flat == "once" and qwit.context().attempt == 1):
            raise RuntimeError("no flat rate either")
        ledger.record(run, "do", "flat")
        return {"quote": "flat"}

    async def step_back(self, args: dict[str, Any]) -> None:
        run = args["ledger"]
        ledger.record(run, "key-back", qwit.context().idempotency_key)
        undo = "flat" if args.get("quote") == "flat" else "hold"
        if undo in ledger.applied(run) and undo not in ledger.undone(run):
            ledger.record(run, "undo", undo)


class Shipment(qwit.Flow, name="recovery.shipment"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Quote)
        self.step(C)


@pytest.mark.parametrize("carrier", ["down", "flaky"])
async def test_a_fallback_stands_in_for_a_failed_step(env: Env, carrier: str):
    """The failed attempt is undone if it had done something (the hold),
    then the fallback's output is the step's, and the flow goes on."""
    run = new_ledger()
    async with env.serve(Shipment):
        handle = await env.client.start(Shipment, {"ledger": run, "carrier": carrier})
        kind, result = await outcome(handle)
        state = await handle.state()
    assert kind == "completed"
    assert result["quote"] == "flat"
    assert ledger.marks(run, "fallback") == [
        f"qwit.StepError: carrier {'down' if carrier == 'down' else 'lost the quote'}"
    ]
    if carrier == "flaky":
        assert ledger.entries(run).index(("undo", "hold")) < ledger.entries(run).index(
            ("do", "flat")
        )
    assert ledger.applied(run) == ["A"] + (["hold"] if carrier == "flaky" else []) + ["flat", "C"]
    assert ledger.undone(run) == (["hold"] if carrier == "flaky" else [])
    assert [s.status for s in state.steps] == ["done", "done", "done"]
    keys = {m: ledger.marks(run, f"key-{m}") for m in ("forward", "fallback")}
    assert len(set(keys["fallback"])) == 1
    assert keys["fallback"][0] not in keys["forward"]


async def test_the_undo_of_a_step_that_fell_back_gets_the_fallbacks_output(env: Env):
    run = new_ledger()
    async with env.serve(Shipment):
        handle = await env.client.start(
            Shipment, {"ledger": run, "carrier": "flaky", "fail": "C", "fail_after": True}
        )
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    # the hold undone before the fallback ran; the flat rate undone by the
    # rollback, with the fallback's output in its args; each once
    assert ledger.undone(run) == ["hold", "C", "flat", "A"]
    assert err.compensated == ["recovery.quote", "C", "recovery.quote", "A"]


async def test_a_fallback_is_retried_per_the_steps_retry(env: Env):
    run = new_ledger()
    async with env.serve(Shipment):
        handle = await env.client.start(
            Shipment, {"ledger": run, "carrier": "down", "flat": "once"}
        )
        kind, result = await outcome(handle)
    assert kind == "completed"
    assert result["quote"] == "flat"
    assert len(ledger.marks(run, "fallback")) == 2
    assert len(set(ledger.marks(run, "key-fallback"))) == 1  # one execution, retried


async def test_a_fallback_that_fails_for_good_rolls_the_flow_back(env: Env):
    """The failed attempt, undone before the fallback ran, is not undone again."""
    run = new_ledger()
    async with env.serve(Shipment):
        handle = await env.client.start(
            Shipment, {"ledger": run, "carrier": "flaky", "flat": "down"}
        )
        kind, err = await outcome(handle)
    assert kind == "rolled_back"
    assert err.step == "recovery.quote"
    assert "no flat rate either" in err.reason
    assert ledger.undone(run) == ["hold", "A"]
    assert len(ledger.marks(run, "key-back")) == 1
    assert ledger.applied(run) == ["A", "hold"]


def test_fallback_needs_a_step_fallback():
    from qwit._flow import compile_flow

    class NoFallback(Effect, name="recovery.no_fallback"):
        on_failure = {ValueError: qwit.FALLBACK}

    class UsesIt(qwit.Flow, name="recovery.uses_no_fallback"):
        def build_flow(self) -> None:
            self.step(NoFallback)

    with pytest.raises(qwit.FlowDefinitionError, match="does not define step_fallback"):
        compile_flow(UsesIt)

    class SubFallsBack(qwit.Flow, name="recovery.sub_falls_back"):
        def build_flow(self) -> None:
            self.step(Shipment, on_failure=qwit.FALLBACK)

    with pytest.raises(qwit.FlowDefinitionError, match="sub-flow has no step_fallback"):
        compile_flow(SubFallsBack)

    class Mapped(qwit.Flow, name="recovery.mapped_fallback"):
        def build_flow(self) -> None:
            self.step(Quote, on_failure={"StepError": "fallback", "default": "rollback"})

    compile_flow(Mapped)


# -- final steps -----------------------------------------------------------------


class Report(qwit.Step, name="recovery.report"):
    """A final step: records what it was told (and fails when asked)."""

    retry = qwit.Retry(max_attempts=2, initial_interval=0.05)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        run = args["ledger"]
        failure = args.get("qwit_failure")
        told = args["qwit_outcome"] + (f" at {failure['step']}" if failure else "")
        ledger.record(run, "final", told)
        if failure:
            ledger.record(run, "final-compensated", ",".join(failure["compensated"]))
        if args.get("report_fails"):
            raise RuntimeError("the report service is down")
        return {"reported": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo", "report")


class Reported(qwit.Flow, name="recovery.reported"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(B, on_failure=qwit.WAIT)
        self.step(C)
        self.finally_step(Report)


@pytest.mark.parametrize(
    ("fail", "kind", "told"),
    [
        (None, "completed", "completed"),
        ("C", "rolled_back", "rolled_back at C"),
    ],
)
async def test_a_final_step_runs_once_the_flow_has_ended(env: Env, fail, kind, told):
    run = new_ledger()
    args: dict[str, Any] = {"ledger": run}
    if fail:
        args.update(fail=fail, fail_after=True)
    async with env.serve(Reported):
        handle = await env.client.start(Reported, args)
        got, result = await outcome(handle)
        state = await handle.state()
    assert got == kind
    assert ledger.marks(run, "final") == [told]
    assert "undo" not in [a for a, e in ledger.entries(run) if e == "report"]
    entries = ledger.entries(run)
    assert entries.index(("final", told)) > max(  # after any rollback
        (i for i, (action, _) in enumerate(entries) if action == "undo"), default=-1
    )
    if fail:
        assert ledger.marks(run, "final-compensated") == ["C,B,A"]
        assert result.final_failures == []
    else:
        assert "reported" not in result  # a final step's output is not merged
    assert [s.name for s in state.steps][-1] == "recovery.report"
    assert state.steps[-1].path == "4"
    assert state.steps[-1].status == "done"


@pytest.mark.parametrize("fail", [None, "C"])
async def test_a_final_step_that_fails_changes_no_outcome(env: Env, fail):
    run = new_ledger()
    args: dict[str, Any] = {"ledger": run, "report_fails": True}
    if fail:
        args.update(fail=fail)
    async with env.serve(Reported):
        handle = await env.client.start(Reported, args)
        got, result = await outcome(handle)
        state = await handle.state()
    assert got == ("rolled_back" if fail else "completed")
    assert len(ledger.marks(run, "final")) == 2  # retried per its retry
    assert state.steps[-1].status == "failed"
    assert state.steps[-1].error is not None
    assert "report service is down" in state.steps[-1].error.message
    if fail:
        [final] = result.final_failures
        assert (final.name, final.path, final.status) == ("recovery.report", "4", "failed")
        assert "report service is down" in final.error.message


async def test_final_steps_run_for_aborted_and_cancelled_flows_and_after_a_wait(env: Env):
    runs = {}
    async with env.serve(Reported, CancelMeReported):
        run = runs["abort"] = new_ledger()
        handle = await env.client.start(Reported, {"ledger": run, "fail": "B"})
        await wait_for_status(handle, "waiting", timeout=30)
        assert ledger.marks(run, "final") == []  # a waiting flow has not ended
        await handle.react(qwit.ABORT)
        assert (await outcome(handle))[0] == "aborted"
        run = runs["cancel"] = new_ledger()
        handle = await env.client.start(CancelMeReported, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await handle.cancel()
        assert (await outcome(handle))[0] == "cancelled"
    assert ledger.marks(runs["abort"], "final") == ["aborted at B"]
    assert ledger.marks(runs["cancel"], "final") == ["cancelled at Slow"]


#: Ledgers whose GatedReport waits for the test to open its gate.
FINAL_GATES: dict[str, threading.Event] = {}


class GatedReport(qwit.Step, name="recovery.gated_report"):
    """A final step that holds on until the test lets it finish."""

    async def step_forward(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "final", args["qwit_outcome"])
        while not FINAL_GATES[args["ledger"]].is_set():
            await asyncio.sleep(0.02)


class GatedReported(qwit.Flow, name="recovery.gated_reported"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(B)
        self.finally_step(GatedReport)


@pytest.mark.parametrize("fail", [None, "B"])
async def test_a_flow_has_not_ended_while_its_final_steps_run(env: Env, fail):
    # Before, state() said completed (or rolled_back) while the final step
    # still ran, and on qwit.local a redrive then raised ArgumentsError.
    run = new_ledger()
    FINAL_GATES[run] = threading.Event()
    args: dict[str, Any] = {"ledger": run, **({"fail": fail} if fail else {})}
    kind = "rolled_back" if fail else "completed"
    async with env.serve(GatedReported):
        handle = await env.client.start(GatedReported, args)
        await ledger.wait_for_mark(run, "final", kind)
        during = await handle.state()
        with pytest.raises(qwit.ReactionError, match=r"running|compensating"):
            await env.client.redrive(handle.id)
        FINAL_GATES[run].set()
        got, _ = await outcome(handle)
        after = await handle.state()
    assert during.status == ("compensating" if fail else "running")
    assert during.steps[-1].status == "running"
    assert (got, after.status, after.steps[-1].status) == (kind, kind, "done")


class CancelMeReported(qwit.Flow, name="recovery.cancel_me_reported"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Slow)
        self.finally_step(Report)


def test_final_steps_are_steps_and_come_last():
    from qwit._flow import compile_flow

    class FlowFinal(qwit.Flow, name="recovery.flow_final"):
        def build_flow(self) -> None:
            self.step(A)
            self.finally_step(SlowSub)  # type: ignore[arg-type]

    with pytest.raises(qwit.FlowDefinitionError, match="a final step is a Step, not a Flow"):
        compile_flow(FlowFinal)

    class StepAfter(qwit.Flow, name="recovery.step_after_final"):
        def build_flow(self) -> None:
            self.finally_step(Report)
            self.step(A)

    with pytest.raises(qwit.FlowDefinitionError, match="final steps come last"):
        compile_flow(StepAfter)

    class Reacting(qwit.Flow, name="recovery.reacting_final"):
        def build_flow(self) -> None:
            self.step(A)
            self.finally_step(Report, on_failure=qwit.WAIT)

    with pytest.raises(qwit.FlowDefinitionError, match="do not apply to a final step"):
        compile_flow(Reacting)

    plan = compile_flow(Reported)
    assert [s.name for s in plan.finally_steps] == ["recovery.report"]
    from qwit._plan import FlowInput

    wire = FlowInput(flow=plan, root_id="x").model_dump(mode="json")
    assert FlowInput.model_validate(wire).flow == plan


# -- retried segments --------------------------------------------------------------


class Hold(Effect, name="recovery.hold"):
    """Holds stock; records the idempotency key of each execution."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "key", qwit.context().idempotency_key)
        return await super().step_forward({**args, "eid": "hold"})

    async def step_back(self, args: dict[str, Any]) -> None:
        run = args["ledger"]
        if ledger.applied(run).count("hold") > ledger.undone(run).count("hold"):
            ledger.record(run, "undo", "hold")


class Book(qwit.Step, name="recovery.book"):
    """Fails until it has been tried ``succeed_on`` times."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        run = args["ledger"]
        ledger.record(run, "try", "book")
        if len(ledger.marks(run, "try")) < args["succeed_on"]:
            raise RuntimeError("no slot")
        return {"booked": True}


class Segment(qwit.Flow, name="recovery.segment"):
    def build_flow(self) -> None:
        self.step(Hold)
        self.step(Book)


class WithSegment(qwit.Flow, name="recovery.with_segment"):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Segment, retry=qwit.Retry(max_attempts=3, initial_interval=0.05))
        self.step(C)


@pytest.mark.parametrize("succeed_on", [3, 4])
async def test_a_retried_segment_undoes_itself_and_runs_again_from_its_start(
    env: Env, succeed_on: int
):
    """What ran before the segment (A) is kept; each attempt of the segment
    has fresh keys; once its attempts are spent, its on_failure applies."""
    run = new_ledger()
    async with env.serve(WithSegment):
        handle = await env.client.start(WithSegment, {"ledger": run, "succeed_on": succeed_on})
        kind, result = await outcome(handle)
        state = await handle.state()
    tries = min(succeed_on, 3)
    assert len(ledger.marks(run, "try")) == tries
    assert ledger.applied(run).count("A") == 1
    assert ledger.applied(run).count("hold") == tries
    assert len(set(ledger.marks(run, "key"))) == tries
    assert state.steps[1].attempts == tries
    if succeed_on == 3:
        assert kind == "completed"
        assert result["booked"] is True
        assert ledger.undone(run) == ["hold", "hold"]
        assert state.steps[1].flow_id.endswith("#3")
    else:
        assert kind == "rolled_back"
        assert ledger.undone(run) == ["hold", "hold", "hold", "A"]
        assert result.compensated == ["recovery.book", "recovery.hold"] * 3 + ["A"]


def test_retry_of_a_sub_flow_must_be_a_retry_policy():
    from qwit._flow import compile_flow

    class Bad(qwit.Flow, name="recovery.bad_segment"):
        def build_flow(self) -> None:
            self.step(Segment, retry=3)

    with pytest.raises(qwit.FlowDefinitionError, match=r"retry must be a qwit\.Retry"):
        compile_flow(Bad)
    plan = compile_flow(WithSegment)
    assert plan.steps[1].retry == qwit.Retry(max_attempts=3, initial_interval=0.05)  # type: ignore[union-attr]


# -- redrive -----------------------------------------------------------------------


class RA(Effect, name="rd.A"):
    pass


class RB(Effect, name="rd.B"):
    on_failure = qwit.ABORT


class RC(Effect, name="rd.C"):
    pass


BROKEN_BACKS: set[str] = set()


#: Where RBack's undo refunded, by ledger.
REFUNDED_TO: dict[str, str] = {}


class RBack(Effect, name="rd.Back"):
    """Its undo fails while its ledger is in BROKEN_BACKS, or while its args
    say to refund to a closed account."""

    back_retry = qwit.Retry(max_attempts=1)

    async def step_back(self, args: dict[str, Any]) -> None:
        if args["ledger"] in BROKEN_BACKS:
            raise RuntimeError("the refund service is down")
        if args.get("refund_to") == "closed-account":
            raise RuntimeError("can't refund to a closed account")
        REFUNDED_TO[args["ledger"]] = args.get("refund_to", "")
        await super().step_back(args)


class RInner(qwit.Flow, name="rd.inner"):
    def build_flow(self) -> None:
        self.step(RA, {"eid": "I1"})
        self.step(RB, {"eid": "I2"})


class Redrivable(qwit.Flow, name="rd.flow"):
    def build_flow(self) -> None:
        self.step(RA)
        self.step(RB)
        self.step(RInner)
        self.step(RC)


class RedrivableBack(qwit.Flow, name="rd.flow_back"):
    def build_flow(self) -> None:
        self.step(RA)
        self.step(RBack)
        self.step(RC)


async def redriven(env: Env, flow: type[qwit.Flow], start: dict[str, Any], **redrive: Any):
    """Run ``flow`` to its end, redrive it; the two outcomes and handles."""
    handle = await env.client.start(flow, start)
    first = await outcome(handle)
    again = await env.client.redrive(handle.id, **redrive)
    assert again.id == handle.id
    return first, await outcome(again), again


@pytest.mark.parametrize("after", [False, True])
async def test_an_aborted_flow_resumes_from_its_failed_step(env: Env, after: bool):
    """The steps before it are reused (not run again); the failed step's own
    attempt, if it did something, is undone first; each effect stays once."""
    run = new_ledger()
    async with env.serve(Redrivable):
        (kind, _), (again, result), handle = await redriven(
            env,
            Redrivable,
            {"ledger": run, "fail": "rd.B", "fail_after": after},
            args={"fail": None},
        )
        state = await handle.state()
    assert (kind, again) == ("aborted", "completed")
    assert result["out_rd.C"] == "-"
    applied, undone = ledger.applied(run), ledger.undone(run)
    assert applied.count("rd.A") == 1
    assert applied.count("rd.B") == (2 if after else 1)
    assert undone == (["rd.B"] if after else [])
    assert [a for a in applied if a != "rd.B"] == ["rd.A", "I1", "I2", "rd.C"]
    assert state.redrive_of is not None
    assert [s.status for s in state.steps] == ["done"] * 4


class PWorkSub(qwit.Flow, name="rd.block_sub"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "I1"})
        self.step(Work, {"eid": "I2"})


class RedrivableBlock(qwit.Flow, name="rd.block"):
    def build_flow(self) -> None:
        self.step(Work, {"eid": "first"})
        with self.parallel():
            self.step(Work, {"eid": "P1"})
            self.step(Work, {"eid": "P2"}, on_failure=qwit.ABORT)
            self.step(PWorkSub)
        self.step(Work, {"eid": "last"})


class RedrivableMap(qwit.Flow, name="rd.map"):
    def build_flow(self) -> None:
        self.step(RA)
        self.map(RB, over="items", item="eid", into="outs", max_concurrency=1)
        self.step(RC)


async def test_a_redrive_in_a_block_keeps_the_branches_that_completed(env: Env):
    """The contract's "resumes from its failed step reusing earlier
    outputs", inside a parallel block: the branches (a step, a sub-flow)
    that completed before one aborted are neither undone nor run again; the
    one that aborted (after its effect, once the others had completed) is
    undone first and runs again. Before, the whole block was undone and run
    again."""
    run = new_ledger()
    start = {"ledger": run, "fail": "P2", "delay": {"P2": 1.0}}
    async with env.serve(RedrivableBlock):
        handle = await env.client.start(RedrivableBlock, start)
        kind, _ = await outcome(handle)
        earlier = await handle.state()
        again = await env.client.redrive(handle.id, args={"fail": None})
        kind_again, result = await outcome(again)
        state = await again.state()
    assert (kind, kind_again) == ("aborted", "completed")
    assert [b.status for b in earlier.steps[1].steps] == ["done", "failed", "done"]
    assert sorted(pl.applied(run)) == sorted(["first", "P1", "P2", "I1", "I2", "P2", "last"])
    assert pl.undone(run) == ["P2"]
    assert {"out_P1", "out_P2", "out_I1", "out_I2", "out_last"} <= set(result)
    assert [s.status for s in state.steps] == ["done"] * 3
    assert [b.status for b in state.steps[1].steps] == ["done"] * 3


async def test_kept_branches_of_a_redrive_that_rolls_back_are_undone_once(env: Env):
    run = new_ledger()
    start = {"ledger": run, "fail": "P2", "delay": {"P2": 1.0}}
    async with env.serve(RedrivableBlock):
        handle = await env.client.start(RedrivableBlock, start)
        assert (await outcome(handle))[0] == "aborted"
        again = await env.client.redrive(handle.id, args={"fail": "last", "fail_before": True})
        kind, err = await outcome(again)
    assert kind == "rolled_back"
    # every effect applied is undone once: the kept branches with their
    # recorded args, the redriven one's two executions, and the first step
    assert sorted(pl.undone(run)) == sorted(pl.applied(run))
    assert pl.undone(run)[-1] == "first"
    assert len(pl.undone(run)) == 6  # first, P1, P2 (twice: both runs), I1, I2
    # listed: those undos, and the failed last step's (it had done nothing)
    assert err.compensated == ["par.work"] * 7


async def test_a_redrive_in_a_map_keeps_the_elements_that_completed(env: Env):
    run = new_ledger()
    async with env.serve(RedrivableMap):
        handle = await env.client.start(
            RedrivableMap, {"ledger": run, "items": ["e1", "e2", "e3"], "fail": "e2"}
        )
        kind, _ = await outcome(handle)
        again = await env.client.redrive(handle.id, args={"fail": None})
        kind_again, result = await outcome(again)
    assert (kind, kind_again) == ("aborted", "completed")
    # e1 completed before e2 aborted (one at a time): kept; e3 never ran
    assert ledger.applied(run) == ["rd.A", "e1", "e2", "e3", "rd.C"]
    assert ledger.undone(run) == []
    assert [next(iter(o)) for o in result["outs"]] == ["out_e1", "out_e2", "out_e3"]


async def test_a_redrive_resumes_inside_the_sub_flow_that_aborted(env: Env):
    run = new_ledger()
    async with env.serve(Redrivable):
        (kind, err), (again, _), _ = await redriven(
            env, Redrivable, {"ledger": run, "fail": "I2"}, args={"fail": None}
        )
    assert (kind, again) == ("aborted", "completed")
    assert err.step == "rd.B"
    assert ledger.applied(run) == ["rd.A", "rd.B", "I1", "I2", "rd.C"]
    assert ledger.undone(run) == []


async def test_a_redrive_from_an_earlier_step_undoes_from_there_first(env: Env):
    run = new_ledger()
    async with env.serve(Redrivable):
        (kind, _), (again, _), _ = await redriven(
            env, Redrivable, {"ledger": run, "fail": "I2"}, from_step="2", args={"fail": None}
        )
    assert (kind, again) == ("aborted", "completed")
    # I1 then rd.B undone (newest first), then run again from rd.B
    assert ledger.undone(run) == ["I1", "rd.B"]
    assert ledger.applied(run) == ["rd.A", "rd.B", "I1", "rd.B", "I1", "I2", "rd.C"]


async def test_a_redriven_flow_that_rolls_back_undoes_the_earlier_runs_steps_once(env: Env):
    run = new_ledger()
    async with env.serve(Redrivable):
        (kind, _), (again, err), _ = await redriven(
            env, Redrivable, {"ledger": run, "fail": "I2"}, args={"fail": "rd.C"}
        )
    assert (kind, again) == ("aborted", "rolled_back")
    ledger.assert_fully_undone(run)
    # the failed attempt of I2 (it had started) was undone before the redrive
    # ran it again; then the rollback: C, the sub-flow's I2 and I1, B and A
    assert err.compensated == ["rd.C", "rd.B", "rd.B", "rd.A", "rd.B", "rd.A"]


class BackThenAbort(qwit.Flow, name="rd.back_then_abort"):
    def build_flow(self) -> None:
        self.step(RA)
        self.step(RBack)
        self.step(RB)


async def test_a_redrive_whose_first_undo_fails_reports_the_earlier_failure(env: Env):
    """The reason stays the forward failure that ended the flow, never the
    error of the undo the redrive ran first."""
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(BackThenAbort):
        (kind, first), (again, err), _ = await redriven(
            env, BackThenAbort, {"ledger": run, "fail": "rd.B"}, from_step="2", args={"fail": None}
        )
    assert (kind, again) == ("aborted", "compensation_failed")
    assert (err.step, err.reason, err.error_type) == ("rd.B", first.reason, first.error_type)
    assert first.reason == "StepError: rd.B failed"
    assert err.failed_compensations == ["rd.Back"]
    # its failed attempt undone first (it may have done something), then A
    assert err.compensated == ["rd.B", "rd.A"]


async def test_a_flow_whose_rollback_failed_finishes_it(env: Env):
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(RedrivableBack):
        handle = await env.client.start(RedrivableBack, {"ledger": run, "fail": "rd.C"})
        kind, err = await outcome(handle)
        assert kind == "compensation_failed"
        assert err.failed_compensations == ["rd.Back"]
        with pytest.raises(qwit.ReactionError, match="no from_step"):
            await env.client.redrive(handle.id, from_step="1")
        BROKEN_BACKS.discard(run)
        again = await env.client.redrive(handle.id)
        kind, err = await outcome(again)
    assert kind == "rolled_back"
    assert err.step == "rd.C"
    assert err.compensated == ["rd.Back"]
    # each effect undone once (rd.Back's late, as its undo failed at first)
    assert sorted(ledger.undone(run)) == sorted(ledger.applied(run)) == ["rd.A", "rd.Back"]


async def test_a_flow_whose_rollback_failed_finishes_it_with_args_fixed_for_its_undos(env: Env):
    # Contract 8: redrive(flow_id, from_step=None, args=None). The args reach
    # the undos the redrive runs (over their recorded args and outputs): the
    # operator fixes what made an undo fail. Before, args were refused.
    run = new_ledger()
    async with env.serve(RedrivableBack):
        handle = await env.client.start(
            RedrivableBack, {"ledger": run, "fail": "rd.C", "refund_to": "closed-account"}
        )
        kind, _ = await outcome(handle)
        assert kind == "compensation_failed"
        again = await env.client.redrive(handle.id, args={"refund_to": "new-account"})
        kind, err = await outcome(again)
    assert kind == "rolled_back"
    assert err.compensated == ["rd.Back"]
    assert REFUNDED_TO[run] == "new-account"
    assert sorted(ledger.undone(run)) == sorted(ledger.applied(run)) == ["rd.A", "rd.Back"]


async def test_a_rolled_back_flow_starts_again_with_fresh_keys(env: Env):
    run = new_ledger()
    async with env.serve(Redrivable):
        (kind, _), (again, _), _ = await redriven(
            env, Redrivable, {"ledger": run, "fail": "rd.C"}, args={"fail": None}
        )
        handle = await env.client.start(Redrivable, {"ledger": new_ledger(), "fail": "rd.C"})
        await outcome(handle)
        with pytest.raises(qwit.ReactionError, match="starts again from its start"):
            await env.client.redrive(handle.id, from_step="2")
    assert (kind, again) == ("rolled_back", "completed")
    assert ledger.applied(run) == ["rd.A", "rd.B", "I1", "I2", "rd.A", "rd.B", "I1", "I2", "rd.C"]


class Lingers(Effect, name="rd.Lingers"):
    """Applies its effect, then works until cancelled (unless ``quick``)."""

    heartbeat_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any] | None:
        ledger.record(args["ledger"], "do", "rd.Lingers")
        ledger.record(args["ledger"], "started", "rd.Lingers")
        while not args.get("quick"):
            qwit.heartbeat()
            await asyncio.sleep(0.05)
        return None


class Lingering(qwit.Flow, name="rd.lingering"):
    def build_flow(self) -> None:
        self.step(RA)
        self.step(Lingers)
        self.step(RC)


class BackThenLingering(qwit.Flow, name="rd.back_then_lingering"):
    def build_flow(self) -> None:
        self.step(RBack)
        self.step(Lingers)


async def test_a_redrive_after_a_cancel_whose_first_undo_fails_says_so(env: Env):
    """No forward failure ended the earlier run (a cancel without rollback
    did): the reason says what stopped this one."""
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(BackThenLingering):
        handle = await env.client.start(BackThenLingering, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "rd.Lingers")
        await handle.cancel(rollback=False)
        assert (await outcome(handle))[0] == "cancelled"
        again = await env.client.redrive(handle.id, from_step="1", args={"quick": True})
        kind, err = await outcome(again)
    assert kind == "compensation_failed"
    assert (err.step, err.reason) == (
        "rd.Back",
        "the redrive could not undo 'rd.Back' before resuming",
    )
    assert err.failed_compensations == ["rd.Back"]


async def test_a_flow_cancelled_without_rollback_resumes_like_an_aborted_one(env: Env):
    run = new_ledger()
    async with env.serve(Lingering):
        handle = await env.client.start(Lingering, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "rd.Lingers")
        await handle.cancel(rollback=False)
        assert (await outcome(handle))[0] == "cancelled"
        again = await env.client.redrive(handle.id, args={"quick": True})
        kind, _ = await outcome(again)
    assert kind == "completed"
    # the attempt the cancel stopped had applied its effect: undone first
    assert ledger.applied(run) == ["rd.A", "rd.Lingers", "rd.Lingers", "rd.C"]
    assert ledger.undone(run) == ["rd.Lingers"]


async def test_what_a_redrive_refuses(env: Env):
    run = new_ledger()
    flow = failing_flow(qwit.WAIT)
    async with env.serve(Redrivable, flow):
        waiting = await env.client.start(flow, {"ledger": run, "fail": "react.F"})
        await wait_for_status(waiting, "waiting", timeout=30)
        with pytest.raises(qwit.ReactionError, match="only a flow that has ended"):
            await env.client.redrive(waiting.id)
        await waiting.cancel()
        done = await env.client.start(Redrivable, {"ledger": run})
        assert (await outcome(done))[0] == "completed"
        with pytest.raises(qwit.ReactionError, match="nothing to redrive"):
            await env.client.redrive(done.id)
        aborted = await env.client.start(Redrivable, {"ledger": new_ledger(), "fail": "rd.B"})
        assert (await outcome(aborted))[0] == "aborted"
        with pytest.raises(qwit.ReactionError, match="no step at path"):
            await env.client.redrive(aborted.id, from_step="9")
        with pytest.raises(qwit.ReactionError, match="after the step it stopped at"):
            await env.client.redrive(aborted.id, from_step="3")
        with pytest.raises(qwit.FlowNotFound):
            await env.client.redrive("no-such-flow")


async def test_a_redrive_from_a_member_a_block_does_not_have_is_refused(env: Env):
    # A path inside a block names one of its members (or a step inside one);
    # before, any path under the block was taken as the whole block: a typo
    # undid the block and what followed it, and ran them again.
    run = new_ledger()
    async with env.serve(RedrivableBlock):
        handle = await env.client.start(RedrivableBlock, {"ledger": run, "fail": "P2"})
        assert (await outcome(handle))[0] == "aborted"
        before = pl.entries(run)
        for path in ("2.7", "2.3.9", "2.1.1", "2.3.1.1"):
            with pytest.raises(qwit.ReactionError, match=f"no step at path '{path}'"):
                await env.client.redrive(handle.id, from_step=path)
        assert (await env.client.get_handle(handle.id).state()).status == "aborted"
    assert pl.entries(run) == before


class RStop(Effect, name="rd.Stop"):
    """Its undo fails (while its ledger is in BROKEN_BACKS), stopping the rollback."""

    back_on_failure = qwit.ABORT
    back_retry = qwit.Retry(max_attempts=1)

    async def step_back(self, args: dict[str, Any]) -> None:
        if args["ledger"] in BROKEN_BACKS:
            raise RuntimeError("the refund service is down")
        await super().step_back(args)


class RedrivableStop(qwit.Flow, name="rd.flow_stop"):
    def build_flow(self) -> None:
        self.step(RA)
        with self.parallel():
            self.step(RStop)
            self.step(RB, {"eid": "B1"})
        self.step(RC)


async def test_a_rollback_stopped_by_abort_is_finished_by_a_redrive(env: Env):
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(RedrivableStop):
        handle = await env.client.start(RedrivableStop, {"ledger": run, "fail": "rd.C"})
        kind, err = await outcome(handle)
        assert kind == "compensation_failed"
        assert err.not_compensated == ["rd.A"]
        BROKEN_BACKS.discard(run)
        kind, err = await outcome(await env.client.redrive(handle.id))
    assert kind == "rolled_back"
    assert err.compensated == ["rd.Stop", "rd.A"]
    assert sorted(ledger.undone(run)) == sorted(ledger.applied(run)) == ["B1", "rd.A", "rd.Stop"]


async def test_a_cancel_from_temporal_itself_rolls_back(client, worker, temporal_client):
    """Temporal's own cancel (its CLI, its UI) says nothing of a mode: it rolls back."""
    run = new_ledger()
    async with worker(CancelMe):
        handle = await client.start(CancelMe, {"ledger": run})
        await ledger.wait_for_mark(run, "started", "Slow")
        await temporal_client.get_workflow_handle(handle.id).cancel()
        kind, err = await outcome(handle)
    assert kind == "cancelled"
    assert err.rolled_back is True
    ledger.assert_fully_undone(run)


async def test_a_redrive_runs_on_the_task_queue_the_flow_ran_on(
    temporal_client, task_queue, worker
):
    """A client set up for another task queue redrives a flow onto the queue
    whose workers serve it."""
    run = new_ledger()
    async with worker(Redrivable):
        ours = await qwit.connect(temporal_client=temporal_client, task_queue=task_queue)
        handle = await ours.start(Redrivable, {"ledger": run, "fail": "rd.B"})
        assert (await outcome(handle))[0] == "aborted"
        elsewhere = await qwit.connect(temporal_client=temporal_client, task_queue="elsewhere")
        again = await elsewhere.redrive(handle.id, args={"fail": None})
        assert (await outcome(again))[0] == "completed"
        state = await again.state()
    assert [s.attempts for s in state.steps] == [1, 1, 1, 1]


# -- what an adversarial review found ---------------------------------------------
#
# A provider that dedups on the idempotency key, as a payment API does: a
# second undo under a key it has seen is dropped. Each effect is named; its
# count must end at 0 when the flow rolled back.

APPLIED: dict[str, Counter[str]] = {}
SEEN_UNDOS: set[str] = set()


def apply(run: str, effect: str) -> None:
    APPLIED.setdefault(run, Counter())[effect] += 1


def unapply(run: str, effect: str) -> None:
    key = qwit.context().idempotency_key
    if key in SEEN_UNDOS:
        return  # the key was used already: a real provider drops it
    SEEN_UNDOS.add(key)
    APPLIED.setdefault(run, Counter())[effect] -= 1


def left(run: str) -> dict[str, int]:
    return {k: v for k, v in APPLIED.get(run, Counter()).items() if v}


class Keyed(qwit.Step, abstract=True):
    retry = qwit.Retry(max_attempts=1)
    back_retry = qwit.Retry(max_attempts=1)
    heartbeat_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        effect = args.get("eid", type(self).name)
        apply(args["run"], effect)
        if effect in args.get("fail", []):
            raise qwit.StepError(f"{effect} failed after its effect", retry=False)
        while effect in args.get("hold", []):
            qwit.heartbeat()  # (a step with a heartbeat_timeout that goes quiet is stopped)
            await asyncio.sleep(0.05)
        return {}

    async def step_back(self, args: dict[str, Any]) -> None:
        if args["run"] in BROKEN_BACKS and type(self).name in args.get("broken", []):
            raise RuntimeError("the refund service is down")
        unapply(args["run"], args.get("eid", type(self).name))


class KA(Keyed, name="rv.A"):
    pass


class KB(Keyed, name="rv.B"):
    pass


class KC(Keyed, name="rv.C"):
    pass


class KRate(Keyed, name="rv.Rate"):
    on_failure = qwit.FALLBACK

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        apply(args["run"], "rv.Rate.fb")
        if "rv.Rate.fb" in args.get("fail", []):
            raise qwit.StepError("the fallback failed after its effect", retry=False)
        return {"rate": "flat"}

    async def step_back(self, args: dict[str, Any]) -> None:
        unapply(args["run"], "rv.Rate.fb" if args.get("rate") == "flat" else "rv.Rate")


class KSkipback(Keyed, name="rv.Skipback"):
    on_failure = qwit.SKIPBACK


class FellBack(qwit.Flow, name="rv.fell_back"):
    def build_flow(self) -> None:
        self.step(KA)
        self.step(KRate)
        self.step(KC)


@pytest.mark.parametrize("fallback_fails", [False, True])
async def test_what_a_fallback_did_is_undone_under_a_key_of_its_own(env: Env, fallback_fails):
    """The failed attempt's undo used ``<key>/step_back``; the fallback's output
    is undone under the fallback's key, and not dropped as a repeat. A
    fallback that fails after its effect leaves that effect (its own to
    clean up, as documented); the failed attempt is undone once."""
    run = new_ledger()
    fail = ["rv.Rate", "rv.Rate.fb"] if fallback_fails else ["rv.Rate", "rv.C"]
    async with env.serve(FellBack):
        handle = await env.client.start(FellBack, {"run": run, "fail": fail})
        kind, _ = await outcome(handle)
    assert kind == "rolled_back"
    assert left(run) == ({"rv.Rate.fb": 1} if fallback_fails else {})


class SubXY(qwit.Flow, name="rv.sub_xy"):
    def build_flow(self) -> None:
        self.step(KA, {"eid": "X"})
        self.step(KB, {"eid": "Y"})


class BranchSub(qwit.Flow, name="rv.branch_sub"):
    def build_flow(self) -> None:
        self.step(KA)
        with self.parallel():
            self.step(KB)
            self.step(SubXY)
        self.step(KC)


async def test_a_redrive_undoes_a_sub_flow_branch_stopped_without_rollback(env: Env):
    run = new_ledger()
    async with env.serve(BranchSub):
        handle = await env.client.start(BranchSub, {"run": run, "hold": ["Y"]})
        for _ in range(400):
            if left(run).get("Y"):
                break
            await asyncio.sleep(0.02)
        await handle.cancel(rollback=False)
        assert (await outcome(handle))[0] == "cancelled"
        again = await env.client.redrive(handle.id, args={"hold": [], "fail": ["rv.C"]})
        kind, _ = await outcome(again)
    assert kind == "rolled_back"
    assert left(run) == {}


class Skipped(qwit.Flow, name="rv.skipped"):
    def build_flow(self) -> None:
        self.step(KA)
        self.step(KSkipback)


async def test_finishing_a_rollback_leaves_a_skipback_step_as_it_is(env: Env):
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(Skipped):
        handle = await env.client.start(
            Skipped, {"run": run, "fail": ["rv.Skipback"], "broken": ["rv.A"]}
        )
        assert (await outcome(handle))[0] == "compensation_failed"
        BROKEN_BACKS.discard(run)
        kind, err = await outcome(await env.client.redrive(handle.id))
    assert kind == "rolled_back"
    assert err.compensated == ["rv.A"]
    assert left(run) == {"rv.Skipback": 1}  # SKIPBACK: never undone


class StopKeyed(Keyed, name="rv.Stop"):
    back_on_failure = qwit.ABORT


class StoppedBeforeSub(qwit.Flow, name="rv.stopped_before_sub"):
    def build_flow(self) -> None:
        self.step(KA)
        self.step(SubXY)
        self.step(StopKeyed)
        self.step(KC)


async def test_a_rollback_stopped_before_a_sub_flow_is_finished_by_a_redrive(env: Env):
    """The sub-flow the stopped rollback did not get to keeps its effects and
    ends (on Temporal it is not left waiting, then terminated); the redrive
    undoes it."""
    run = new_ledger()
    BROKEN_BACKS.add(run)
    async with env.serve(StoppedBeforeSub):
        handle = await env.client.start(
            StoppedBeforeSub, {"run": run, "fail": ["rv.C"], "broken": ["rv.Stop"]}
        )
        kind, err = await outcome(handle)
        assert kind == "compensation_failed"
        assert sorted(err.not_compensated) == ["rv.A", "rv.A", "rv.B"]
        BROKEN_BACKS.discard(run)
        kind, _ = await outcome(await env.client.redrive(handle.id))
    assert kind == "rolled_back"
    assert left(run) == {}
