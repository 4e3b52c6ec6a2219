"""Recovery beyond rollback, on every engine: cancel modes (more to come:
retried segments, fallbacks, final steps, stopping a rollback, redrive)."""

from __future__ import annotations

import pytest

import qwit
from qwit.testing import wait_for_status
from tests import ledger
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
