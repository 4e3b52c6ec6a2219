"""`qwit react --query`, `qwit cancel --query` and `qwit cancel --no-rollback`,
on a real dev server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterable
from io import StringIO
from typing import Any

import pytest
import temporalio.client
from click.testing import CliRunner
from rich.console import Console

import qwit
from qwit._cli import _ops
from qwit._cli import cli as cli_group
from qwit._cli._bulk import (
    DEFAULT_RATE,
    Bulk,
    Pacer,
    act_on_flows,
    act_on_query,
    find_targets,
)
from qwit._errors import FlowNotAnswering
from qwit.temporal import DevServer
from qwit.testing import wait_for_status
from samples.approval.flows import ExpenseClaim
from tests.cli_flows import Outer
from tests.clirun import QWIT, ROOT, Done, cli_env
from tests.clirun import qwit as run_qwit

BIG_CLAIM = {"employee": "bob", "cents": 25000}
SMALL_CLAIM = {"employee": "bob", "cents": 500}


@pytest.fixture
def cli(dev_server: DevServer) -> Any:
    async def call(*args: str) -> Done:
        return await run_qwit(*args, TEMPORAL_ADDRESS=dev_server.address)

    return call


def in_queue(task_queue: str, *clauses: str) -> str:
    """A visibility query for this test's flows alone (each test has its own queue)."""
    return " AND ".join([f"TaskQueue = '{task_queue}'", *clauses])


async def waiting_claims(client: qwit.Client, count: int) -> list[qwit.FlowHandle]:
    handles = [
        await client.start(ExpenseClaim, BIG_CLAIM, id=f"bulk-{uuid.uuid4().hex[:8]}")
        for _ in range(count)
    ]
    for handle in handles:
        await wait_for_status(handle, "waiting", timeout=20)
    return handles


async def visible(
    temporal: temporalio.client.Client, query: str, ids: Iterable[str], timeout: float = 30
) -> None:
    """Wait until the root flows ``query`` finds are exactly ``ids``
    (visibility is eventually consistent)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        found = {target.flow_id for target in await find_targets(temporal, query)}
        if found == wanted:
            return
        assert time.monotonic() < deadline, f"visibility shows {found}, not {wanted}"
        await asyncio.sleep(0.2)


async def end_all(handles: Iterable[qwit.FlowHandle]) -> None:
    """End the flows still running before their worker stops."""
    for handle in handles:
        state = await handle.state()
        if state.status in ("running", "waiting", "compensating"):
            await handle.cancel()
        with contextlib.suppress(qwit.FlowFailed):
            await handle.result()


async def test_dry_run_lists_root_flows_and_touches_nothing(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    async with worker(ExpenseClaim, Outer):
        claims = await waiting_claims(client, 2)
        outer = await client.start(Outer, {}, id=f"bulk-outer-{uuid.uuid4().hex[:8]}")
        await wait_for_status(outer, "waiting", timeout=20)
        roots = {h.id for h in [*claims, outer]}
        query = in_queue(task_queue)
        # the sub-flow is in the query's reach too: only its flow is acted on
        deadline = time.monotonic() + 30
        while True:
            everything = {wf.id async for wf in temporal_client.list_workflows(query)}
            if len(everything) == 4:
                break
            assert time.monotonic() < deadline, everything
            await asyncio.sleep(0.2)
        assert everything - roots == {f"{outer.id}/~2"}
        await visible(temporal_client, query, roots)

        for args in (
            ["react", "--query", query, "rollback"],
            ["cancel", "--query", query, "--no-rollback"],
        ):
            done = await cli(*args, "--dry-run")
            assert done.code == 0, done.err
            assert set(done.out.split()) == roots
            assert "would act on these 3 flows; nothing done" in done.err
        for handle in [*claims, outer]:
            assert (await handle.state()).status == "waiting"
        await end_all([*claims, outer])


async def test_react_query_decides_every_waiting_flow_and_reports_the_refused(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    async with worker(ExpenseClaim):
        claims = await waiting_claims(client, 3)
        paid = await client.start(ExpenseClaim, SMALL_CLAIM, id=f"bulk-{uuid.uuid4().hex[:8]}")
        assert (await paid.result())["approved_by"] == "policy"
        query = in_queue(task_queue)
        await visible(temporal_client, query, [h.id for h in [*claims, paid]])

        done = await cli("react", "--query", query, "retry", "--args", '{"approved": true}', "-y")
        assert done.code == 1, done.err
        assert "react retry: 3 done, 1 refused (of 4 flows)" in done.err
        assert f"refused: flow '{paid.id}' is not waiting (it is completed)" in done.err
        for handle in claims:
            assert f"flow {handle.id}: retry accepted" in done.err
            result = await handle.result()
            assert result["approved_by"] == "manager" and result["paid"] == 25000
        assert done.out == ""


async def test_react_query_on_waiting_flows_only_exits_0(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    async with worker(ExpenseClaim):
        claims = await waiting_claims(client, 2)
        paid = await client.start(ExpenseClaim, SMALL_CLAIM, id=f"bulk-{uuid.uuid4().hex[:8]}")
        await paid.result()
        query = in_queue(task_queue, "QwitStatus = 'waiting'", "QwitFlow = 'expenses.claim'")
        await visible(temporal_client, query, [h.id for h in claims])

        done = await cli("react", "--query", query, "rollback", "--yes")
        assert done.code == 0, done.err
        assert "react rollback: 2 done, 0 refused (of 2 flows)" in done.err
        for handle in claims:
            with pytest.raises(qwit.FlowRolledBack) as info:
                await handle.result()
            assert info.value.compensated == ["expenses.approve", "expenses.submit"]

        done = await cli("react", "--query", in_queue(task_queue, "QwitFlow = 'no.such'"), "skip")
        assert done.code == 0, done.err
        assert "no flow matches the query: nothing done" in done.err


async def test_cancel_query_without_rollback(
    client: qwit.Client, worker: Any, cli: Any, task_queue: str, temporal_client: Any
):
    async with worker(ExpenseClaim):
        claims = await waiting_claims(client, 2)
        query = in_queue(task_queue, "QwitStatus = 'waiting'")
        await visible(temporal_client, query, [h.id for h in claims])

        done = await cli("cancel", "--query", query, "--no-rollback", "--yes", "--rate", "50")
        assert done.code == 0, done.err
        assert "cancel --no-rollback: 2 done, 0 refused (of 2 flows)" in done.err
        for handle in claims:
            with pytest.raises(qwit.FlowCancelled) as info:
                await handle.result()
            assert info.value.rolled_back is False
            assert info.value.compensated == []

        # They have ended: a cancel is refused, each with why.
        everyone = in_queue(task_queue)
        await visible(temporal_client, everyone, [h.id for h in claims])
        done = await cli("cancel", "--query", everyone, "--yes")
        assert done.code == 1, done.err
        assert "cancel: 0 done, 2 refused (of 2 flows)" in done.err
        for handle in claims:
            assert f"refused: flow '{handle.id}' has already ended (cancelled)" in done.err


async def test_cancel_one_flow_without_rollback_and_follow_it(
    client: qwit.Client, worker: Any, cli: Any
):
    async with worker(ExpenseClaim):
        [handle] = await waiting_claims(client, 1)
        done = await cli("cancel", handle.id, "--no-rollback", "--wait")
        assert done.code == 1, done.err
        assert f"flow {handle.id}: cancel requested without rollback" in done.err
        story = [" ".join(line.split()) for line in done.err.splitlines()]
        assert f"flow 'expenses.claim' cancelled (id {handle.id})" in story
        assert "cancelled without rollback: nothing was undone" in story
        assert not any("compensat" in line for line in story), story
        with pytest.raises(qwit.FlowCancelled) as info:
            await handle.result()
        assert info.value.rolled_back is False


async def with_terminal(answer: str, *args: str, address: str) -> Done:
    """``qwit ARGS...`` with a terminal for stdin, on which ``answer`` is typed."""
    import pty

    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode() + b"\n")  # read when the prompt comes
        proc = await asyncio.create_subprocess_exec(
            *QWIT,
            *args,
            cwd=ROOT,
            env=cli_env(TEMPORAL_ADDRESS=address),
            stdin=terminal,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(terminal)
        terminal = -1
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
async def test_it_asks_first_unless_yes(
    client: qwit.Client,
    worker: Any,
    cli: Any,
    task_queue: str,
    temporal_client: Any,
    dev_server: DevServer,
):
    async with worker(ExpenseClaim):
        claims = await waiting_claims(client, 2)
        query = in_queue(task_queue)
        await visible(temporal_client, query, [h.id for h in claims])

        # no terminal to ask on (stdin is /dev/null): nothing done
        done = await cli("react", "--query", query, "rollback")
        assert done.code == 1, done.err
        assert "2 flows match the query:" in done.err
        assert "nothing done: no terminal to ask on; pass --yes to act on these 2 flows" in (
            done.err
        )

        # asked on a terminal, the operator says no: nothing done
        done = await with_terminal("n", "react", "--query", query, "rollback",
                                   address=dev_server.address)  # fmt: skip
        assert done.code == 1, done.err
        assert "react rollback: act on these 2 flows, at most 10 a second? [y/N]" in done.err
        for handle in claims:
            assert f"  {handle.id}  expenses.claim  waiting" in done.err
        assert "qwit: nothing done" in done.err
        for handle in claims:
            assert (await handle.state()).status == "waiting"

        # and yes: done
        done = await with_terminal("y", "react", "--query", query, "rollback",
                                   address=dev_server.address)  # fmt: skip
        assert done.code == 0, done.err
        assert "react rollback: 2 done, 0 refused (of 2 flows)" in done.err
        for handle in claims:
            with pytest.raises(qwit.FlowRolledBack):
                await handle.result()


class FakeTime:
    """A clock that moves only when slept on, or when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(
    ("rate", "takes", "starts", "sleeps"),
    [
        # quick operations are spaced 1/rate apart
        (2.0, 0.0, [0.0, 0.5, 1.0, 1.5, 2.0], [0.5] * 4),
        # the pause makes up the rest of 1/rate
        (2.0, 0.2, [0.0, 0.5, 1.0, 1.5, 2.0], [0.3] * 4),
        # slower than the rate: no pause, and no burst to catch up
        (2.0, 0.8, [0.0, 0.8, 1.6, 2.4, 3.2], []),
        (0.5, 0.0, [0.0, 2.0, 4.0, 6.0, 8.0], [2.0] * 4),
    ],
)
async def test_the_rate_spaces_operations(
    rate: float, takes: float, starts: list[float], sleeps: list[float]
):
    fake = FakeTime()
    started: list[float] = []

    async def action(flow_id: str) -> str:
        started.append(fake.now)
        fake.now += takes
        return "ok"

    ids = [f"f-{i}" for i in range(5)]
    said: list[str] = []
    report = await act_on_flows(
        ids, action, pacer=Pacer(rate, fake.clock, fake.sleep), say=said.append
    )
    assert report.done == ids and report.exit_code == 0
    assert started == pytest.approx(starts)
    assert fake.sleeps == pytest.approx(sleeps)
    # never more than `rate` starts in any second
    for t in started:
        assert sum(t <= s < t + 1 for s in started) <= max(1, rate)
    assert said == [f"flow {i}: ok" for i in ids]


async def test_refusals_are_reported_and_the_others_go_on():
    fake = FakeTime()

    async def action(flow_id: str) -> str | None:
        if flow_id == "f-1":
            raise qwit.ReactionError("flow 'f-1' is not waiting (it is completed)")
        if flow_id == "f-2":
            raise qwit.EngineUnavailable("Temporal at 127.0.0.1:1 does not answer")
        return None

    said: list[str] = []
    ids = [f"f-{i}" for i in range(5)]
    report = await act_on_flows(ids, action, pacer=Pacer(100, fake.clock, fake.sleep),
                                say=said.append)  # fmt: skip
    assert report.done == ["f-0"]
    assert report.refused == {
        "f-1": "flow 'f-1' is not waiting (it is completed)",
        "f-2": "flow 'f-2': Temporal at 127.0.0.1:1 does not answer",
    }
    # Temporal can't be reached: the rest are left alone
    assert report.not_attempted == ["f-3", "f-4"]
    assert report.exit_code == 1
    assert "stopping: 2 flows not attempted" in said


async def test_act_on_query_paces_asks_and_acts(
    client: qwit.Client, worker: Any, task_queue: str, temporal_client: Any
):
    async with worker(ExpenseClaim):
        claims = await waiting_claims(client, 3)
        query = in_queue(task_queue, "QwitStatus = 'waiting'")
        ids = [h.id for h in claims]
        await visible(temporal_client, query, ids)
        acted: list[str] = []
        questions: list[str] = []

        async def decide(flow_id: str) -> str:
            acted.append(flow_id)
            await client.get_handle(flow_id).react(qwit.SKIP)
            return "skip accepted"

        def no(question: str) -> bool:
            questions.append(question)
            return False

        fake = FakeTime()
        out = StringIO()
        err = Console(file=out, width=200)
        bulk = Bulk(query, rate=4)
        options = {"err": err, "clock": fake.clock, "sleep": fake.sleep}
        assert await act_on_query(temporal_client, bulk, "react skip", decide, ask=no,
                                  **options) == 1  # fmt: skip
        assert questions == ["react skip: act on these 3 flows, at most 4 a second?"]
        assert acted == [] and fake.sleeps == []

        code = await act_on_query(temporal_client, bulk, "react skip", decide,
                                  ask=lambda q: True, **options)  # fmt: skip
        assert code == 0, out.getvalue()
        assert sorted(acted) == sorted(ids)
        assert fake.sleeps == [0.25, 0.25]  # three operations at 4 a second
        for handle in claims:
            assert (await handle.result())["paid"] == 25000
        assert "react skip: 3 done, 0 refused (of 3 flows)" in out.getvalue()


def test_the_options_reach_the_bulk_machinery(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[Bulk, str]] = []

    async def fake_run_bulk(
        address: Any, namespace: Any, bulk: Bulk, what: str, make_action: Any
    ) -> int:
        calls.append((bulk, what))
        return 0

    monkeypatch.setattr(_ops, "run_bulk", fake_run_bulk)
    runner = CliRunner()
    result = runner.invoke(cli_group, ["cancel", "--query", "Q", "--no-rollback", "--rate", "2.5"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_group, ["react", "--query", "Q", "RETRY", "--args", "{}", "-y"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_group, ["react", "--query", "Q", "abort", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert calls == [
        (Bulk("Q", rate=2.5), "cancel --no-rollback"),
        (Bulk("Q", yes=True, rate=DEFAULT_RATE), "react retry"),
        (Bulk("Q", dry_run=True), "react abort"),
    ]


def test_usage_errors_exit_2():
    for args, message in [
        (["react", "--query", "Q", "f-1", "retry"], "--query goes in place of FLOW_ID"),
        (["cancel", "--query", "Q", "f-1"], "--query goes in place of FLOW_ID"),
        (["cancel"], "Missing argument 'FLOW_ID' (or --query QUERY)"),
        (["react", "--query", "Q"], "Missing argument 'REACTION'"),
        (["react", "retry"], "Missing argument 'FLOW_ID' (or --query QUERY)"),
        (["react", "f-1", "f-2", "retry"], "unexpected extra argument (f-2)"),
        (["react", "--query", "Q", "wait"], "'wait' is not one of 'retry', 'skip'"),
        (["react", "--query", "Q", "skip", "--args", '{"a": 1}'], "--args goes only with retry"),
        (["react", "--query", "Q", "retry", "--wait"], "--wait follows one flow"),
        (["cancel", "--query", "  "], "Invalid value for --query: is empty"),
        (["cancel", "f-1", "--dry-run"], "--dry-run goes only with --query"),
        (["cancel", "f-1", "--yes", "--rate", "5"], "--yes, --rate go only with --query"),
        (["cancel", "--query", "Q", "--rate", "0"], "0.0 is not in the range x>0"),
    ]:
        result = CliRunner().invoke(cli_group, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


async def test_a_query_temporal_refuses_is_a_usage_error(cli: Any):
    done = await cli("cancel", "--query", "NoSuchAttribute = 'x'", "--dry-run")
    assert done.code == 2, done.err
    assert "Invalid value for --query" in done.err
    assert "Traceback" not in done.err


async def test_a_flow_no_worker_answers_is_refused_and_the_others_go_on():
    fake = FakeTime()

    async def action(flow_id: str) -> str | None:
        if flow_id == "f-1":
            raise FlowNotAnswering(
                "flow 'f-1' did not answer its state query: is a worker serving its task queue 'q'?"
            )
        return None

    said: list[str] = []
    ids = [f"f-{i}" for i in range(3)]
    report = await act_on_flows(ids, action, pacer=Pacer(100, fake.clock, fake.sleep),
                                say=said.append)  # fmt: skip
    assert report.done == ["f-0", "f-2"]
    assert "is a worker serving its task queue 'q'?" in report.refused["f-1"]
    assert report.not_attempted == []


async def test_a_state_query_no_worker_answers_names_the_task_queue(
    client: qwit.Client, worker: Any, monkeypatch: pytest.MonkeyPatch
):
    # Temporal answers (it describes the flow) but the query times out: not
    # "Temporal can't be reached", which would stop a --query run.
    from temporalio.service import RPCError, RPCStatusCode

    async with worker(ExpenseClaim):
        [claim] = await waiting_claims(client, 1)

        for status, message in (
            (RPCStatusCode.CANCELLED, "Timeout expired"),
            (RPCStatusCode.FAILED_PRECONDITION, "no poller seen for task queue recently"),
        ):

            async def unanswered(*args: Any, **kwargs: Any) -> Any:
                raise RPCError(message, status, b"")  # noqa: B023

            with monkeypatch.context() as patched:
                patched.setattr(temporalio.client.WorkflowHandle, "query", unanswered)
                with pytest.raises(FlowNotAnswering, match=f"task queue '{client.task_queue}'"):
                    await claim.state()
                with pytest.raises(qwit.ReactionError, match="is running: only a flow that has"):
                    await client.redrive(claim.id)
        await end_all([claim])
