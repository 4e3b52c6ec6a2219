"""`qwit run`'s progress lines: the flow's events, sub-flows' among them, in saga order."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

import qwit
from qwit import FlowState, StepState
from qwit._cli import cli
from qwit._cli._progress import Follower
from qwit._engine import Decision, FlowHandle
from qwit._errors import ErrorInfo
from qwit._state import FlowEvent
from qwit.testing import wait_for_status
from samples.shipping.flows import ShipOrder
from tests.cli_flows import Outer, Retried

NO_ROUTE = "StepError: no route"


def follower(**options: Any) -> tuple[Follower, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=200, highlight=False, soft_wrap=True)
    return Follower(console, **options), out


def story(out: io.StringIO) -> list[str]:
    """The lines printed, without their symbol and extra spaces."""
    return [" ".join(line.split()[1:]) for line in out.getvalue().splitlines()]


async def test_a_rollback_inside_a_sub_flow_seen_in_one_poll_reads_in_saga_order(qwit_local):
    args = {"order_id": "9", "sku": "A-1", "quantity": 1, "card": "4242", "cents": 10}
    handle = await qwit_local.start(ShipOrder, {**args, "country": "XX"})
    with pytest.raises(qwit.FlowRolledBack):
        await handle.result()
    follow, out = follower()
    with pytest.raises(qwit.FlowRolledBack):
        await follow.follow(handle)  # the flow has ended: one look tells it all
    no_route = "StepError: no carrier route to 'XX'"
    assert story(out) == [
        "1 inventory.reserve started",
        "1 inventory.reserve done",
        "2 payments.charge started",
        "2 payments.charge done",
        "3 shipping (sub-flow) started",
        "3.1 shipping.book_carrier started",
        "3.1 shipping.book_carrier done",
        "3.2 shipping.print_label started",
        f"3.2 shipping.print_label failed: {no_route}",
        # the failed step's undo: it has no step_back (the state says so, no plan needed)
        "3.2 shipping.print_label compensated (no step_back: nothing to undo)",
        "3.1 shipping.book_carrier compensating",
        "3.1 shipping.book_carrier compensated",
        # a sub-flow that fails has undone itself
        f"3 shipping (sub-flow) failed: {no_route}",
        "2 payments.charge compensating",
        "2 payments.charge compensated",
        "1 inventory.reserve compensating",
        "1 inventory.reserve compensated",
    ]


async def test_a_flow_followed_through_a_wait_and_a_retry(qwit_local):
    handle = await qwit_local.start(Outer, {})
    follow, out = follower(react="qwit react")
    following = asyncio.ensure_future(follow.follow(handle))
    await wait_for_status(handle, "waiting")
    await asyncio.sleep(0.5)  # the follower looks a few times a second
    assert "flow waits for an operator at step 3 't.approve': StepError: needs approval" in (
        out.getvalue()
    )
    await handle.react("retry", {"approved": True})
    assert (await asyncio.wait_for(following, 10))["approved_by"] == "ops"
    assert [line for line in story(out) if line[:1].isdigit()] == [
        "1 t.reserve started",
        "1 t.reserve done",
        "2 t.inner (sub-flow) started",
        "2.1 t.pack started",
        "2.1 t.pack done",
        "2.2 t.notify started",
        "2.2 t.notify done",
        "2 t.inner (sub-flow) done",
        "3 t.approve started",
        "3 t.approve failed: StepError: needs approval",
        # an operator's retry undoes the failed execution, then runs the step again
        "3 t.approve compensating",
        "3 t.approve compensated",
        "3 t.approve started again",
        "3 t.approve done (2 attempts)",
    ]
    assert out.getvalue().count("flow waits for an operator") == 1
    assert f"qwit react {handle.id} retry [--args JSON]" in out.getvalue()


async def test_caught_up_it_tells_only_what_comes_next(qwit_local):
    handle = await qwit_local.start(Outer, {})
    await wait_for_status(handle, "waiting")
    follow, out = follower()
    await follow.catch_up(handle, await handle.state())
    await handle.react("rollback")
    with pytest.raises(qwit.FlowRolledBack):
        await asyncio.wait_for(follow.follow(handle), 10)
    assert story(out) == [
        "3 t.approve compensating",
        "3 t.approve compensated",
        "2 t.inner (sub-flow) compensating",
        "2.2 t.notify compensated (no step_back: nothing to undo)",
        "2.1 t.pack compensated (no step_back: nothing to undo)",
        "2 t.inner (sub-flow) compensated",
        "1 t.reserve compensating",
        "1 t.reserve compensated",
    ]


class One(qwit.Step, name="p.one"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"one": 1}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Fragile(qwit.Step, name="p.fragile"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        if not args.get("ok"):
            raise qwit.StepError("broken", retry=False)

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Slow(qwit.Step, name="p.slow"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class SlowSub(qwit.Flow, name="p.slow_sub"):
    def build_flow(self) -> None:
        self.step(One)
        self.step(Slow)


class Cancelled(qwit.Flow, name="p.cancelled"):
    def build_flow(self) -> None:
        self.step(SlowSub)


class Deep(qwit.Flow, name="p.deep"):
    def build_flow(self) -> None:
        self.step(One)
        self.step(Fragile)


class Mid(qwit.Flow, name="p.mid"):
    def build_flow(self) -> None:
        self.step(One)
        self.step(Deep)


class Top(qwit.Flow, name="p.top"):
    def build_flow(self) -> None:
        self.step(Mid, on_failure=qwit.WAIT)


async def test_a_sub_flow_run_again_tells_each_of_its_executions(qwit_local):
    handle = await qwit_local.start(Top, {})
    follow, out = follower()
    following = asyncio.ensure_future(follow.follow(handle))
    await wait_for_status(handle, "waiting")
    await asyncio.sleep(0.5)  # the follower looks a few times a second
    await handle.react("retry", {"ok": True})
    await asyncio.wait_for(following, 10)
    assert [line for line in story(out) if line[:1].isdigit()] == [
        "1 p.mid (sub-flow) started",
        "1.1 p.one started",
        "1.1 p.one done",
        "1.2 p.deep (sub-flow) started",
        "1.2.1 p.one started",
        "1.2.1 p.one done",
        "1.2.2 p.fragile started",
        "1.2.2 p.fragile failed: StepError: broken",
        "1.2.2 p.fragile compensating",
        "1.2.2 p.fragile compensated",
        "1.2.1 p.one compensating",
        "1.2.1 p.one compensated",
        "1.2 p.deep (sub-flow) failed: StepError: broken",
        "1.1 p.one compensating",
        "1.1 p.one compensated",
        "1 p.mid (sub-flow) failed: StepError: broken",
        # the retry is a new execution of p.mid, and so of p.deep inside it
        "1 p.mid (sub-flow) started again",
        "1.1 p.one started",
        "1.1 p.one done",
        "1.2 p.deep (sub-flow) started",
        "1.2.1 p.one started",
        "1.2.1 p.one done",
        "1.2.2 p.fragile started",
        "1.2.2 p.fragile done",
        "1.2 p.deep (sub-flow) done",
        "1 p.mid (sub-flow) done (2 attempts)",
    ]

    # Looked at only once it has ended, the first execution's steps are not
    # known any more (the flow names its sub-flows' latest executions only).
    follow, out = follower()
    await follow.follow(handle)
    assert story(out)[:4] == [
        "1 p.mid (sub-flow) started",
        "1 p.mid (sub-flow) failed: StepError: broken",
        "1 p.mid (sub-flow) started again",
        "1.1 p.one started",
    ]


async def test_a_cancel_inside_a_sub_flow(qwit_local):
    handle = await qwit_local.start(Cancelled, {})
    follow, out = follower()
    following = asyncio.ensure_future(follow.follow(handle))
    await wait_for_status(handle, "running")
    for _ in range(100):
        if any("1.2 p.slow started" in line for line in story(out)):
            break
        await asyncio.sleep(0.05)
    await handle.cancel()
    with pytest.raises(qwit.FlowCancelled):
        await asyncio.wait_for(following, 10)
    assert story(out) == [
        "1 p.slow_sub (sub-flow) started",
        "1.1 p.one started",
        "1.1 p.one done",
        "1.2 p.slow started",
        # the flow marks the sub-flow in flight failed, then cancels it: it undoes itself
        "1 p.slow_sub (sub-flow) failed",
        "1.2 p.slow failed",
        "1.2 p.slow compensating",
        "1.2 p.slow compensated",
        "1.1 p.one compensating",
        "1.1 p.one compensated",
        "1 p.slow_sub (sub-flow) compensated",
    ]


# -- states read one after the other: a sub-flow's events wait for their cause --


class Snapshots(FlowHandle):
    """A flow whose executions' states a test sets, one look after the other."""

    def __init__(self, *states: FlowState) -> None:
        self.id = states[0].flow_id
        self.engine = "test"
        self.states = {s.flow_id: s for s in states}

    async def flow_state(self, flow_id: str) -> FlowState:
        return self.states[flow_id]

    async def result(self) -> dict[str, Any]:
        raise NotImplementedError

    async def cancel(self) -> None:
        raise NotImplementedError

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        raise NotImplementedError


def events(*changes: tuple[str, str, str] | tuple[str, str, str, int]) -> list[FlowEvent]:
    """Events numbered in order: (path, name, status[, attempts]); path '' is the flow's."""
    return [
        FlowEvent(
            seq=i,
            kind="flow" if not c[0] else "step",
            path=c[0],
            name=c[1],
            status=c[2],
            attempts=c[3] if len(c) > 3 else 0,  # type: ignore[misc]
            error=NO_ROUTE if c[2] == "failed" else None,
        )
        for i, c in enumerate(changes, 1)
    ]


def step(path: str, name: str, status: str, **extra: Any) -> StepState:
    return StepState(name=name, path=path, status=status, **extra)  # type: ignore[arg-type]


def state(flow_id: str, status: str, steps: list[StepState], log: list[FlowEvent]) -> FlowState:
    return FlowState(flow=flow_id, flow_id=flow_id, status=status, steps=steps, events=log)  # type: ignore[arg-type]


async def look(follow: Follower, handle: FlowHandle, out: io.StringIO) -> list[str]:
    """What one look at the flow prints."""
    before = len(story(out))
    follow.show(await follow.poll(handle))
    return story(out)[before:]


async def test_a_sub_flows_undo_is_told_after_its_entry_starts_compensating():
    forward = [
        ("1", "reserve", "running"),
        ("1", "reserve", "done", 1),
        ("2", "ship", "running"),
        ("2", "ship", "done", 1),
        ("3", "charge", "running"),
        ("3", "charge", "failed", 1),
        ("", "f", "compensating"),
        ("3", "charge", "compensating", 1),
        ("3", "charge", "compensated", 1),
    ]
    back = [
        ("2", "ship", "compensating", 1),
        ("2", "ship", "compensated", 1),
        ("1", "reserve", "compensating", 1),
        ("1", "reserve", "compensated", 1),
        ("", "f", "rolled_back"),
    ]
    sub_forward = [("2.1", "book", "running"), ("2.1", "book", "done", 1)]
    sub_back = [("", "ship", "compensating"), ("2.1", "book", "compensating", 1)]
    entry = step("2", "ship", "done", kind="flow", flow_id="f/~2")
    # The parent is read before it undoes the sub-flow; the sub-flow, read
    # a moment later, has started its undo already.
    book = step("2.1", "book", "compensating")
    handle = Snapshots(
        state("f", "compensating", [step("1", "reserve", "done"), entry], events(*forward)),
        state("f/~2", "compensating", [book], events(*sub_forward, *sub_back)),
    )
    follow, out = follower()
    assert await look(follow, handle, out) == [
        "1 reserve started",
        "1 reserve done",
        "2 ship (sub-flow) started",
        "2.1 book started",
        "2.1 book done",
        "2 ship (sub-flow) done",
        "3 charge started",
        f"3 charge failed: {NO_ROUTE}",
        "3 charge compensating",
        "3 charge compensated",
    ]
    entry = entry.model_copy(update={"status": "compensated"})
    book = step("2.1", "book", "compensated")
    sub_end = [("2.1", "book", "compensated", 1), ("", "ship", "rolled_back")]
    handle.states = {
        "f": state(
            "f",
            "rolled_back",
            [step("1", "reserve", "compensated"), entry],
            events(*forward, *back),
        ),
        "f/~2": state("f/~2", "rolled_back", [book], events(*sub_forward, *sub_back, *sub_end)),
    }
    assert await look(follow, handle, out) == [
        "2 ship (sub-flow) compensating",
        "2.1 book compensating",
        "2.1 book compensated",
        "2 ship (sub-flow) compensated",
        "1 reserve compensating",
        "1 reserve compensated",
    ]
    assert await look(follow, handle, out) == []


async def test_an_attempt_in_flight_is_told_once_per_retry():
    # What the state reports of a step Temporal is retrying: the failed
    # attempts so far, and the last one's error (its words as Temporal has them).
    def retried(attempts: int) -> FlowState:
        error = ErrorInfo(
            type="builtins.ConnectionError",
            message=f"ConnectionError: try {attempts} refused",
            attempt=attempts,
        )
        flaky = step("2", "t.flaky", "running", attempts=attempts, error=error)
        log = events(
            ("1", "t.reserve", "running"),
            ("1", "t.reserve", "done", 1),
            ("2", "t.flaky", "running"),
        )
        return state("r", "running", [step("1", "t.reserve", "done"), flaky], log)

    handle = Snapshots(retried(0))
    follow, out = follower()
    assert await look(follow, handle, out) == [
        "1 t.reserve started",
        "1 t.reserve done",
        "2 t.flaky started",
    ]
    handle.states["r"] = retried(1)
    assert await look(follow, handle, out) == [
        "2 t.flaky retrying (attempt 2) after ConnectionError: try 1 refused"
    ]
    assert await look(follow, handle, out) == []
    handle.states["r"] = retried(2)
    assert await look(follow, handle, out) == [
        "2 t.flaky retrying (attempt 3) after ConnectionError: try 2 refused"
    ]


async def test_a_retried_step_on_the_local_engine_ends_with_its_attempts(qwit_local):
    handle = await qwit_local.start(Retried, {})
    follow, out = follower()
    assert (await asyncio.wait_for(follow.follow(handle), 10))["attempt"] == 3
    assert "2 t.flaky done (3 attempts)" in story(out)


def test_usage_errors_of_run_exit_2_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path))
    cases = [
        (["tests.no_such_module:Flow"], "'tests.no_such_module:Flow' does not resolve"),
        (["tests.cli_flows:Missing"], "'tests.cli_flows:Missing' does not resolve"),
        (["tests.cli_flows:NOT_A_FLOW"], "is 42, not a qwit.Flow subclass"),
        (["tests.cli_flows:Outer", "--args", "{bad"], "--args: not valid JSON"),
        (["tests.cli_flows:Outer", "--args", "[1]"], "must be a JSON object, not list"),
        (["tests.cli_flows:Outer", "--args", '{"x": NaN}'], "'x': nan is not a finite number"),
        (["tests.cli_flows:Empty"], "flow 't.empty' has no steps"),
        (["tests.cli_flows:Outer", "--id", " "], "id must be a non-empty string"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, ["run", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not list(tmp_path.iterdir())  # no server was started for any of them


def test_a_wait_of_qwit_local_says_no_other_process_can_decide_it():
    from qwit._cli._render import wait_lines

    waiting = qwit.WaitInfo(
        step="s",
        path="1",
        flow_id="f",
        direction="step_forward",
        error=ErrorInfo(type="builtins.RuntimeError", message="no"),
        allowed=["retry", "rollback"],
    )
    told = [line.plain for line in wait_lines(waiting, "f", None)]
    assert not any("qwit react f" in line for line in told)
    assert any("qwit react can't reach a flow of qwit.local" in line for line in told)
    commands = [line.plain.strip() for line in wait_lines(waiting, "f", "qwit react --backend x")]
    assert "qwit react --backend x f rollback" in commands
