"""`qwit redrive`, `qwit redrive --query`, and how `qwit status` shows a
redriven flow, a rollback that stopped and final steps, on a real dev server."""

from __future__ import annotations

import asyncio
import json
import uuid
from io import StringIO
from typing import Any, Literal

import pytest
from click.testing import CliRunner
from rich.console import Console

import qwit
from qwit._cli import _ops
from qwit._cli import cli as cli_group
from qwit._cli._bulk import DEFAULT_RATE, Bulk
from qwit._cli._list import row_status
from qwit._cli._render import failure_lines, final_paths, plan_final_paths, state_view
from qwit._errors import Compensation, ErrorInfo, FailureInfo
from qwit._flow import compile_flow
from qwit._state import FlowEvent
from qwit.temporal import QWIT_STATUS, DevServer, TemporalFlowHandle
from qwit.testing import wait_for_status
from tests.clirun import Done
from tests.clirun import qwit as run_qwit
from tests.test_cli_bulk import in_queue, visible

#: Ledgers whose refunds fail: the refund service is down for them.
REFUNDS_DOWN: set[str] = set()


class Hold(qwit.Step, name="cli_rd.hold"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"held": True}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Charge(qwit.Step, name="cli_rd.charge"):
    """Declined (and the flow aborts, undoing nothing) while the args say so."""

    on_failure = qwit.ABORT
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("decline"):
            raise qwit.StepError("card declined", retry=False)
        return {"charged": args.get("cents", 100)}

    def step_back(self, args: dict[str, Any]) -> None:
        pass


class Receipt(qwit.Step, name="cli_rd.receipt"):
    """A final step: fails while the args say so; takes its time if they say so."""

    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(args.get("receipt_takes", 0))
        if args.get("receipt_fails"):
            raise RuntimeError("the mail server is down")
        return {"mailed": args["qwit_outcome"]}


class Order(qwit.Flow, name="cli_rd.order"):
    def build_flow(self) -> None:
        self.step(Hold)
        self.step(Charge)
        self.finally_step(Receipt)


class Approve(qwit.Step, name="cli_rd.approve"):
    on_failure = qwit.WAIT
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("needs approval", retry=False)


class Approval(qwit.Flow, name="cli_rd.approval"):
    def build_flow(self) -> None:
        self.step(Hold)
        self.step(Approve)


class Refund(qwit.Step, name="cli_rd.refund"):
    """Its undo fails while its ledger is in REFUNDS_DOWN, and stops the rollback."""

    back_on_failure = qwit.ABORT
    back_retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"refundable": True}

    def step_back(self, args: dict[str, Any]) -> None:
        if args["ledger"] in REFUNDS_DOWN:
            raise RuntimeError("the refund service is down")


class Ship(qwit.Step, name="cli_rd.ship"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("no carrier", retry=False)


class Shipment(qwit.Flow, name="cli_rd.shipment"):
    def build_flow(self) -> None:
        self.step(Hold)
        self.step(Refund)
        self.step(Ship)
        self.finally_step(Receipt)


@pytest.fixture
def cli(dev_server: DevServer) -> Any:
    async def call(*args: str) -> Done:
        return await run_qwit(*args, TEMPORAL_ADDRESS=dev_server.address)

    return call


def words(text: str) -> list[str]:
    """The lines of ``text``, each with its runs of spaces made one."""
    return [" ".join(line.split()) for line in text.splitlines()]


def run_of(handle: qwit.FlowHandle) -> str:
    """The run id of the flow's run that ``handle`` was started with."""
    assert isinstance(handle, TemporalFlowHandle) and handle.run_id
    return handle.run_id


async def aborted_order(client: qwit.Client) -> qwit.FlowHandle:
    handle = await client.start(Order, {"decline": True}, id=f"rd-{uuid.uuid4().hex[:8]}")
    with pytest.raises(qwit.FlowAborted):
        await handle.result()
    return handle


async def test_redrive_an_aborted_flow_with_args_and_follow_it(
    client: qwit.Client, worker: Any, cli: Any
):
    async with worker(Order):
        handle = await aborted_order(client)
        first_run = run_of(handle)

        # the final step still runs once the flow has completed: it is followed
        fixed = '{"decline": false, "receipt_takes": 1}'
        done = await cli("redrive", handle.id, "--args", fixed, "--wait")
        assert done.code == 0, done.err
        progress = words(done.err)
        said = next(line for line in progress if line.startswith(f"qwit: flow {handle.id}: "))
        assert said.startswith(f"qwit: flow {handle.id}: redriven as run ")
        assert said.endswith(f"(redrive of run {first_run})")
        new_run = said.split("redriven as run ", 1)[1].split()[0]
        assert new_run != first_run
        # the held step is reused, not run again; the charge and the final step run
        assert "✓ 2 cli_rd.charge done" in progress
        assert "✓ 3 cli_rd.receipt (final) done" in progress
        assert not any("cli_rd.hold" in line for line in progress), progress
        assert f"qwit: flow {handle.id}: completed" in progress
        result = json.loads(done.out)
        assert result["charged"] == 100 and result["held"] is True

        done = await cli("status", handle.id)
        assert done.code == 0, done.err
        table = words(done.out)
        assert f"flow cli_rd.order id {handle.id} status completed" in table
        assert f"redrive of run {first_run}" in table
        assert "1 cli_rd.hold done 1" in table  # reused, with the attempts of the run that did it
        assert "2 cli_rd.charge done 1" in table
        assert "3 cli_rd.receipt (final) done 1" in table

        done = await cli("status", handle.id, "--json")
        assert json.loads(done.out)["redrive_of"] == first_run

        # it has completed: nothing to redrive
        done = await cli("redrive", handle.id)
        assert done.code == 1
        assert (
            done.err.strip() == f"qwit: flow {handle.id!r} completed: there is nothing to redrive"
        )


async def test_redrive_returns_once_started_and_refuses_a_path_that_does_not_exist(
    client: qwit.Client, worker: Any, cli: Any
):
    async with worker(Order):
        handle = await aborted_order(client)

        done = await cli("redrive", handle.id, "--from", "9")
        assert done.code == 1
        assert done.err.strip() == f"qwit: flow {handle.id!r} has no step at path '9'"

        done = await cli("status", handle.id)
        assert "redrive of run" not in done.out  # nothing was redriven
        assert f"flow 'cli_rd.order' aborted (id {handle.id})" in words(done.out)

        # from the first step, without --wait: it returns once the new run started
        done = await cli("redrive", handle.id, "--from", "1")
        assert done.code == 0, done.err
        assert f"qwit: flow {handle.id}: redriven as run " in done.err
        assert done.out == ""
        again = client.get_handle(handle.id)
        with pytest.raises(qwit.FlowAborted):  # still declined: it aborts again
            await again.result()
        state = await again.state()
        assert state.redrive_of == run_of(handle)

        done = await cli("status", handle.id)
        table = words(done.out)
        assert f"redrive of run {run_of(handle)}" in table
        assert "3 cli_rd.receipt (final) done 1" in table


async def test_redrive_refuses_a_running_or_waiting_flow_and_an_unknown_one(
    client: qwit.Client, worker: Any, cli: Any
):
    async with worker(Approval):
        handle = await client.start(Approval, {}, id=f"rd-wait-{uuid.uuid4().hex[:8]}")
        await wait_for_status(handle, "waiting", timeout=20)
        for args in ([], ["--wait"], ["--args", '{"approved": true}']):
            done = await cli("redrive", handle.id, *args)
            assert done.code == 1, done.err
            assert done.err.strip() == (
                f"qwit: flow {handle.id!r} is waiting: only a flow that has ended can be redriven"
            )
        assert (await handle.state()).status == "waiting"
        await handle.cancel()
        with pytest.raises(qwit.FlowCancelled):
            await handle.result()

    done = await cli("redrive", "no-such-flow")
    assert done.code == 1
    assert "no flow with id 'no-such-flow'" in done.err
    assert "Traceback" not in done.err


async def test_redrive_query_redrives_every_aborted_flow_and_reports_the_refused(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    async with worker(Order, Approval):
        aborted = [await aborted_order(client) for _ in range(2)]
        waiting = await client.start(Approval, {}, id=f"rd-wait-{uuid.uuid4().hex[:8]}")
        await wait_for_status(waiting, "waiting", timeout=20)
        query = in_queue(task_queue)
        await visible(temporal_client, query, [h.id for h in [*aborted, waiting]])
        only_aborted = in_queue(task_queue, "QwitStatus = 'aborted'")
        await visible(temporal_client, only_aborted, [h.id for h in aborted])

        done = await cli("redrive", "--query", only_aborted, "--dry-run")
        assert done.code == 0, done.err
        assert set(done.out.split()) == {h.id for h in aborted}
        assert "dry run: redrive would act on these 2 flows; nothing done" in done.err

        done = await cli("redrive", "--query", query, "--args", '{"decline": false}', "--yes")
        assert done.code == 1, done.err
        assert "redrive: 2 done, 1 refused (of 3 flows)" in done.err
        assert (
            f"refused: flow {waiting.id!r} is waiting: only a flow that has ended can be redriven"
        ) in done.err
        for handle in aborted:
            assert f"qwit: flow {handle.id}: redriven as run " in done.err
            result = await client.get_handle(handle.id).result()
            assert result["charged"] == 100
            assert (await client.get_handle(handle.id).state()).redrive_of == run_of(handle)
        assert done.out == ""
        await waiting.cancel()
        with pytest.raises(qwit.FlowCancelled):
            await waiting.result()


async def test_list_and_query_match_only_the_latest_run_of_a_redriven_flow(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    """A redrive is a new run of the same flow id: qwit list shows the flow
    once, as its latest run, and neither --status nor --query match the runs
    before it."""
    async with worker(Order):
        redriven, aborted = await aborted_order(client), await aborted_order(client)
        await (await client.redrive(redriven.id, args={"decline": False})).result()
        ids = {redriven.id, aborted.id}
        # visibility lags: wait until every run shows as it ended
        wanted = ["aborted", "aborted", "completed"]
        for _ in range(150):
            runs = [wf async for wf in temporal_client.list_workflows(in_queue(task_queue))]
            statuses = sorted(
                row_status(wf.status, wf.typed_search_attributes.get(QWIT_STATUS)) for wf in runs
            )
            if statuses == wanted:
                break
            await asyncio.sleep(0.2)
        assert statuses == wanted

        done = await cli("list", "--json", "--limit", "1000", "--flow", "cli_rd.order")
        assert done.code == 0, done.err
        rows = [(r["flow_id"], r["status"]) for r in json.loads(done.out) if r["flow_id"] in ids]
        assert sorted(rows) == sorted([(redriven.id, "completed"), (aborted.id, "aborted")])
        done = await cli("list", "--json", "--limit", "1000", "--status", "aborted")
        assert done.code == 0, done.err
        listed = {r["flow_id"] for r in json.loads(done.out)}
        assert aborted.id in listed and redriven.id not in listed

        query = in_queue(task_queue, "QwitStatus = 'aborted'")
        done = await cli("redrive", "--query", query, "--dry-run")
        assert done.code == 0, done.err
        assert done.out.split() == [aborted.id]


async def test_status_of_a_stopped_rollback_then_redrive_finishes_it(
    client: qwit.Client, worker: Any, cli: Any
):
    ledger = uuid.uuid4().hex
    REFUNDS_DOWN.add(ledger)
    try:
        async with worker(Shipment):
            handle = await client.start(
                Shipment, {"ledger": ledger, "receipt_fails": True}, id=f"rd-ship-{ledger[:8]}"
            )
            with pytest.raises(qwit.CompensationFailed) as failed:
                await handle.result()
            assert failed.value.not_compensated == ["cli_rd.hold"]

            done = await cli("status", handle.id)
            assert done.code == 0, done.err
            table = words(done.out)
            assert f"flow cli_rd.shipment id {handle.id} status compensation failed" in table
            assert "4 cli_rd.receipt (final) failed 1 RuntimeError: the mail server is down" in (
                table
            )
            assert f"flow 'cli_rd.shipment' compensation failed (id {handle.id})" in table
            assert "could not undo: cli_rd.refund (undo these by hand)" in table
            assert (
                "left as they were: cli_rd.hold (the rollback stopped at the undo that failed)"
                in table
            )
            assert (
                "final step 4 'cli_rd.receipt' failed: RuntimeError: the mail server is down"
                in table
            )

            # the refund service is back: a redrive finishes the rollback
            REFUNDS_DOWN.discard(ledger)
            done = await cli("redrive", handle.id, "--wait")
            assert done.code == 1, done.err
            story = words(done.err)
            assert f"flow 'cli_rd.shipment' rolled back (id {handle.id})" in story
            assert f"redrive of run {run_of(handle)}" in story
            assert "undone, newest first: cli_rd.refund, cli_rd.hold" in story
            assert "↺ 1 cli_rd.hold compensated" in story
            assert (
                "final step 4 'cli_rd.receipt' failed: RuntimeError: the mail server is down"
                in story
            )
            assert done.out == ""
    finally:
        REFUNDS_DOWN.discard(ledger)


def test_usage_errors_exit_2():
    for args, message in [
        (["redrive"], "Missing argument 'FLOW_ID' (or --query QUERY)"),
        (["redrive", "--query", "Q", "f-1"], "--query goes in place of FLOW_ID"),
        (["redrive", "--query", "Q", "--wait"], "--wait follows one flow"),
        (["redrive", "f-1", "--args", "[]"], "must be a JSON object"),
        (["redrive", "f-1", "--dry-run"], "--dry-run goes only with --query"),
        (["redrive", "f-1", "f-2"], "unexpected extra argument (f-2)"),
    ]:
        result = CliRunner().invoke(cli_group, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_args_is_the_option_react_has():
    def args_of(command: Any) -> Any:
        return next(p for p in command.params if p.name == "args")

    assert args_of(_ops.redrive).callback.__qualname__ == args_of(_ops.react).callback.__qualname__


def test_the_options_reach_the_bulk_machinery(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[Bulk, str]] = []

    async def fake_run_bulk(
        address: Any, namespace: Any, bulk: Bulk, what: str, make_action: Any
    ) -> int:
        calls.append((bulk, what))
        return 0

    monkeypatch.setattr(_ops, "run_bulk", fake_run_bulk)
    runner = CliRunner()
    result = runner.invoke(cli_group, ["redrive", "--query", "Q", "--yes", "--rate", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_group, ["redrive", "--query", "Q", "--from", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert calls == [
        (Bulk("Q", yes=True, rate=2.0), "redrive"),
        (Bulk("Q", dry_run=True, rate=DEFAULT_RATE), "redrive --from 2"),
    ]


# -- how final steps and stopped rollbacks read, from a state alone ------------


def rendered(state: qwit.FlowState) -> list[str]:
    out = StringIO()
    Console(file=out, width=200).print(state_view(state))
    return words(out.getvalue())


def event(seq: int, kind: Literal["flow", "step"], path: str, name: str, status: str) -> FlowEvent:
    return FlowEvent(seq=seq, kind=kind, path=path, name=name, status=status)


def test_final_steps_are_told_by_what_they_did():
    mail_down = ErrorInfo(type="builtins.RuntimeError", message="the mail server is down")
    steps = [
        qwit.StepState(name="cli_rd.hold", path="1", status="done", attempts=1),
        qwit.StepState(name="cli_rd.charge", path="2", status="done", attempts=1),
        qwit.StepState(
            name="cli_rd.receipt", path="3", status="failed", attempts=1, error=mail_down
        ),
    ]
    events = [
        event(1, "flow", "", "cli_rd.order", "running"),
        event(2, "step", "1", "cli_rd.hold", "running"),
        event(3, "step", "1", "cli_rd.hold", "done"),
        event(4, "step", "2", "cli_rd.charge", "running"),
        event(5, "step", "2", "cli_rd.charge", "done"),
        event(6, "flow", "", "cli_rd.order", "completed"),
        event(7, "step", "3", "cli_rd.receipt", "running"),
        event(8, "step", "3", "cli_rd.receipt", "failed"),
    ]
    state = qwit.FlowState(
        flow="cli_rd.order", flow_id="o-1", status="completed", steps=steps, events=events
    )
    assert final_paths(state) == {"3"}
    table = rendered(state)
    assert "2 cli_rd.charge done 1" in table
    assert "3 cli_rd.receipt (final) failed 1 RuntimeError: the mail server is down" in table
    assert "flow 'cli_rd.order' completed (id o-1); final steps change no outcome" in table
    assert "final step 3 'cli_rd.receipt' failed: RuntimeError: the mail server is down" in table
    assert not any("redrive of run" in line for line in table)

    # before the flow has ended, a final step is not told from a step not reached
    running = state.model_copy(
        update={"status": "running", "events": events[:4], "steps": steps[:1]}
    )
    assert final_paths(running) == frozenset()
    # the plan, when at hand, names them all, its sub-flows' too
    assert plan_final_paths(compile_flow(Order)) == {"3"}


def test_a_stopped_rollback_and_a_redrive_in_the_failure_story():
    info = FailureInfo(
        kind="compensation_failed",
        flow_id="s-1",
        step="cli_rd.ship",
        reason="StepError: no carrier",
        compensated=["cli_rd.ship"],
        failed_compensations=["cli_rd.refund"],
        compensations=[
            Compensation(name="cli_rd.ship", path="3", status="compensated"),
            Compensation(name="cli_rd.refund", path="2", status="compensation_failed"),
        ],
        not_compensated=["cli_rd.hold"],
        final_failures=[Compensation(name="cli_rd.receipt", path="4", status="failed")],
    )
    failed = qwit.FlowFailed.from_info(info)
    lines = [line.plain for line in failure_lines(failed, "cli_rd.shipment", redrive_of="run-0")]
    assert lines == [
        "flow 'cli_rd.shipment' compensation failed (id s-1)",
        "  redrive of run run-0",
        "  failed step: 'cli_rd.ship'",
        "  reason: StepError: no carrier",
        "  undone, newest first: cli_rd.ship",
        "  could not undo: cli_rd.refund (undo these by hand)",
        "  left as they were: cli_rd.hold (the rollback stopped at the undo that failed)",
        "  final step 4 'cli_rd.receipt' failed",
    ]
    state = qwit.FlowState(
        flow="cli_rd.shipment",
        flow_id="s-1",
        status="compensation_failed",
        steps=[qwit.StepState(name="cli_rd.receipt", path="4", status="failed")],
        failure=info,
        redrive_of="run-0",
    )
    table = rendered(state)
    assert table[:2] == [
        "flow cli_rd.shipment id s-1 status compensation failed",
        "redrive of run run-0",
    ]
    assert "4 cli_rd.receipt (final) failed 0" in table
