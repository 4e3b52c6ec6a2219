"""Stopping on SIGINT and SIGTERM, for what runs until it is told to stop
(``qwit dev``, the workers' ``serve``).

A worker's command catches the signals from its very start
(``catching_early_signals``): one that comes while it imports modules,
connects or prepares, before ``serve`` installs its own handlers, stops it
there and then (``StoppedEarly``, a ``SystemExit`` of status 0: it served
nothing), rather than the default death (SIGTERM) or a ``KeyboardInterrupt``
(SIGINT).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppedEarly(SystemExit):
    """A signal stopped a worker before it served (exit status 0)."""

    def __init__(self, signum: int) -> None:
        super().__init__(0)
        self.signum = signum


def _caught(signum: int, frame: FrameType | None) -> None:
    raise StoppedEarly(signum)


@contextlib.contextmanager
def catching_early_signals() -> Iterator[None]:
    """Stop with ``StoppedEarly`` on SIGINT or SIGTERM until ``stop_on_signals``
    takes over (as ``serve`` begins); the handlers before the block are back
    after it. (Off the main thread, where none can be installed: nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    for sig in _SIGNALS:
        signal.signal(sig, _caught)
    try:
        yield
    finally:
        for sig, handler in before.items():
            if handler is not None:  # (None: installed from C, not to be put back)
                signal.signal(sig, handler)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event | None = None) -> Iterator[asyncio.Event]:
    """An event (``stop``, or a new one) that SIGINT or SIGTERM sets while
    the block runs; the handlers are removed after it. Off the main thread,
    where none can be installed, only its owner sets the event."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
