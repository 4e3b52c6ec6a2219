"""Run the order saga twice on a local Temporal dev server started for the purpose:
one order completes, one is declined at payment and rolled back.

    python -m samples.order

With TEMPORAL_ADDRESS set, it uses that server instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from contextlib import AsyncExitStack

import qwit
from qwit.temporal import DevServer, connect_temporal, create_worker
from samples.order.flows import PlaceOrder
from samples.order.shop import SHOP


def say(text: str) -> None:
    print(text, flush=True)


async def main() -> int:
    async with AsyncExitStack() as stack:
        address = os.environ.get("TEMPORAL_ADDRESS")
        if not address:
            say("starting a local Temporal dev server...")
            server = await stack.enter_async_context(DevServer())
            address = server.address
        temporal = await connect_temporal(target_host=address)
        queue = f"orders-{uuid.uuid4().hex[:8]}"
        await stack.enter_async_context(create_worker(temporal, PlaceOrder, task_queue=queue))
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        say(f"Temporal at {address}, task queue {queue!r}\n")

        good = {"order_id": "1001", "sku": "A-1", "quantity": 2, "card": "4242", "cents": 2599}
        say(f"order 1001 (card 4242): {json.dumps(good)}")
        result = await client.run(PlaceOrder, good, id=f"order-1001-{queue}")
        say(f"  completed: {json.dumps(result)}")

        bad = {"order_id": "1002", "sku": "B-2", "quantity": 1, "card": "4000-0002", "cents": 999}
        say(f"\norder 1002 (card ending 0002): {json.dumps(bad)}")
        try:
            await client.run(PlaceOrder, bad, id=f"order-1002-{queue}")
        except qwit.FlowRolledBack as failed:
            say(f"  rolled back at step {failed.step!r}: {failed.reason}")
            say(f"  undone, newest first: {', '.join(failed.compensated)}")
        else:
            say("  unexpectedly completed")
            return 1

    say("\nwhat the shop saw:")
    for line in SHOP.log:
        say(f"  - {line}")
    say(f"stock now: {SHOP.stock}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
