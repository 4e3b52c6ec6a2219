"""An event loop that runs a flow's interpreter one activation at a time.

The PostgreSQL engine replays a flow from its journal the way Temporal
replays a history: it delivers each recorded event (a step's result, a
decision, a cancel) in the order it was first delivered, and lets the
interpreter run until it has nothing left to do before the next one. That
needs a loop whose "nothing left to do" is exact: ``FlowLoop`` runs only the
callbacks it was given, never real time or I/O, and ``activate`` returns when
none is ready. The interpreter uses futures, tasks, ``gather``, ``shield``,
``wait``, events and semaphores on it, as it does on any loop; it never uses
the loop's timers (waits are the engine's durable timers).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class FlowLoop(asyncio.AbstractEventLoop):
    """A loop driven by ``activate``: no timers, no I/O, no threads."""

    def __init__(self) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._closed = False
        self._running = False
        self.clock = 0.0
        """What ``time()`` says: the activation's recorded time."""
        self.errors: list[dict[str, Any]] = []
        """What ``call_exception_handler`` was given (a fault of QWIT's own)."""

    def activate(self) -> None:
        """Run every ready callback, and those they make ready, until none is."""
        outer = asyncio._get_running_loop()
        asyncio._set_running_loop(self)
        self._running = True
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()
        finally:
            self._running = False
            asyncio._set_running_loop(outer)

    # -- what futures and tasks use -------------------------------------------

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        raise RuntimeError("a flow's loop is not thread-safe")

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        if context is None:
            return asyncio.Task(coro, loop=self, name=name)
        return asyncio.Task(coro, loop=self, name=name, context=context)  # type: ignore[call-arg]

    def get_debug(self) -> bool:
        return False

    def time(self) -> float:
        return self.clock

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._ready.clear()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    # -- what a flow must not use ----------------------------------------------

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        raise RuntimeError("a flow waits on its engine's durable timers, not the loop's")

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        raise RuntimeError("a flow waits on its engine's durable timers, not the loop's")


__all__ = ["FlowLoop"]
