"""Failure reactions, operator decisions and state (CONTRACT sections 4-5),
against a real Temporal dev server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

import qwit
import qwit.testing
from qwit.testing import wait_for_status
from tests import ledger
from tests.ledger import Effect

ALLOWED: set[str] = set()  # runs whose operator has "fixed the cause"


def new_ledger() -> str:
    return uuid.uuid4().hex


class A(Effect, name="react.A"):
    pass


class C(Effect, name="react.C"):
    pass


class F(Effect, name="react.F"):
    """Fails after applying its effect (so ROLLBACK and SKIPBACK differ)."""


def failing_flow(reaction: Any) -> type[qwit.Flow]:
    class Reacting(qwit.Flow, name=f"react.{reaction}"):
        def build_flow(self) -> None:
            self.step(A)
            self.step(F, on_failure=reaction)
            self.step(C)

    return Reacting


FAIL_F = {"fail": "react.F", "fail_after": True}


async def test_rollback_undoes_the_failed_step_too(client, worker):
    run = new_ledger()
    flow = failing_flow(qwit.ROLLBACK)
    async with worker(flow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(flow, {"ledger": run, **FAIL_F})
    assert info.value.compensated == ["react.F", "react.A"]
    assert ledger.undone(run) == ["react.F", "react.A"]


async def test_skipback_undoes_the_completed_steps_not_the_failed_one(client, worker):
    run = new_ledger()
    flow = failing_flow(qwit.SKIPBACK)
    async with worker(flow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(flow, {"ledger": run, **FAIL_F})
        state = await client.get_handle(info.value.flow_id).state()
    assert info.value.compensated == ["react.A"]
    assert ledger.undone(run) == ["react.A"]
    assert [s.status for s in state.steps] == ["compensated", "failed", "pending"]


async def test_skip_goes_on_with_the_next_step(client, worker):
    run = new_ledger()
    flow = failing_flow("skip")
    async with worker(flow):
        handle = await client.start(flow, {"ledger": run, **FAIL_F})
        result = await handle.result()
        state = await handle.state()
    assert "out_react.F" not in result
    assert result["out_react.C"] == "-"
    assert ledger.undone(run) == []
    assert state.status == "completed"
    assert [s.status for s in state.steps] == ["done", "skipped", "done"]
    assert state.steps[1].error is not None
    assert state.steps[1].error.message == "react.F failed after its effect"


async def test_abort_stops_and_undoes_nothing(client, worker):
    run = new_ledger()
    flow = failing_flow(qwit.ABORT)
    async with worker(flow):
        with pytest.raises(qwit.FlowAborted) as info:
            await client.run(flow, {"ledger": run, **FAIL_F})
        state = await client.get_handle(info.value.flow_id).state()
    assert info.value.step == "react.F"
    assert ledger.undone(run) == []
    assert ledger.applied(run) == ["react.A", "react.F"]
    assert state.status == "aborted"
    assert [s.status for s in state.steps] == ["done", "failed", "pending"]


class Picky(qwit.Step, name="react.picky"):
    """Raises the exception class named in args['raise']."""

    retry = qwit.Retry(max_attempts=1)
    on_failure = {LookupError: qwit.SKIP, "tests.test_temporal_reactions.Declined": qwit.ABORT}

    async def step_forward(self, args: dict[str, Any]) -> None:
        errors = {"KeyError": KeyError, "ValueError": ValueError, "Declined": Declined}
        raise errors[args["raise"]]("nope")


class Declined(Exception):
    pass


class PickyFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Picky)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [("KeyError", "completed"), ("Declined", "aborted"), ("ValueError", "rolled_back")],
)
async def test_reactions_by_error_class_match_like_except(client, worker, error, outcome):
    run = new_ledger()
    error_type = None
    async with worker(PickyFlow):
        try:
            await client.run(PickyFlow, {"ledger": run, "raise": error})
            got = "completed"
        except qwit.FlowFailed as failed:
            got = failed.kind
            error_type = failed.error_type
    assert got == outcome
    if outcome != "completed":
        assert error_type is not None
        assert error_type.endswith(error)


# -- WAIT -----------------------------------------------------------------------------


class Approval(qwit.Step, name="react.approval"):
    """Fails until the operator allows it, or until args carry approved=True."""

    retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("approved") or args["ledger"] in ALLOWED:
            ledger.record(args["ledger"], "do", "approval")
            return {"approved_by": args.get("approver", "operator")}
        raise PermissionError("not approved yet")

    async def step_back(self, args: dict[str, Any]) -> None:
        if "approval" in ledger.applied(args["ledger"]):
            ledger.record(args["ledger"], "undo", "approval")


class ApprovalFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Approval)
        self.step(C)


async def wait_status(handle: qwit.FlowHandle, status: str, timeout: float = 20) -> qwit.FlowState:
    return await wait_for_status(handle, status, timeout)


async def test_wait_then_retry_succeeds(client, worker):
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        state = await wait_status(handle, "waiting")
        waiting = state.waiting
        assert waiting is not None
        assert waiting.step == "react.approval"
        assert waiting.path == "2"
        assert waiting.direction == "step_forward"
        assert waiting.error.type == "builtins.PermissionError"
        assert waiting.error.message == "not approved yet"
        assert "retry" in waiting.allowed and "rollback" in waiting.allowed
        # what a rollback would undo, in order, with its args
        assert [(p.name, p.args.get("out_react.A")) for p in waiting.rollback_preview] == [
            ("react.approval", "-"),
            ("react.A", "-"),
        ]
        assert [s.status for s in state.steps] == ["done", "failed", "pending"]
        assert state.steps[1].attempts == 2
        ALLOWED.add(run)
        await handle.react(qwit.RETRY)
        result = await handle.result()
        state = await handle.state()
    assert result["approved_by"] == "operator"
    assert state.status == "completed"
    assert state.steps[1].attempts == 3
    assert ledger.applied(run) == ["react.A", "approval", "react.C"]


async def test_wait_then_retry_with_corrected_args(client, worker):
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.react("retry", args={"approved": True, "approver": "alice"})
        result = await handle.result()
    assert result["approved"] is True
    assert result["approved_by"] == "alice"


@pytest.mark.parametrize(
    ("reaction", "error", "undone"),
    [
        ("rollback", qwit.FlowRolledBack, ["react.A"]),
        ("skipback", qwit.FlowRolledBack, ["react.A"]),
        ("abort", qwit.FlowAborted, []),
        ("skip", None, []),
    ],
)
async def test_wait_then_other_decisions(client, worker, reaction, error, undone):
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await handle.react(reaction)
        if error is None:
            result = await handle.result()
            assert "out_react.C" in result
        else:
            with pytest.raises(error):
                await handle.result()
    assert ledger.undone(run) == undone


async def test_react_is_refused_clearly_and_changes_nothing(client, worker):
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        with pytest.raises(qwit.ReactionError, match="unknown reaction 'explode'"):
            await handle.react("explode")
        with pytest.raises(qwit.ReactionError, match="args only go with 'retry'"):
            await handle.react(qwit.SKIP, args={"x": 1})
        with pytest.raises(qwit.ReactionError, match="args field 'x'"):
            await handle.react(qwit.RETRY, args={"x": float("nan")})
        # args over the payload limit on their own: refused, not sent (they
        # would fail the flow's workflow task, and leak Temporal's RPCError)
        with pytest.raises(qwit.ReactionError, match=r"over the .*payload limit"):
            await handle.react(qwit.RETRY, args={"x": "x" * (3 * 1024 * 1024)})
        state = await handle.state()
        assert state.status == "waiting"
        ALLOWED.add(run)
        await handle.react(qwit.RETRY)
        await handle.result()
        with pytest.raises(qwit.ReactionError, match="is not waiting"):
            await handle.react(qwit.RETRY)


async def test_the_update_itself_validates(client, worker, temporal_client):
    """Even a raw update (not through handle.react) is refused without effect."""
    from temporalio.client import WorkflowUpdateFailedError

    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        raw = temporal_client.get_workflow_handle(handle.id)
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await raw.execute_update("qwit.react", {"reaction": "retry", "args": {}})
        assert "is not waiting" in str(info.value.cause)
        await wait_status(handle, "waiting")
        with pytest.raises(WorkflowUpdateFailedError):
            await raw.execute_update("qwit.react", {"reaction": "abort", "args": {"a": 1}})
        assert (await handle.state()).status == "waiting"
        await handle.react("abort")
        with pytest.raises(qwit.FlowAborted):
            await handle.result()


class FixableBack(Effect, name="react.fixable_back"):
    back_on_failure = qwit.WAIT
    back_retry = qwit.Retry(max_attempts=2, initial_interval=0.1, max_interval=0.1)

    async def step_back(self, args: dict[str, Any]) -> None:
        if args["ledger"] not in ALLOWED:
            raise ConnectionError("refund service down")
        await super().step_back(args)


class FixableFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(FixableBack)
        self.step(C)


async def test_wait_on_a_failed_compensation_then_retry(client, worker):
    run = new_ledger()
    async with worker(FixableFlow):
        handle = await client.start(FixableFlow, {"ledger": run, "fail": "react.C"})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None
        assert state.waiting.direction == "step_back"
        assert state.waiting.step == "react.fixable_back"
        assert state.waiting.allowed == ["retry", "skip", "abort"]
        assert [s.status for s in state.steps] == [
            "done",
            "compensation_failed",
            "compensated",
        ]
        with pytest.raises(qwit.ReactionError, match="not allowed"):
            await handle.react(qwit.ROLLBACK)
        ALLOWED.add(run)
        await handle.react(qwit.RETRY)
        with pytest.raises(qwit.FlowRolledBack) as info:
            await handle.result()
    assert type(info.value) is qwit.FlowRolledBack
    assert info.value.compensated == ["react.C", "react.fixable_back", "react.A"]
    ledger.assert_fully_undone(run)


class NeedsAccount(Effect, name="react.needs_account"):
    """Its undo needs a refund account, which only an operator can give."""

    back_on_failure = qwit.WAIT
    back_retry = qwit.Retry(max_attempts=1)

    async def step_back(self, args: dict[str, Any]) -> None:
        if args.get("refund_account") != "acct-9":
            raise ValueError(f"no refund account in {sorted(args)}")
        await super().step_back(args)


class NeedsAccountFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(NeedsAccount)
        self.step(C)


async def _retry_the_undo_with_args(client: qwit.Client) -> None:
    run = new_ledger()
    handle = await client.start(NeedsAccountFlow, {"ledger": run, "fail": "react.C"})
    await wait_for_status(handle, "waiting", 30)
    await handle.react(qwit.RETRY, args={"refund_account": "acct-9"})
    with pytest.raises(qwit.FlowRolledBack) as info:
        await asyncio.wait_for(handle.result(), 30)  # not waiting again
    assert info.value.compensated == ["react.C", "react.needs_account", "react.A"]
    ledger.assert_fully_undone(run)


async def test_a_retried_undo_gets_the_operators_args(client, worker):
    async with worker(NeedsAccountFlow):
        await _retry_the_undo_with_args(client)


async def test_a_retried_undo_gets_the_operators_args_on_local():
    await _retry_the_undo_with_args(qwit.testing.local_client())


class Refund(BaseModel):
    ledger: str
    refund_account: str = ""


class TypedNeedsAccount(Effect, name="react.typed_needs_account"):
    back_on_failure = qwit.WAIT
    back_retry = qwit.Retry(max_attempts=1)

    async def step_back(self, args: Refund) -> None:  # type: ignore[override]
        if args.refund_account != "acct-9":
            raise ValueError("no refund account")


class TypedNeedsAccountFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(TypedNeedsAccount)
        self.step(C)


async def test_retry_args_a_typed_undo_does_not_read_are_refused():
    client = qwit.testing.local_client()
    run = new_ledger()
    handle = await client.start(TypedNeedsAccountFlow, {"ledger": run, "fail": "react.C"})
    await wait_for_status(handle, "waiting", 30)
    with pytest.raises(qwit.ReactionError, match=r"reads only \['ledger', 'refund_account'\]"):
        await handle.react(qwit.RETRY, args={"refund_acount": "acct-9"})  # a typo
    await handle.react(qwit.RETRY, args={"refund_account": "acct-9"})
    with pytest.raises(qwit.FlowRolledBack):
        await asyncio.wait_for(handle.result(), 30)


async def test_wait_on_a_failed_compensation_then_give_up(client, worker):
    run = new_ledger()
    async with worker(FixableFlow):
        handle = await client.start(FixableFlow, {"ledger": run, "fail": "react.C"})
        await wait_status(handle, "waiting")
        await handle.react("skip")
        with pytest.raises(qwit.CompensationFailed) as info:
            await handle.result()
    assert info.value.failed_compensations == ["react.fixable_back"]
    assert info.value.compensated == ["react.C", "react.A"]


# -- state ------------------------------------------------------------------------------

GATES: dict[str, asyncio.Event] = {}


class Gate(qwit.Step, name="react.gate"):
    """Blocks forward (or back) until the test opens its gate."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        await GATES[args["ledger"] + "/forward"].wait()
        return {"gated": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        await GATES[args["ledger"] + "/back"].wait()


class StateFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(A)
        self.step(Gate)
        self.step(C)


async def test_state_while_running_compensating_and_after(client, worker):
    run = new_ledger()
    GATES[run + "/forward"] = asyncio.Event()
    GATES[run + "/back"] = asyncio.Event()
    async with worker(StateFlow):
        handle = await client.start(StateFlow, {"ledger": run, "fail": "react.C"})
        state = await wait_status(handle, "running")
        while state.steps[1].status != "running":
            state = await handle.state()
        assert state.flow == "StateFlow"
        assert state.flow_id == handle.id
        assert [(s.name, s.status) for s in state.steps] == [
            ("react.A", "done"),
            ("react.gate", "running"),
            ("react.C", "pending"),
        ]
        assert state.steps[0].attempts == 1
        GATES[run + "/forward"].set()
        state = await wait_status(handle, "compensating")
        while state.steps[1].status != "compensating":
            state = await handle.state()
        assert [s.status for s in state.steps] == ["done", "compensating", "compensated"]
        GATES[run + "/back"].set()
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
        state = await handle.state()
    assert state.status == "rolled_back"
    assert [s.status for s in state.steps] == ["compensated", "compensated", "compensated"]
    assert state.failure is not None
    assert state.failure.step == "react.C"


class WaitingInside(qwit.Flow):
    def build_flow(self) -> None:
        self.step(C)
        self.step(ApprovalFlow)


async def test_wait_inside_a_sub_flow_is_seen_and_decided_from_the_root(client, worker):
    run = new_ledger()
    async with worker(WaitingInside):
        handle = await client.start(WaitingInside, {"ledger": run})
        state = await wait_status(handle, "waiting")
        assert state.waiting is not None
        assert state.waiting.path == "2.2"
        assert state.waiting.flow_id == f"{handle.id}/~2"
        sub = state.steps[1]
        assert sub.kind == "flow"
        assert [s.status for s in sub.steps] == ["done", "failed", "pending"]
        await handle.react(qwit.RETRY, args={"approved": True, "approver": "bob"})
        result = await handle.result()
        state = await handle.state()
    # the decision's args are the sub-flow's (like its static args): its steps'
    # outputs reach the parent, the args themselves do not
    assert result["approved_by"] == "bob"
    assert "approved" not in result
    assert [s.status for s in state.steps[1].steps] == ["done", "done", "done"]


async def test_waiting_flows_are_found_by_search_attributes(client, worker, temporal_client):
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")

        async def listed(query: str) -> list[str]:
            return [w.id async for w in temporal_client.list_workflows(query)]

        query = f'QwitStatus="waiting" AND QwitFlow="ApprovalFlow" AND WorkflowId="{handle.id}"'
        for _ in range(100):  # visibility is eventually consistent
            if await listed(query):
                break
            await asyncio.sleep(0.1)
        assert await listed(query) == [handle.id]
        await handle.react("rollback")
        with pytest.raises(qwit.FlowRolledBack):
            await handle.result()
        query = f'QwitStatus="rolled_back" AND WorkflowId="{handle.id}"'
        for _ in range(100):
            if await listed(query):
                break
            await asyncio.sleep(0.1)
        assert await listed(query) == [handle.id]


async def test_a_flow_terminated_in_temporal_says_so_in_its_state(client, worker, temporal_client):
    # Terminate runs no flow code: the replay of its history stops where the
    # flow was; state() says how it ended, as result() does.
    run = new_ledger()
    async with worker(ApprovalFlow):
        handle = await client.start(ApprovalFlow, {"ledger": run})
        await wait_status(handle, "waiting")
        await temporal_client.get_workflow_handle(handle.id).terminate(reason="by an operator")
        with pytest.raises(qwit.FlowAborted) as ended:
            await handle.result()
        state = await handle.state()
    assert state.status == "aborted"
    assert state.failure is not None and "terminated in Temporal" in state.failure.reason
    assert state.failure.reason == ended.value.reason
