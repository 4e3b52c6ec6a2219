"""qwit.testing.check_rollbacks: the fault matrix of a user's flow.

It passes on the samples (their own systems checked by an oracle), on flows
of every shape and reaction, and on Temporal; it catches a mutation of the
interpreter (an undo run twice, an undo skipped, undos oldest first) and a
step_back that undoes nothing (through the user's oracle). Run with ``-s``
to see the report tables.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import temporalio.client
from pydantic import BaseModel

import qwit
from qwit._errors import StepFailure, error_info
from qwit._saga import Interpreter
from qwit.testing import (
    KINDS,
    RollbackCase,
    RollbackCheckFailed,
    RollbackReport,
    StepCallRecord,
    check_rollbacks,
)
from samples.order.flows import PlaceOrder
from samples.order.shop import SHOP
from samples.quote.desk import DESK
from samples.quote.flows import QuoteShipment
from samples.shipping.carrier import CARRIER
from samples.shipping.flows import ShipOrder

ORDER = {"order_id": "cr-1", "sku": "A-1", "quantity": 1, "card": "4242", "cents": 1250}


@pytest.fixture(autouse=True)
def stocked_shop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough stock for every case (a mutation that skips undos leaks some)."""
    monkeypatch.setattr(SHOP, "stock", {"A-1": 10_000, "B-2": 10_000})


def show(report: RollbackReport) -> None:
    print(f"\n{report}")


def kept(case: RollbackCase, step: str) -> bool:
    """Whether the effect of ``step`` must still be there after ``case``."""
    return case.outcome == "completed" or (case.kind == "undo_fails" and case.step == step)


def forward_keys(case: RollbackCase, step: str) -> set[str]:
    return {c.key for c in case.calls if c.step == step and c.direction == "step_forward"}


def shop_is_clean(case: RollbackCase) -> None:
    """The shop holds a case's reservation and charge only if its flow
    completed (or their own undo was made to fail)."""
    for key in forward_keys(case, "inventory.reserve"):
        held = SHOP.reservation_id(key) in SHOP.reservations
        assert held == kept(case, "inventory.reserve"), f"reservation {key}: held={held}"
    for key in forward_keys(case, "payments.charge"):
        charge = SHOP.charge_id(key)
        charged = charge in SHOP.charges and charge not in SHOP.refunds
        assert charged == kept(case, "payments.charge"), f"charge {key}: charged={charged}"


def carrier_is_clean(case: RollbackCase) -> None:
    shop_is_clean(case)
    for key in forward_keys(case, "shipping.book_carrier"):
        booked = CARRIER.booking_id(key) in CARRIER.bookings
        assert booked == kept(case, "shipping.book_carrier"), f"booking {key}: booked={booked}"


def desk_is_clean(case: RollbackCase) -> None:
    """One pickup slot stays held, the one the quote used, only if the
    carrier's segment completed (then the flow did, or it was undone)."""
    held = [k for k in forward_keys(case, "quote.hold_pickup") if DESK.hold_id(k) in DESK.holds]
    quoted = case.result is not None and "carrier_cents" in case.result
    want = 1 if quoted or (case.kind == "undo_fails" and case.step == "quote.hold_pickup") else 0
    assert len(held) == want, f"{len(held)} pickup slot(s) still held, not {want}"


# -- the samples -------------------------------------------------------------------


async def test_order_sample_passes_every_case():
    report = await check_rollbacks(PlaceOrder, ORDER, oracle=shop_is_clean)
    show(report)
    labels = [case.label for case in report.cases]
    assert labels[0] == "no fault"
    assert len(report.cases) == 1 + 3 * 3 + 2  # undo_fails only for steps with step_back
    by_label = {case.label: case for case in report.cases}
    charge = by_label["2 payments.charge: raises"]
    assert charge.outcome == "rolled_back"
    assert charge.undone == ["payments.charge", "inventory.reserve"]
    # the step ran before it failed: its effect happened, then was undone
    attempts = [c for c in charge.calls if c.path == "2" and c.direction == "step_forward"]
    assert len(attempts) == 3 and all(a.injected for a in attempts)
    failed_undo = by_label["1 inventory.reserve: undo_fails"]
    assert failed_undo.outcome == "compensation_failed"
    assert failed_undo.error is not None
    assert failed_undo.error.info.failed_compensations == ["inventory.reserve"]
    assert failed_undo.undone == ["payments.charge", "inventory.reserve (failed)"]
    timeout = by_label["3 shipping.create: timeout"]
    assert all(c.outcome == "timed_out" for c in timeout.calls if c.path == "3")
    assert timeout.seconds < 2
    assert not report.failed


async def test_shipping_sample_with_a_sub_flow_passes():
    report = await check_rollbacks(ShipOrder, ORDER, oracle=carrier_is_clean)
    show(report)
    paths = {case.path for case in report.cases}
    assert {"3.1", "3.2"} <= paths  # the sub-flow's steps, each failed in turn
    label = next(c for c in report.cases if c.label == "3.2 shipping.print_label: raises")
    assert label.undone == ["shipping.book_carrier", "payments.charge", "inventory.reserve"]


async def test_quote_sample_passes_retried_segment_fallback_and_final_step():
    report = await check_rollbacks(
        QuoteShipment, {"order_id": "cr-q", "carrier_answers_on": 1}, oracle=desk_is_clean
    )
    show(report)
    by_label = {case.label: case for case in report.cases}
    # the segment runs three times, undoing itself each time, then is skipped
    ask = by_label["1.2 quote.ask_price: non_retryable"]
    assert ask.outcome == "completed"
    assert ask.undone == ["quote.hold_pickup"] * 3
    # the flow is made to fail at its last step (its fallback failing too)
    hold = by_label["1.1 quote.hold_pickup: undo_fails"]
    assert hold.fails_at == "2"
    assert hold.outcome == "compensation_failed"
    # a final step's failure changes nothing, and it is never undone
    assert by_label["3 quote.notify_customer: raises"].outcome == "completed"


async def test_the_fixture_gives_the_check(qwit_check_rollbacks: Any):
    report = await qwit_check_rollbacks(PlaceOrder, ORDER, cases=[("payments.charge", "timeout")])
    assert [case.label for case in report.cases] == ["no fault", "2 payments.charge: timeout"]


# -- shapes and reactions: no violation where QWIT keeps the rules -----------------

LEDGER: dict[str, int] = {}


def own_key() -> str:
    return qwit.context().idempotency_key.removesuffix("/step_back")


class Effect(qwit.Step, abstract=True):
    """Records its effect under its forward's key; its undo removes it."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        LEDGER[own_key()] = 1
        return {}

    async def step_back(self, args: dict[str, Any]) -> None:
        LEDGER.pop(own_key(), None)


class PlainEffect(qwit.Step, abstract=True):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        LEDGER[own_key()] = 1
        return {}

    def step_back(self, args: dict[str, Any]) -> None:
        LEDGER.pop(own_key(), None)


class First(Effect, name="cr.first"):
    pass


class Branch(PlainEffect, name="cr.branch"):
    pass


class Inner1(Effect, name="cr.inner1"):
    pass


class Inner2(PlainEffect, name="cr.inner2"):
    pass


class NothingToUndo(qwit.Step, name="cr.nothing_to_undo"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class Element(Effect, name="cr.element"):
    pass


class StopsRollback(Effect, name="cr.stops_rollback"):
    back_on_failure = qwit.ABORT


class Optional(Effect, name="cr.optional"):
    on_failure = qwit.SKIP


class SkipBack(Effect, name="cr.skipback"):
    on_failure = qwit.SKIPBACK


class Waits(Effect, name="cr.waits"):
    on_failure = qwit.WAIT


class UndoWaits(Effect, name="cr.undo_waits"):
    back_on_failure = qwit.WAIT


class Aborts(Effect, name="cr.aborts"):
    on_failure = qwit.ABORT


class FallsBack(Effect, name="cr.falls_back"):
    on_failure = qwit.FALLBACK

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        LEDGER[qwit.context().idempotency_key] = 1
        return {"fell_back": True}


class Notify(qwit.Step, name="cr.notify"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class Inner(qwit.Flow, name="cr.inner"):
    def build_flow(self) -> None:
        self.step(Inner1)
        self.step(Inner2)


class Blocks(qwit.Flow, name="cr.blocks"):
    """A parallel block (a plain step, a sub-flow, a step without undo), a
    map, a step whose failing undo stops the rollback, an optional step and
    a final step."""

    def build_flow(self) -> None:
        self.step(First)
        with self.parallel():
            self.step(Branch)
            self.step(Inner)
            self.step(NothingToUndo)
        self.map(Element, over="items", item="item", into="out", max_concurrency=2)
        self.step(StopsRollback)
        self.step(Optional)
        self.finally_step(Notify)


class Reactions(qwit.Flow, name="cr.reactions"):
    """WAIT (decided by the harness), back_on_failure=WAIT, a retried
    segment, FALLBACK, SKIPBACK and ABORT."""

    def build_flow(self) -> None:
        self.step(UndoWaits)
        self.step(Inner, retry=qwit.Retry(max_attempts=2, initial_interval=0.1))
        self.step(FallsBack)
        self.step(Waits)
        self.step(SkipBack)
        self.step(Aborts)


async def test_blocks_maps_and_stopped_rollbacks_pass():
    report = await check_rollbacks(Blocks, {"items": [1, 2, 3]})
    show(report)
    by_label = {case.label: case for case in report.cases}
    # the map is failed at its first element
    assert "3.1 cr.element: raises" in by_label
    stopped = by_label["4 cr.stops_rollback: undo_fails"]
    assert stopped.outcome == "compensation_failed"
    assert stopped.error is not None and stopped.error.info.not_compensated
    assert by_label["5 cr.optional: raises"].outcome == "completed"
    assert "5 cr.optional: undo_fails" in by_label
    assert by_label["5 cr.optional: undo_fails"].outcome == "skipped"


async def test_every_reaction_passes_and_waits_are_decided():
    report = await check_rollbacks(Reactions, {})
    show(report)
    by_label = {case.label: case for case in report.cases}
    waited = by_label["4 cr.waits: raises"]
    assert waited.outcome == "rolled_back"
    assert any("the harness decided rollback" in note for note in waited.notes)
    undo_waited = by_label["1 cr.undo_waits: undo_fails"]
    assert any("the harness decided skip" in note for note in undo_waited.notes)
    assert undo_waited.outcome == "compensation_failed"
    assert by_label["5 cr.skipback: raises"].undone[0] != "cr.skipback"
    assert by_label["6 cr.aborts: timeout"].outcome == "aborted"
    assert by_label["6 cr.aborts: timeout"].undone == []
    assert by_label["3 cr.falls_back: non_retryable"].outcome == "completed"
    # each of the segment's two attempts undoes itself (the failed step too)
    assert by_label["2.1 cr.inner1: raises"].undone == ["cr.inner1", "cr.inner1", "cr.undo_waits"]
    assert by_label["5 cr.skipback: undo_fails"].outcome == "skipped"


class AlwaysFallsBack(qwit.Step, name="cr.always_falls_back"):
    """Its forward always fails (after its effect): its fallback always runs."""

    retry = qwit.Retry(max_attempts=2, initial_interval=0.01)
    on_failure = qwit.FALLBACK

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        LEDGER[own_key()] = 1
        raise RuntimeError("the carrier is down")

    async def step_fallback(self, args: dict[str, Any], error: Any) -> dict[str, Any]:
        LEDGER[qwit.context().idempotency_key] = 1
        return {"rate": "flat"}

    async def step_back(self, args: dict[str, Any]) -> None:
        LEDGER.pop(own_key(), None)


class FallsBackAlways(qwit.Flow, name="cr.falls_back_always"):
    def build_flow(self) -> None:
        self.step(First)
        self.step(AlwaysFallsBack)
        self.step(Branch)


async def test_a_step_that_falls_back_in_every_run_passes():
    # The undo of what its fallback did (keyed <forward key>/step_fallback)
    # was taken for the undo of a forward that ran no code: "not undone".
    report = await check_rollbacks(FallsBackAlways, {})
    later = next(c for c in report.cases if c.label == "3 cr.branch: raises")
    # the failed attempt (undone before the fallback), then the rollback
    assert later.undone == ["cr.always_falls_back", "cr.branch", "cr.always_falls_back", "cr.first"]
    assert later.violations == []


class Token(BaseModel):
    token: str


class Produces(Effect, name="cr.produces"):
    on_failure = qwit.SKIP

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        await super().step_forward(args)
        return {"token": "t"}


class ConsumesTyped(qwit.Step, name="cr.consumes_typed"):
    """Typed: refused before it runs (ArgumentsError) without a token; skipped then."""

    on_failure = qwit.SKIP

    async def step_forward(self, args: Token) -> dict[str, Any]:
        LEDGER[own_key()] = 1
        return {"used": args.token}

    async def step_back(self, args: dict[str, Any]) -> None:
        LEDGER.pop(own_key(), None)


class SkipThenTypedSkip(qwit.Flow, name="cr.skip_then_typed_skip"):
    def build_flow(self) -> None:
        self.step(Produces)
        self.step(ConsumesTyped)
        self.step(First)


async def test_a_step_refused_before_it_ran_and_skipped_passes():
    # When the producer is skipped, the typed consumer's call is refused
    # (ArgumentsError) before it runs, it is skipped too, and the flow
    # completes: correct, and no violation (a step that ran no code is
    # excused when the flow's state says QWIT refused it).
    report = await check_rollbacks(SkipThenTypedSkip, {})
    skipped = next(c for c in report.cases if c.label == "1 cr.produces: raises")
    assert (skipped.outcome, skipped.violations) == ("completed", [])


# -- what it catches ----------------------------------------------------------------


async def _check_fails(flow: type[qwit.Flow], args: Any, **options: Any) -> RollbackCheckFailed:
    """What ``check_rollbacks`` raised (it must raise), printed."""
    with pytest.raises(RollbackCheckFailed) as caught:
        await check_rollbacks(flow, args, **options)
    print(f"\n{caught.value}")
    return caught.value


async def test_an_undo_run_twice_is_caught(monkeypatch: pytest.MonkeyPatch):
    original = Interpreter._undo

    async def twice(self: Interpreter, run: Any) -> None:
        await original(self, run)
        if run.name == "payments.charge":
            await original(self, run)

    monkeypatch.setattr(Interpreter, "_undo", twice)
    failed = await _check_fails(PlaceOrder, ORDER)
    assert isinstance(failed, AssertionError)
    case = failed.case
    assert case.label == "1 inventory.reserve: undo_fails"  # the first that undoes the charge
    assert "payments.charge (2) was undone 2 times (at most once)" in case.violations
    assert any("compensated is" in v and "payments.charge too" in v for v in case.violations)
    assert failed.report.cases[0].label == "no fault"
    assert "payments.charge (2) was undone 2 times" in str(failed)


async def test_an_undo_skipped_is_caught(monkeypatch: pytest.MonkeyPatch):
    original = Interpreter._undo

    async def skipping(self: Interpreter, run: Any) -> None:
        if run.name != "inventory.reserve":
            await original(self, run)

    monkeypatch.setattr(Interpreter, "_undo", skipping)
    failed = await _check_fails(PlaceOrder, ORDER)
    case = failed.case
    assert case.label == "1 inventory.reserve: raises"
    assert "inventory.reserve (1) was not undone" in case.violations
    assert any("compensated is" in v and "misses inventory.reserve" in v for v in case.violations)
    # every case that rolls back shows it
    rolled = [c for c in failed.report.cases if c.outcome != "completed"]
    assert all(c.violations for c in rolled)


async def test_an_undo_of_a_step_the_flow_never_reached_is_caught(
    monkeypatch: pytest.MonkeyPatch,
):
    # An engine whose rollback of the first step also runs the step_back of
    # the second, which the flow never got to (the first failed): QWIT undoes
    # a step that may have started, never one its flow did not reach.
    from qwit.local import LocalRuntime

    original = LocalRuntime.run_attempt

    async def also_undo_the_next(
        self: LocalRuntime, cls: Any, node: Any, call: Any, attempt: int, beats: Any
    ) -> Any:
        reached = self.run.__dict__.setdefault("reached", set())
        if call.direction == "step_forward":
            reached.add(call.path)
        if call.direction == "step_back" and call.path == "1" and "2" not in reached:
            step = self.run.registry.get("payments.charge")
            stray = call.model_copy(
                update={"path": "2", "step": "payments.charge", "key": f"{call.key[:-1]}2"}
            )
            await original(self, cls._qwit_probe.instrumented(step), node, stray, attempt, beats)
        return await original(self, cls, node, call, attempt, beats)

    monkeypatch.setattr(LocalRuntime, "run_attempt", also_undo_the_next)
    failed = await _check_fails(PlaceOrder, ORDER)
    case = failed.case
    assert case.label == "1 inventory.reserve: raises"
    assert (
        "the step_back of payments.charge (2) ran, though its flow never got to the step"
        in case.violations
    )
    assert case.undone == ["payments.charge", "inventory.reserve"]


async def test_a_completed_forward_run_again_under_its_key_is_caught(
    monkeypatch: pytest.MonkeyPatch,
):
    # An engine that runs the charge's step_forward a second time, under the
    # same key, after it completed: a provider that dedups on the key hides
    # the second run, so the record of the calls is what shows it.
    from qwit.local import LocalRuntime

    original = LocalRuntime.run_attempt

    async def charge_twice(
        self: LocalRuntime, cls: Any, node: Any, call: Any, attempt: int, beats: Any
    ) -> Any:
        result = await original(self, cls, node, call, attempt, beats)
        if call.direction == "step_forward" and call.path == "2":
            result = await original(self, cls, node, call, attempt + 1, beats)
        return result

    monkeypatch.setattr(LocalRuntime, "run_attempt", charge_twice)
    failed = await _check_fails(PlaceOrder, ORDER)
    case = failed.case
    assert case.label == "no fault"
    assert (
        "attempt 2 of the step_forward of payments.charge (2) ran under its key after "
        "attempt 1 had completed"
    ) in case.violations


class SlowCharge(qwit.Step, name="cr.slow_charge"):
    retry = qwit.Retry(max_attempts=3, initial_interval=0.01)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {}

    async def step_back(self, args: dict[str, Any]) -> None:
        pass


class SlowChargeFlow(qwit.Flow, name="cr.slow_charge_flow"):
    def build_flow(self) -> None:
        self.step(SlowCharge)


async def test_an_attempt_started_beside_the_one_before_is_caught(
    monkeypatch: pytest.MonkeyPatch,
):
    # An engine that gives up on a first attempt still running and starts the
    # next beside it (QWIT waits for an attempt to stop, within its grace).
    from qwit.local import LocalRuntime

    original = LocalRuntime.run_attempt
    abandoned: list[asyncio.Task[Any]] = []

    async def abandon_the_first(
        self: LocalRuntime, cls: Any, node: Any, call: Any, attempt: int, beats: Any
    ) -> Any:
        if call.direction == "step_forward" and attempt == 1:
            abandoned.append(asyncio.ensure_future(original(self, cls, node, call, attempt, beats)))
            await asyncio.sleep(0.05)
            raise StepFailure(error_info(RuntimeError("gave up on attempt 1")))
        return await original(self, cls, node, call, attempt, beats)

    monkeypatch.setattr(LocalRuntime, "run_attempt", abandon_the_first)
    failed = await _check_fails(SlowChargeFlow, {}, cases=["raises"])
    await asyncio.gather(*abandoned, return_exceptions=True)
    violations = failed.case.violations
    assert any(
        v.startswith("attempt 2 of the step_forward of cr.slow_charge (1) started")
        and v.endswith("ms before attempt 1 ended")
        for v in violations
    ), violations


class SkipThenMore(qwit.Flow, name="cr.skip_then_more"):
    def build_flow(self) -> None:
        self.step(First)
        self.step(Optional)
        self.step(Branch)


async def test_a_step_the_rules_run_next_that_never_runs_is_caught(
    monkeypatch: pytest.MonkeyPatch,
):
    # An engine that takes a SKIP as "the flow ends here, completed": the
    # step after the skipped one never runs. The model of the rules gave up
    # on a step that ran no code (a note, no violation): nothing was caught.
    original = Interpreter._forward

    async def ends_at_a_skip(self: Interpreter, run: Any) -> Any:
        went_on = await original(self, run)
        if run.status == "skipped":
            for later in self.saga.runs:
                if later.status == "pending":
                    later.status = "skipped"
        return went_on

    monkeypatch.setattr(Interpreter, "_forward", ends_at_a_skip)
    failed = await _check_fails(SkipThenMore, {}, cases=["cr.optional"])
    assert failed.case.label == "2 cr.optional: raises"
    assert (
        "the flow got to cr.branch (3), which the rules run next, and never ran its "
        "step_forward" in failed.case.violations
    )


async def test_a_retried_segment_not_run_again_is_caught(monkeypatch: pytest.MonkeyPatch):
    # The sub-flow's retry policy says run it again: an engine that does not
    # is caught (its steps, reached again by the rules, never run again).
    monkeypatch.setattr(Interpreter, "_segment_retry", lambda self, run: None)
    failed = await _check_fails(Reactions, {}, cases=[("cr.inner1", "raises")])
    assert any(
        "cr.inner1 (2.1), which the rules run next, and never ran" in v
        for v in failed.case.violations
    )


async def test_undos_oldest_first_are_caught(monkeypatch: pytest.MonkeyPatch):
    async def oldest_first(self: Interpreter, failed: Any) -> None:
        for run in self.saga.done + ([failed] if failed is not None else []):
            await self._undo(run)

    monkeypatch.setattr(Interpreter, "_rollback", oldest_first)
    failed = await _check_fails(PlaceOrder, ORDER, cases=["payments.charge"])
    assert any(
        "the undo of payments.charge (2) ended after the undo of inventory.reserve (1) started" in v
        for v in failed.case.violations
    )


BOOKED: set[str] = set()


class BookRoom(qwit.Step, name="cr.book_room"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        BOOKED.add(qwit.context().idempotency_key)
        return {"room": qwit.context().idempotency_key}

    async def step_back(self, args: dict[str, Any]) -> None:
        pass  # the bug: it forgets to cancel the room


class PayTrip(Effect, name="cr.pay_trip"):
    pass


class Trip(qwit.Flow, name="cr.trip"):
    def build_flow(self) -> None:
        self.step(BookRoom)
        self.step(PayTrip)


async def test_a_step_back_that_undoes_nothing_is_caught_by_the_oracle():
    checked: list[str] = []

    async def no_room_left(case: RollbackCase) -> None:
        await asyncio.sleep(0)
        checked.append(case.label)
        if case.outcome == "completed":
            return
        for key in forward_keys(case, "cr.book_room"):
            if case.kind == "undo_fails" and case.step == "cr.book_room":
                continue
            assert key not in BOOKED, f"room {key} is still booked after {case.outcome}"

    failed = await _check_fails(Trip, {}, oracle=no_room_left)
    case = failed.case
    assert case.label == "1 cr.book_room: raises"
    assert len(case.violations) == 1
    assert case.violations[0].startswith("oracle: AssertionError: room ")
    assert checked == [c.label for c in failed.report.cases]  # called after every case


# -- arguments --------------------------------------------------------------------


class Fails(qwit.Step, name="cr.fails"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("always", retry=False)


class Broken(qwit.Flow, name="cr.broken"):
    def build_flow(self) -> None:
        self.step(First)
        self.step(Fails)


async def test_a_flow_that_fails_without_a_fault_is_refused():
    with pytest.raises(ValueError, match="does not complete with these args without a fault"):
        await check_rollbacks(Broken, {})


async def test_cases_choose_steps_and_kinds():
    report = await check_rollbacks(PlaceOrder, ORDER, cases=["timeout", ("1", "undo_fails")])
    assert [c.label for c in report.cases] == [
        "no fault",
        "1 inventory.reserve: timeout",
        "1 inventory.reserve: undo_fails",
        "2 payments.charge: timeout",
        "3 shipping.create: timeout",
    ]
    assert KINDS == ("raises", "non_retryable", "timeout", "undo_fails")
    with pytest.raises(ValueError, match="names no step or kind"):
        await check_rollbacks(PlaceOrder, ORDER, cases=["no.such.step"])
    with pytest.raises(ValueError, match="not a kind of failure"):
        await check_rollbacks(PlaceOrder, ORDER, cases=[("1", "explodes")])


async def test_engines_it_runs_on():
    with pytest.raises(ValueError, match="needs the client connected to it"):
        await check_rollbacks(PlaceOrder, ORDER, backend=qwit.temporal)

    class Elsewhere:
        name = "elsewhere"

        def create_engine(self, client: Any) -> Any:  # pragma: no cover - refused first
            raise AssertionError

    with pytest.raises(ValueError, match=r"qwit\.local or qwit\.temporal"):
        await check_rollbacks(PlaceOrder, ORDER, backend=Elsewhere())


async def test_on_temporal(qwit_temporal_client: temporalio.client.Client):
    client = qwit.Client(temporal_client=qwit_temporal_client)
    report = await check_rollbacks(
        PlaceOrder, ORDER, backend=qwit.temporal, client=client, oracle=shop_is_clean
    )
    show(report)
    assert report.engine == "temporal"
    assert len(report.cases) == 12
    assert not report.failed


# -- what it finds in QWIT ------------------------------------------------------------


class SlowUndo(qwit.Step, abstract=True):
    undo_seconds = 0.0

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        await asyncio.sleep(type(self).undo_seconds)


class SlowA1(SlowUndo, name="cr.a1"):
    undo_seconds = 0.2


class SlowA2(SlowUndo, name="cr.a2"):
    undo_seconds = 0.05


class SlowB1(SlowUndo, name="cr.b1"):
    undo_seconds = 0.3


class SlowB2(SlowUndo, name="cr.b2"):
    undo_seconds = 0.01


class BranchA(qwit.Flow, name="cr.branch_a"):
    def build_flow(self) -> None:
        self.step(SlowA1)
        self.step(SlowA2)


class BranchB(qwit.Flow, name="cr.branch_b"):
    def build_flow(self) -> None:
        self.step(SlowB1)
        self.step(SlowB2)


class TwoSubflows(qwit.Flow, name="cr.two_subflows"):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(BranchA)
            self.step(BranchB)
        self.step(First)


ONE_CASE = [("cr.first", "non_retryable")]


async def test_sub_flows_undone_side_by_side_are_undone_once_in_dependency_order():
    """Every undo runs once, newest first within each branch, after the step
    after the block; whatever else is found is only the order compensated
    lists them in (below)."""
    try:
        report = await check_rollbacks(TwoSubflows, {}, cases=ONE_CASE)
    except RollbackCheckFailed as failed:
        print(f"\n{failed}")
        report = failed.report
    case = report.cases[1]
    assert sorted(case.undone) == ["cr.a1", "cr.a2", "cr.b1", "cr.b2", "cr.first"]
    assert case.undone[0] == "cr.first"
    assert all(v.startswith("compensated lists ") for v in case.violations)


async def test_sub_flows_undone_side_by_side_are_listed_in_the_order_their_undos_ended():
    """A sub-flow's undos reach its parent when its whole rollback has ended;
    those of sub-flows undone side by side are put in the order they ended
    (cr.b2's undo ends at 10 ms, before cr.a1's starts at 50 ms)."""
    await check_rollbacks(TwoSubflows, {}, cases=ONE_CASE)


def _undo_record(path: str, start: float, end: float) -> StepCallRecord:
    return StepCallRecord(path, f"s{path}", "step_back", f"k{path}", 1, start, end, "ok")


@pytest.mark.parametrize(("gap", "violated"), [(0.001, False), (0.05, True)])
def test_undos_ending_together_may_be_listed_in_either_order(gap: float, violated: bool):
    # The undo of 2 ended `gap` s before the undo of 1 started, yet 1 is
    # listed first: within the report race of undos ending together (on
    # Temporal a worker's reports reach the server in either order), not past it.
    from qwit._errors import Compensation
    from qwit._rollbacks import REPORT_SLACK, _Exec, _order_violations

    execs = [
        _Exec("1", "s1", "k1", "step_forward", [], None, [[_undo_record("1", 1.0 + gap, 1.1)]]),
        _Exec("2", "s2", "k2", "step_forward", [], None, [[_undo_record("2", 0.9, 1.0)]]),
    ]
    listed = [
        Compensation(name="s1", path="1", status="compensated"),
        Compensation(name="s2", path="2", status="compensated"),
    ]
    assert bool(_order_violations(listed, execs, REPORT_SLACK)) is violated
    # an engine that learns of an undo's end at once (qwit.local) gets none
    assert bool(_order_violations(listed, execs)) is True
