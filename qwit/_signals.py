"""Stopping on SIGINT and SIGTERM, for what runs until it is told to stop
(``qwit dev``, the workers' ``serve``).

A worker's command catches the signals from its very start
(``catching_early_signals``): one that comes while it imports modules,
connects or prepares, before ``serve`` installs its own handlers, is not the
default death (SIGTERM) or a ``KeyboardInterrupt`` (SIGINT), but a stop that
``serve`` honours as it begins, or that ends a connection attempt still
under way (``unless_stopped_early``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: The signals caught before ``serve`` took over (while catching early ones).
_early: list[int] = []
#: Set (on its loop) when an early signal comes: what waits for one.
_early_events: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []


def _caught(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)
    for loop, event in _early_events:
        loop.call_soon_threadsafe(event.set)


@contextlib.contextmanager
def catching_early_signals() -> Iterator[None]:
    """Catch SIGINT and SIGTERM as a stop until ``stop_on_signals`` takes over;
    the handlers before the block are back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # (no handler can be installed off the main thread)
        return
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, _caught)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        _early.clear()


def stopped_early() -> bool:
    """Whether a signal came before ``serve`` took over (and was not yet honoured)."""
    return bool(_early)


async def unless_stopped_early(work: Coroutine[Any, Any, T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if a signal caught early
    comes first: a worker told to stop while it connects stops at once."""
    if _early:
        work.close()
        return None
    event = asyncio.Event()
    waiter = (asyncio.get_running_loop(), event)
    _early_events.append(waiter)
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        _early_events.remove(waiter)
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
    """An event (``stop``, or a new one) that SIGINT or SIGTERM sets while
    the block runs; the handlers are removed after it. Off the main thread,
    where none can be installed, only its owner sets the event. A signal
    caught early (``catching_early_signals``) sets it at once."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
    if _early and installed:  # (checked once ours are in: none can fall between)
        _early.clear()
        stop.set()
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
