"""Temporal's transport errors reach users as QWIT errors that say what to check,
and ``result()`` waits through a server that restarts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.service import RetryConfig

import qwit
from qwit.temporal import DevServer, connect_temporal, create_worker
from qwit.temporal._devserver import free_port
from tests.clirun import qwit as run_qwit

#: The SDK's retries of a call that fails, cut from its default 10 s to 1 s.
SHORT_RETRIES = RetryConfig(max_elapsed_time_millis=1000, max_retries=3)

#: Seconds the server stays down: longer than the SDK's own retries of a call
#: (``SHORT_RETRIES``: 1 s), which alone would end the wait with a raw RPCError.
OUTAGE = 4.0


class Hello(qwit.Step, name="rpc.hello"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"hello": args["who"]}


class HelloFlow(qwit.Flow, name="rpc.hello_flow"):
    def build_flow(self) -> None:
        self.step(Hello)


def closed_address() -> str:
    """An address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


def calls(handle: qwit.FlowHandle) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "result": handle.result,
        "state": handle.state,
        "cancel": handle.cancel,
        "react": lambda: handle.react(qwit.RETRY),
    }


async def test_an_unknown_id_is_flow_not_found(client: qwit.Client):
    handle = client.get_handle(f"no-such-flow-{uuid.uuid4().hex}")
    for name, call in calls(handle).items():
        with pytest.raises(qwit.FlowNotFound, match=f"no flow with id '{handle.id}'"):
            await asyncio.wait_for(call(), 30)
        assert name


async def test_a_closed_port_fails_each_call_quickly_saying_what_to_check():
    address = closed_address()
    client = await qwit.connect(target_host=address)
    handle = client.get_handle("any-flow")
    for name, call in calls(handle).items():
        began = time.monotonic()
        with pytest.raises(qwit.EngineUnavailable) as info:
            await asyncio.wait_for(call(), 30)
        took = time.monotonic() - began
        message = str(info.value)
        assert took < 5, (name, took)
        assert message.startswith(f"can't connect to Temporal at {address} "), message
        assert "is a Temporal server running there?" in message, message
        assert "tonic" not in message and "\n" not in message, message
    with pytest.raises(qwit.EngineUnavailable, match=address):
        await client.start(HelloFlow, {"who": "x"})


async def test_a_server_gone_after_connecting_raises_engine_unavailable():
    server = await DevServer().start()
    try:
        # The SDK's own retries, shortened: each call then gives up in seconds,
        # as it would after the SDK's default 10 s.
        temporal = await connect_temporal(target_host=server.address, retry_config=SHORT_RETRIES)
        client = await qwit.connect(temporal_client=temporal, task_queue="no-worker-here")
        handle = await client.start(HelloFlow, {"who": "x"})  # no worker: it stays running
        client.engine().unavailable_timeout = 2  # type: ignore[attr-defined]
    finally:
        server.stop()
    for name, call in calls(handle).items():
        began = time.monotonic()
        with pytest.raises(qwit.EngineUnavailable) as info:
            await asyncio.wait_for(call(), 60)
        took = time.monotonic() - began
        message = str(info.value)
        assert message.startswith(f"can't reach Temporal at {server.address} "), message
        assert "is a Temporal server running, and reachable from here?" in message, message
        assert "tonic" not in message, message
        assert took < 20, (name, took)
        if name == "result":
            assert f"while waiting for flow {handle.id!r} to end" in message
            assert "Gave up after 2 s without an answer ($QWIT_UNAVAILABLE_TIMEOUT)" in message
    assert client.engine().result_retries["UNAVAILABLE"] > 0  # type: ignore[attr-defined]


async def test_result_waits_through_a_server_restart(tmp_path: Path):
    port = free_port()
    db = tmp_path / "temporal.db"
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    server = await DevServer(port=port, db_filename=db).start()
    try:
        temporal = await connect_temporal(target_host=server.address, retry_config=SHORT_RETRIES)
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        handle = await client.start(HelloFlow, {"who": "restart"})
        waiting = asyncio.ensure_future(handle.result())
        await asyncio.sleep(1.0)  # its long poll is in flight
        server.stop()
        await asyncio.sleep(OUTAGE)
        assert not waiting.done(), waiting.exception()
        server = await DevServer(port=port, db_filename=db).start()
        # The flow runs only now: the result must come from the restarted server.
        async with create_worker(temporal, HelloFlow, task_queue=queue):
            result = await asyncio.wait_for(waiting, 60)
        assert result == {"who": "restart", "hello": "restart"}
        retries = client.engine().result_retries  # type: ignore[attr-defined]
        assert retries["UNAVAILABLE"] + retries["UNKNOWN"] > 0, retries
    finally:
        server.stop()


@pytest.mark.parametrize("command", [("list",), ("status", "any-flow"), ("cancel", "any-flow")])
async def test_the_cli_says_in_one_line_that_temporal_is_unreachable(command: tuple[str, ...]):
    address = closed_address()
    done = await run_qwit(*command, "--address", address, timeout=60)
    assert done.code == 1, done
    assert done.out == ""
    lines = done.err.strip().splitlines()
    assert len(lines) == 1, done.err
    assert lines[0].startswith(f"qwit: can't connect to Temporal at {address} "), done.err
    assert "is a Temporal server running there?" in lines[0]
    assert "tonic" not in done.err
