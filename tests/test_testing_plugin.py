"""qwit.testing, as a user's test suite would use it: on the order sample."""

from __future__ import annotations

import pytest

import qwit
from qwit.testing import temporal_environment
from samples.order.flows import PlaceOrder

GOOD = {"order_id": "t-1", "sku": "A-1", "quantity": 1, "card": "4242", "cents": 100}
DECLINED = {**GOOD, "order_id": "t-2", "card": "4000-0002"}


async def test_qwit_local_runs_a_temporal_flow_in_process(qwit_local: qwit.Client):
    result = await qwit_local.run(PlaceOrder, GOOD)
    assert result["tracking"] == "1Z-t-1"
    handle = await qwit_local.start(PlaceOrder, DECLINED)
    assert handle.engine == "local"
    with pytest.raises(qwit.FlowRolledBack) as info:
        await handle.result()
    assert info.value.compensated == ["payments.charge", "inventory.reserve"]


async def test_qwit_temporal_serves_modules_on_a_fresh_queue(qwit_temporal):
    from samples.order import flows

    async with qwit_temporal(flows) as client:
        handle = await client.start(PlaceOrder, GOOD)
        assert handle.engine == "temporal"
        assert (await handle.result())["tracking"] == "1Z-t-1"
        with pytest.raises(qwit.FlowRolledBack):
            await client.run(PlaceOrder, DECLINED)


async def test_temporal_environment_outside_pytest_fixtures():
    async with temporal_environment(PlaceOrder) as client:
        assert (await client.run(PlaceOrder, GOOD))["charge"].startswith("ch-")


async def test_wait_for_status_refuses_an_unknown_status_and_a_flow_that_ended_otherwise(
    qwit_local: qwit.Client,
):
    # Before, both waited out the whole timeout.
    import asyncio

    from qwit.testing import StatusNotReached, wait_for_status

    handle = await qwit_local.start(PlaceOrder, GOOD)
    with pytest.raises(ValueError, match="'finished' is not a flow status"):
        await wait_for_status(handle, "finished")
    await handle.result()
    with pytest.raises(StatusNotReached, match="ended 'completed': it will never be 'waiting'"):
        await asyncio.wait_for(wait_for_status(handle, "waiting", timeout=60), 10)
    assert issubclass(StatusNotReached, TimeoutError)
    assert (await wait_for_status(handle, "completed")).status == "completed"


async def test_qwit_postgres_serves_modules_on_a_database_of_its_own(qwit_postgres):
    from samples.order import flows

    async with qwit_postgres(flows, poll_interval=0.2) as client:
        handle = await client.start(PlaceOrder, GOOD)
        assert handle.engine == "postgres"
        assert (await handle.result())["tracking"] == "1Z-t-1"
        with pytest.raises(qwit.FlowRolledBack) as info:
            await client.run(PlaceOrder, DECLINED)
        assert info.value.compensated == ["payments.charge", "inventory.reserve"]
        first = client.settings("postgres").dsn
    async with qwit_postgres(flows) as client:
        # (a fresh database: the flows of the block before are not in it)
        assert client.settings("postgres").dsn != first
        with pytest.raises(qwit.FlowNotFound):
            await client.get_handle(handle.id).state()


async def test_postgres_environment_outside_pytest_fixtures(monkeypatch):
    from qwit.testing import postgres_environment

    monkeypatch.delenv("QWIT_POSTGRES_DSN", raising=False)  # (an embedded one, then)
    async with postgres_environment(PlaceOrder) as client:
        assert (await client.run(PlaceOrder, GOOD))["charge"].startswith("ch-")


async def test_postgres_environment_uses_the_database_qwit_postgres_dsn_names(
    monkeypatch, postgres_dsn
):
    from qwit.testing import postgres_environment

    monkeypatch.setenv("QWIT_POSTGRES_DSN", postgres_dsn)  # (used as it is: no database made)
    async with postgres_environment(PlaceOrder) as client:
        assert client.settings("postgres").dsn == postgres_dsn
        assert (await client.run(PlaceOrder, GOOD))["tracking"] == "1Z-t-1"
