"""A custom engine, written from qwit.engine alone: steps run on a thread pool,
each in an event loop of its own thread. It passes the conformance suite,
which is the proof that the engine interface is enough to write an engine:
what it writes itself is how one attempt of a step runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import threading
from collections.abc import Coroutine
from typing import Any

from qwit.engine import (
    Heartbeats,
    InMemoryEngine,
    InMemoryRuntime,
    StepCall,
    StepNode,
    run_watched_step_method,
)

name = "threads"


def create_engine(client: Any = None) -> ThreadEngine:
    return ThreadEngine()


class _Job:
    """A coroutine run to completion in a pool thread, cancellable from outside."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.started = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None

    def __call__(self) -> Any:
        async def main() -> Any:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
            self.started.set()
            return await self.coro

        # (not asyncio.run: it would wait for a plain step's thread, which
        # outlives its attempt once the attempt's grace is over)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(main())
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    def cancel(self) -> None:
        self.started.wait()
        assert self.loop is not None and self.task is not None
        with contextlib.suppress(RuntimeError):  # it has ended: its loop is closed
            self.loop.call_soon_threadsafe(self.task.cancel)


class _Runtime(InMemoryRuntime):
    async def run_attempt(
        self, cls: type[Any], node: StepNode, call: StepCall, attempt: int, beats: Heartbeats
    ) -> Any:
        job = _Job(
            run_watched_step_method(
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
        )
        assert isinstance(self.run.engine, ThreadEngine)
        future = asyncio.wrap_future(self.run.engine.pool.submit(job))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            job.cancel()
            with contextlib.suppress(BaseException):
                await future
            raise


class ThreadEngine(InMemoryEngine):
    name = name
    runtime_class = _Runtime

    def __init__(self) -> None:
        super().__init__()
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="qwit-step")

    async def close(self) -> None:
        await super().close()
        self.pool.shutdown(wait=True)
