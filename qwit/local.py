"""``qwit.local``: run flows in this process, on asyncio. No server.

The in-process engine has the same semantics as the Temporal engine (args,
every reaction, sub-flows, cancel, retries with backoff, WAIT and ``react``,
``state``) because both drive the same saga rules (``qwit.engine.Interpreter``).
It is what unit tests of your own flows use, and the worked example of an
engine: with the in-memory parts ``qwit.engine`` shares (run table,
sub-flows, waiting, handles, the retry rule), it is this file: how one attempt
of a step runs.

It is **not durable**: a flow lives in the memory of the process that started
it, and is lost with it. Use it for tests, scripts and development; use
``qwit.temporal`` for anything that must survive a crash.

    client = await qwit.connect(backend=qwit.local)   # every flow runs here
    result = await client.run(Order, {"order_id": 7})

or, per flow, ``class Order(qwit.Flow, backend=qwit.local)``.
"""

from __future__ import annotations

import copy
from typing import Any

from ._engine import EngineHost
from ._memory import Heartbeats, InMemoryEngine, InMemoryRuntime
from .engine import StepCall, StepNode, run_watched_step_method

#: The backend's name, as plans record it.
name = "local"


def create_engine(client: EngineHost | None = None) -> LocalEngine:
    """A new in-process engine (the backend protocol)."""
    engine = LocalEngine()
    engine.tracing = bool(client is not None and client.tracing)
    return engine


class LocalRuntime(InMemoryRuntime):
    """Runs each attempt of a step in this event loop (a plain step in a thread)."""

    async def run_attempt(
        self, cls: type[Any], node: StepNode, call: StepCall, attempt: int, beats: Heartbeats
    ) -> Any:
        return await run_watched_step_method(
            cls,
            call,
            heartbeat_timeout=node.heartbeat_timeout,
            attempt=attempt,
            engine=name,
            heartbeat=beats.beat,
            heartbeat_details=copy.deepcopy(beats.last),
            is_cancelled=self.cancel_check(),
            timeout=node.limit(call.direction),
            grace=node.grace(),
        )


class LocalEngine(InMemoryEngine):
    """Runs flows as asyncio tasks of this process (not durable)."""

    name = name
    runtime_class = LocalRuntime
