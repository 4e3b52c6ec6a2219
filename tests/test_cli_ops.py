"""`qwit status`, `qwit react`, `qwit cancel` and `qwit list` on a real dev server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from io import StringIO
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

import qwit
from qwit._cli import cli as cli_group
from qwit._cli._render import state_view
from qwit._errors import ErrorInfo
from qwit.temporal import DevServer
from qwit.testing import wait_for_status
from samples.approval.flows import ExpenseClaim
from tests.cli_flows import Outer
from tests.clirun import Done
from tests.clirun import qwit as run_qwit

BIG_CLAIM = {"employee": "ann", "cents": 25000}


@pytest.fixture
def cli(dev_server: DevServer) -> Any:
    async def call(*args: str) -> Done:
        return await run_qwit(*args, TEMPORAL_ADDRESS=dev_server.address)

    return call


async def waiting_claim(client: qwit.Client) -> qwit.FlowHandle:
    handle = await client.start(ExpenseClaim, BIG_CLAIM, id=f"claim-{uuid.uuid4().hex[:8]}")
    await wait_for_status(handle, "waiting", 20)
    return handle


async def listed(cli: Any, *args: str, flow_id: str, status: str) -> list[dict[str, Any]]:
    """`qwit list --json ARGS`, once visibility shows ``flow_id`` with ``status``."""
    deadline = time.monotonic() + 20
    while True:
        done = await cli("list", "--json", *args)
        assert done.code == 0, done.err
        rows = json.loads(done.out)
        if any(r["flow_id"] == flow_id and r["status"] == status for r in rows):
            return rows
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.3)


class ClaimInside(qwit.Flow, name="cli.claim_inside"):
    """A flow whose sub-flow waits for an operator: it waits too."""

    def build_flow(self) -> None:
        self.step(ExpenseClaim)


async def test_a_flow_whose_sub_flow_waits_is_listed_as_waiting(
    client: qwit.Client, worker: Any, cli
):
    async with worker(ClaimInside):
        handle = await client.start(ClaimInside, BIG_CLAIM, id=f"inside-{uuid.uuid4().hex[:8]}")
        await wait_for_status(handle, "waiting", 20)
        rows = await listed(cli, "--status", "waiting", flow_id=handle.id, status="waiting")
        running = await cli("list", "--json", "--status", "running")
        await handle.cancel()
    assert not [r for r in rows if r["flow_id"].startswith(f"{handle.id}/")]  # roots only
    assert next(r for r in rows if r["flow_id"] == handle.id)["flow"] == "cli.claim_inside"
    assert handle.id not in [r["flow_id"] for r in json.loads(running.out)]


async def test_status_of_a_waiting_flow_then_approve_it(client: qwit.Client, worker: Any, cli):
    async with worker(ExpenseClaim):
        handle = await waiting_claim(client)
        done = await cli("status", handle.id)
        assert done.code == 0, done.err
        table = [" ".join(line.split()) for line in done.out.splitlines()]
        assert f"flow expenses.claim id {handle.id} status waiting" in table
        assert "path step status attempts error" in table
        assert "1 expenses.submit done 1" in table
        assert (
            "2 expenses.approve failed 1 StepError: claim-ann-25000: 250.00 needs a manager's "
            "approval" in table
        )
        assert "3 expenses.pay pending 0" in table
        assert f"qwit react {handle.id} retry [--args JSON]" in table
        assert f"qwit react {handle.id} rollback" in table
        assert "a rollback would undo, newest first, with these args:" in table
        assert any(line.startswith("1 expenses.submit {") for line in table)

        done = await cli("status", handle.id, "--json")
        assert done.code == 0, done.err
        state = json.loads(done.out)
        assert state["status"] == "waiting"
        assert [s["status"] for s in state["steps"]] == ["done", "failed", "pending"]
        assert state["waiting"]["step"] == "expenses.approve"

        rows = await listed(cli, "--status", "waiting", flow_id=handle.id, status="waiting")
        assert all(r["status"] == "waiting" for r in rows)
        assert {"flow": "expenses.claim", "status": "waiting"}.items() <= next(
            r for r in rows if r["flow_id"] == handle.id
        ).items()

        # a usage error: args go with retry only
        done = await cli("react", handle.id, "rollback", "--args", '{"approved": true}')
        assert done.code == 2
        assert "--args goes only with retry" in done.err

        done = await cli("react", handle.id, "RETRY", "--args", '{"approved": true}')
        assert done.code == 0, done.err
        assert f"flow {handle.id}: retry accepted" in done.err
        result = await handle.result()
        assert result["approved_by"] == "manager" and result["paid"] == 25000

        # the flow is no longer waiting: the request fails
        done = await cli("react", handle.id, "retry")
        assert done.code == 1
        assert f"flow '{handle.id}' is not waiting (it is completed)" in done.err

        done = await cli("status", handle.id)
        assert done.code == 0, done.err
        assert f"flow expenses.claim id {handle.id} status completed" in " ".join(done.out.split())
        await listed(cli, "--flow", "expenses.claim", flow_id=handle.id, status="completed")


async def test_reject_with_rollback_and_follow_it(client: qwit.Client, worker: Any, cli):
    async with worker(ExpenseClaim):
        handle = await waiting_claim(client)
        done = await cli("react", handle.id, "rollback", "--wait")
        assert done.code == 1, done.err
        assert done.out == ""
        progress = [" ".join(line.split()) for line in done.err.splitlines()]
        assert "↺ 1 expenses.submit compensated" in progress
        assert f"flow 'expenses.claim' rolled back (id {handle.id})" in progress
        assert "undone, newest first: expenses.approve, expenses.submit" in progress
        # only what happened after the decision is shown
        assert not any("started" in line for line in progress)
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
        await listed(cli, "--status", "rolled_back", flow_id=handle.id, status="rolled_back")


async def test_cancel_rolls_the_flow_back(client: qwit.Client, worker: Any, cli):
    async with worker(ExpenseClaim):
        handle = await waiting_claim(client)
        done = await cli("cancel", handle.id)
        assert done.code == 0, done.err
        assert f"flow {handle.id}: cancel requested" in done.err
        with pytest.raises(qwit.FlowCancelled) as cancelled:
            await handle.result()
        assert cancelled.value.compensated == ["expenses.approve", "expenses.submit"]

        done = await cli("cancel", handle.id)
        assert done.code == 1
        assert f"flow '{handle.id}' has already ended (cancelled)" in done.err
        await listed(cli, "--status", "cancelled", flow_id=handle.id, status="cancelled")


async def test_requests_about_an_unknown_flow_fail_with_1(cli):
    for args in (["status", "no-such-flow"], ["cancel", "no-such-flow"],
                 ["react", "no-such-flow", "retry"]):  # fmt: skip
        done = await cli(*args)
        assert done.code == 1, (args, done.err)
        assert "no flow with id 'no-such-flow'" in done.err
        assert "Traceback" not in done.err, (args, done.err)


def test_usage_errors_exit_2():
    for args, message in [
        (["react", "f-1", "wait"], "'wait' is not one of 'retry', 'skip', 'skipback'"),
        (["react", "f-1", "skip", "--args", '{"a": 1}'], "--args goes only with retry"),
        (["react", "f-1", "retry", "--args", "[]"], "must be a JSON object"),
        (["list", "--status", "sleeping"], "'sleeping' is not one of 'running'"),
        (["list", "--limit", "0"], "0 is not in the range"),
        (["status"], "Missing argument 'FLOW_ID'"),
        (["worker"], "Missing argument 'MODULES...'"),
        (["worker", "tests.empty_module"], "nothing to serve"),
    ]:
        result = CliRunner().invoke(cli_group, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


async def test_status_shows_sub_flows_indented_and_list_a_table(
    client: qwit.Client, worker: Any, cli
):
    async with worker(Outer):
        handle = await client.start(Outer, {}, id=f"outer-{uuid.uuid4().hex[:8]}")
        await wait_for_status(handle, "waiting", 20)
        done = await cli("status", handle.id)
        assert done.code == 0, done.err
        table = done.out.splitlines()
        assert [line.split()[:3] for line in table[2:7]] == [
            ["1", "t.reserve", "done"],
            ["2", "t.inner", "(sub-flow)"],
            ["2.1", "t.pack", "done"],
            ["2.2", "t.notify", "done"],
            ["3", "t.approve", "failed"],
        ]
        # a sub-flow's steps are indented under it
        assert table[4].index("t.pack") == table[3].index("t.inner") + 2
        await listed(cli, flow_id=handle.id, status="waiting")
        done = await cli("list", "--flow", "t.outer", "--limit", "3")
        assert done.code == 0, done.err
        assert done.out.split()[:5] == ["flow", "id", "flow", "status", "started"]
        assert handle.id in done.out and "waiting" in done.out
        await handle.cancel()
        # ended before its worker stops: a flow cut off mid-run lingers in the worker's cache
        with pytest.raises(qwit.FlowCancelled):
            await handle.result()


def test_status_tells_a_step_being_retried_from_its_state():
    # On Temporal the state counts an attempt in flight's failed predecessors
    # and names the last one's error (its words as Temporal has them).
    last = ErrorInfo(type="builtins.ConnectionError", message="ConnectionError: try 2 refused")
    state = qwit.FlowState(
        flow="t.retried",
        flow_id="r-1",
        status="running",
        steps=[
            qwit.StepState(name="t.reserve", path="1", status="done", attempts=1),
            qwit.StepState(name="t.flaky", path="2", status="running", attempts=2, error=last),
        ],
    )
    out = StringIO()
    Console(file=out, width=200).print(state_view(state))
    table = [" ".join(line.split()) for line in out.getvalue().splitlines()]
    assert "1 t.reserve done 1" in table
    assert "2 t.flaky running 3 (retrying) ConnectionError: try 2 refused" in table
