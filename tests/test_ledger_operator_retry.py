"""An operator RETRY of a step that failed after applying its effect, checked
with the strict ledger, on Temporal and qwit.local.

The retried step runs under a fresh key (CONTRACT section 5), so a provider
applies its effect again: the failed execution's effect is a second one. The
saga promise still holds for it: when the flow rolls back, every effect is
undone once; when it completes, the step's effect is there once, not twice.

These tests found that ``Interpreter._forward`` (qwit/_saga.py) answered RETRY
by running the step again under the next key and kept only that key for its
undo, so the failed execution's effect was never undone; the library now
undoes the failed execution first (``_undo_before_retry``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import qwit
from qwit.testing import wait_for_status
from tests import strict_ledger

LEDGER = strict_ledger.Ledger()


class Charge(qwit.Step, name="ledger_retry.charge"):
    """Applies its effect, then fails unless the operator fixed it."""

    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        with LEDGER.attempt(args) as effect:
            effect.do()
            if not args.get("fixed"):
                raise qwit.StepError("the provider timed out after charging", retry=False)
            return {"charged": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        with LEDGER.attempt(args) as effect:
            effect.undo()


class Ship(qwit.Step, name="ledger_retry.ship"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        if args.get("ship_fails"):
            raise qwit.StepError("no carrier", retry=False)


class Order(qwit.Flow, name="ledger_retry.order"):
    def build_flow(self) -> None:
        self.step(Charge, {"eid": "charge"})
        self.step(Ship)


@pytest.fixture(params=["temporal", "local"])
async def engine_client(request: pytest.FixtureRequest, temporal_client: Any) -> AsyncIterator[Any]:
    if request.param == "local":
        local = await qwit.connect(backend=qwit.local)
        yield local
        await local.close()
        return
    from qwit.temporal import create_worker

    queue = f"ledger-retry-{uuid.uuid4().hex[:8]}"
    async with create_worker(temporal_client, Charge, Ship, task_queue=queue):
        yield await qwit.connect(temporal_client=temporal_client, task_queue=queue)


async def run_with_retry(client: qwit.Client, ship_fails: bool) -> tuple[str, str]:
    run = uuid.uuid4().hex
    handle = await client.start(Order, {"run": run, "ship_fails": ship_fails})
    await wait_for_status(handle, "waiting", 30)
    await handle.react(qwit.RETRY, args={"fixed": True, "epoch": 1})
    outcome = "completed"
    try:
        await asyncio.wait_for(handle.result(), 30)
    except qwit.FlowFailed as failed:
        outcome = failed.kind
    finally:
        LEDGER.ended(run)
    return run, outcome


async def test_a_rollback_undoes_the_effect_of_the_execution_the_operator_retried(engine_client):
    run, outcome = await run_with_retry(engine_client, ship_fails=True)
    assert outcome == "rolled_back"
    LEDGER.check(run)  # the generic rules: no key reused, undo after forward, newest first
    entries = LEDGER.entries(run)
    applied = [e.execution for e in entries if e.kind == strict_ledger.DO]
    undone = [e.execution for e in entries if e.kind == strict_ledger.UNDO]
    assert applied == [("charge", 0), ("charge", 1)]
    assert sorted(undone) == sorted(applied), f"left applied: {set(applied) - set(undone)}"


async def test_a_completed_flow_keeps_one_effect_of_the_step_the_operator_retried(engine_client):
    run, outcome = await run_with_retry(engine_client, ship_fails=False)
    assert outcome == "completed"
    LEDGER.check(run)
    entries = LEDGER.entries(run)
    undone = {e.execution for e in entries if e.kind == strict_ledger.UNDO}
    kept = [
        e.execution for e in entries if e.kind == strict_ledger.DO and e.execution not in undone
    ]
    assert kept == [("charge", 1)], f"effects of the step left applied: {kept}"
