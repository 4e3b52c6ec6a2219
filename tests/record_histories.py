"""Record the workflow histories replayed by tests/test_replay.py.

    python -m tests.record_histories [NAME ...]

Starts its own dev server and worker, runs each scenario and writes
tests/histories/<name>.json. Existing files are kept unless named.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import qwit
from qwit.temporal import DevServer, connect_temporal, create_worker
from tests.history_flows import OrderFlow

HISTORIES = Path(__file__).parent / "histories"

Scenario = Callable[[qwit.Client], Awaitable[str]]


async def completed(client: qwit.Client) -> str:
    handle = await client.start(OrderFlow, {"order_id": 1}, id="history-completed")
    await handle.result()
    return handle.id


async def rolled_back(client: qwit.Client) -> str:
    handle = await client.start(
        OrderFlow, {"order_id": 2, "fail_payment": True}, id="history-rolled-back"
    )
    try:
        await handle.result()
    except qwit.FlowRolledBack:
        return handle.id
    raise AssertionError("the flow should have rolled back")


SCENARIOS: dict[str, Scenario] = {"completed": completed, "rolled_back": rolled_back}


async def record(names: list[str]) -> None:
    HISTORIES.mkdir(exist_ok=True)
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        queue = f"record-{uuid.uuid4().hex[:8]}"
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        async with create_worker(temporal, OrderFlow, task_queue=queue):
            for name in names:
                flow_id = await SCENARIOS[name](client)
                history = await temporal.get_workflow_handle(flow_id).fetch_history()
                (HISTORIES / f"{name}.json").write_text(history.to_json())
                print(f"recorded {name}: {len(history.events)} events")


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:] or list(SCENARIOS)))
