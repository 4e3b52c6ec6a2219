"""Quote two shipments on a local Temporal dev server started for the
purpose: the carrier answers on its second try for one (the segment runs
again), never for the other (a flat rate stands in).

    python -m samples.quote

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
from samples.quote.desk import DESK
from samples.quote.flows import QuoteShipment


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
        queue = f"quotes-{uuid.uuid4().hex[:8]}"
        await stack.enter_async_context(create_worker(temporal, QuoteShipment, task_queue=queue))
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        say(f"Temporal at {address}, task queue {queue!r}\n")

        for order_id, answers_on in (("3001", 2), ("3002", 0)):
            args = {"order_id": order_id, "carrier_answers_on": answers_on}
            say(f"order {order_id}: {json.dumps(args)}")
            handle = await client.start(QuoteShipment, args, id=f"quote-{order_id}-{queue}")
            result = await handle.result()
            state = await handle.state()
            segment = state.steps[0]
            say(
                f"  completed: {result['rate']} rate, {result['quote_cents']} cents "
                f"(carrier segment: {segment.status} after {segment.attempts} attempt(s))"
            )

    say("\nwhat the desk saw:")
    for line in DESK.log:
        say(f"  - {line}")
    say(f"pickup slots still held: {len(DESK.holds)}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
