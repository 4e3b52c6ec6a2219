"""CONTRACT sections 1-3 and ROLLBACK, against a real Temporal dev server."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

import qwit
from qwit.testing import TimeSkipping
from tests import ledger
from tests.ledger import Effect


def new_ledger() -> str:
    return uuid.uuid4().hex


# -- args ---------------------------------------------------------------------

SEEN: dict[str, list[tuple[str, dict[str, Any]]]] = {}


class Seer(qwit.Step):
    """Records the args it sees, returns {name: n}."""

    output: dict[str, Any] = {}

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        SEEN.setdefault(args["run"], []).append((type(self).name, dict(args)))
        return dict(self.output)

    async def step_back(self, args: dict[str, Any]) -> None:
        SEEN.setdefault(args["run"], []).append((type(self).name + ".back", dict(args)))


class S1(Seer):
    output = {"s1": 1, "shared": "from-s1"}


class S2(Seer):
    output = {"s2": 2}


class S3(Seer):
    output = {"s3": 3, "shared": "from-s3"}


class Boom(qwit.Step):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        SEEN.setdefault(args["run"], []).append(("Boom", dict(args)))
        raise RuntimeError("boom")


class ArgsFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(S1, {"static1": "a", "input": "overridden"})
        self.step(S2)
        self.step(S3, {"static3": "c"})


class ArgsFailFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(S1, {"static1": "a"})
        self.step(S2)
        self.step(Boom)


async def test_args_accumulate_and_static_args_are_scoped(client, worker):
    run = new_ledger()
    async with worker(ArgsFlow):
        result = await client.run(ArgsFlow, {"run": run, "input": "in"})
    seen = dict(SEEN[run])
    # static args override the flow's args for that step only
    assert seen["S1"] == {"run": run, "input": "overridden", "static1": "a"}
    # later steps see earlier outputs, not earlier steps' static args
    assert seen["S2"] == {"run": run, "input": "in", "s1": 1, "shared": "from-s1"}
    assert seen["S3"] == {
        "run": run,
        "input": "in",
        "s1": 1,
        "shared": "from-s1",
        "s2": 2,
        "static3": "c",
    }
    # the result is the input plus every output, later outputs winning
    assert result == {"run": run, "input": "in", "s1": 1, "s2": 2, "s3": 3, "shared": "from-s3"}


async def test_rollback_undoes_newest_first_and_step_back_sees_its_own_output(client, worker):
    run = new_ledger()
    async with worker(ArgsFailFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(ArgsFailFlow, {"run": run}, id=f"rb-{run}")
    err = info.value
    assert err.flow_id == f"rb-{run}"
    assert err.step == "Boom"
    assert "RuntimeError: boom" in err.reason
    assert err.error_type == "builtins.RuntimeError"
    # Boom has no step_back: it is undone (nothing to do) first, then S2, then S1
    assert err.compensated == ["Boom", "S2", "S1"]
    order = [name for name, _ in SEEN[run]]
    assert order == ["S1", "S2", "Boom", "S2.back", "S1.back"]
    backs = dict(SEEN[run])
    # step_back gets what step_forward got, plus that step's own output
    assert backs["S1.back"] == {"run": run, "static1": "a", "s1": 1, "shared": "from-s1"}
    assert backs["S2.back"] == {"run": run, "s1": 1, "shared": "from-s1", "s2": 2}


# -- retries --------------------------------------------------------------------

ATTEMPTS: dict[str, list[int]] = {}


class Flaky(qwit.Step):
    """Fails until attempt `succeed_on` (from args); records qwit.context()."""

    retry = qwit.Retry(max_attempts=3, initial_interval=0.1, backoff=1.0, max_interval=0.1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx = qwit.context()
        ATTEMPTS.setdefault(args["run"], []).append(ctx.attempt)
        if ctx.attempt < args["succeed_on"]:
            raise ConnectionError(f"attempt {ctx.attempt} failed")
        return {"attempt": ctx.attempt, "key": ctx.idempotency_key}


class FlakyFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Flaky)


class DefaultRetry(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> None:
        ATTEMPTS.setdefault(args["run"], []).append(qwit.context().attempt)
        raise ValueError("always")


class DefaultRetryFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(DefaultRetry)


class Refuses(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> None:
        ATTEMPTS.setdefault(args["run"], []).append(qwit.context().attempt)
        raise qwit.StepError("card declined", retry=False)


class RefusesFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Refuses)


async def test_retries_then_succeeds_with_a_stable_idempotency_key(client, worker):
    run = new_ledger()
    async with worker(FlakyFlow):
        result = await client.run(FlakyFlow, {"run": run, "succeed_on": 3}, id=f"flaky-{run}")
    assert ATTEMPTS[run] == [1, 2, 3]
    assert result["attempt"] == 3
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}/1", result["key"]), result["key"]


async def test_default_policy_is_three_attempts():
    # Its backoff (1 s, then 2 s) skipped by Temporal's time-skipping server.
    run = new_ledger()
    async with TimeSkipping.start() as ts, ts.worker(DefaultRetryFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await ts.run(DefaultRetryFlow, {"run": run})
        state = await ts.client.get_handle(info.value.flow_id).state()
    assert ATTEMPTS[run] == [1, 2, 3]
    assert info.value.reason == "ValueError: always"
    assert state.steps[0].attempts == 3
    assert state.steps[0].status == "compensated"


async def test_step_error_without_retry_fails_at_once(client, worker):
    run = new_ledger()
    async with worker(RefusesFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(RefusesFlow, {"run": run})
    assert ATTEMPTS[run] == [1]
    assert info.value.reason == "StepError: card declined"
    assert info.value.error_type == "qwit.StepError"


# -- sync and typed steps -----------------------------------------------------------


class SyncStep(qwit.Step, name="tests.sync"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx = qwit.context()
        return {"sync": True, "sync_step": ctx.step, "path": ctx.path}

    def step_back(self, args: dict[str, Any]) -> None:
        ledger.record(args["ledger"], "undo", "sync")


class Order(BaseModel):
    order_id: int
    amount: float


class Receipt(BaseModel):
    receipt: str


class TypedStep(qwit.Step):
    async def step_forward(self, args: Order) -> Receipt:
        assert isinstance(args, Order)
        return Receipt(receipt=f"r-{args.order_id}-{args.amount:.2f}")

    async def step_back(self, args: dict[str, Any]) -> None:
        pass


class TypedFail(qwit.Step):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise RuntimeError("late failure")


class SyncTypedFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(SyncStep)
        self.step(TypedStep)


class SyncTypedFailFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(SyncStep)
        self.step(TypedStep)
        self.step(TypedFail)


async def test_sync_and_typed_steps(client, worker):
    async with worker(SyncTypedFlow):
        result = await client.run(SyncTypedFlow, Order(order_id=7, amount=3.5))
    assert result == {
        "order_id": 7,
        "amount": 3.5,
        "sync": True,
        "sync_step": "tests.sync",
        "path": "1",
        "receipt": "r-7-3.50",
    }


async def test_typed_step_gets_only_its_fields_and_sync_step_back_runs(client, worker):
    run = new_ledger()
    async with worker(SyncTypedFailFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(
                SyncTypedFailFlow, {"ledger": run, "order_id": 1, "amount": 2.0, "big": "x" * 1000}
            )
    assert info.value.compensated == ["TypedFail", "TypedStep", "tests.sync"]
    assert ledger.undone(run) == ["sync"]


async def test_typed_step_missing_a_field_fails_naming_it(client, worker):
    async with worker(SyncTypedFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(SyncTypedFlow, {"order_id": 7, "ledger": new_ledger()})
    err = info.value
    assert err.step == "TypedStep"
    assert "'amount'" in err.reason
    assert "Field required" in err.reason
    # the step never ran, so only the sync step is undone
    assert err.compensated == ["tests.sync"]


class BadOutput(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> Any:
        return {"when": object()}


class BadOutputFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(BadOutput)


async def test_an_output_that_is_not_json_fails_the_step_at_once(client, worker):
    async with worker(BadOutputFlow):
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(BadOutputFlow)
        state = await client.get_handle(info.value.flow_id).state()
    assert "field 'when'" in info.value.reason
    assert state.steps[0].attempts == 1


# -- unregistered steps ---------------------------------------------------------------


class Registered(Effect):
    pass


class NotRegistered(Effect):
    pass


class PartlyRegisteredFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Registered)
        self.step(NotRegistered)


async def test_a_step_no_worker_serves_fails_the_flow_in_bounded_time(
    temporal_client, worker, task_queue
):
    client = await qwit.connect(
        temporal_client=temporal_client, task_queue=task_queue, unserved_step_timeout=2
    )
    run = new_ledger()
    async with worker(Registered):
        began = time.monotonic()
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(client.run(PartlyRegisteredFlow, {"ledger": run}), 20)
        took = time.monotonic() - began
    err = info.value
    assert 2 <= took < 10
    assert err.step == "NotRegistered"
    assert err.error_type == "qwit.StepNotRegistered"
    assert "'NotRegistered'" in err.reason
    assert repr(task_queue) in err.reason
    assert "no worker served it for" in err.reason
    assert err.compensated == ["Registered"]
    assert ledger.entries(run) == [("do", "Registered"), ("undo", "Registered")]


# -- errors before anything runs ------------------------------------------------------------


async def test_bad_args_are_refused_before_anything_runs(client, worker):
    with pytest.raises(qwit.ArgumentsError, match="field 'when'"):
        await client.start(ArgsFlow, {"when": object()})
    with pytest.raises(qwit.ArgumentsError, match="nan"):
        await client.start(ArgsFlow, {"n": float("nan")})
    with pytest.raises(qwit.ArgumentsError, match="dict or a pydantic model"):
        await client.start(ArgsFlow, ["not", "a", "dict"])
    # over the payload limit: the contract's PayloadTooLarge (an ArgumentsError)
    with pytest.raises(qwit.PayloadTooLarge, match="payload limit"):
        await client.start(ArgsFlow, {"blob": "x" * (3 * 1024 * 1024)})


async def test_flow_id_is_honoured_and_result_is_final_args(client, worker):
    flow_id = f"order-{uuid.uuid4().hex[:8]}"
    async with worker(ArgsFlow):
        handle = await client.start(ArgsFlow, {"run": new_ledger()}, id=flow_id)
        assert handle.id == flow_id
        result = await handle.result()
        again = await client.get_handle(flow_id).result()
        state = await handle.state()
    assert result == again
    assert state.status == "completed"
    assert [s.status for s in state.steps] == ["done", "done", "done"]
    assert [s.attempts for s in state.steps] == [1, 1, 1]
