"""Live progress of a flow on stderr.

The flow's state is polled a few times a second; each poll is compared with
the last one and every change is printed as a line (``▶ started``, ``✓ done``,
``↩ compensating``...), so the same story reads on a terminal and in a log. A
poll can miss short-lived statuses; the lines fill them in, forward events
in plan order, then undo events newest first, as the saga runs them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import temporalio.client
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from .._engine import FlowHandle
from .._plan import FlowNode, child_path
from .._state import FlowState, StepState
from ._common import symbols_ok
from ._render import Row, attempts_note, event_line, rows, wait_lines

#: Seconds between two polls of a flow's state.
POLL_INTERVAL = 0.2
#: Seconds one state query may take before the poll gives up on it.
QUERY_TIMEOUT = 5.0
#: Seconds without an answer after which the user hears that no worker answers.
NO_WORKER_HINT_AFTER = 5.0

_FORWARD_RANK = {"pending": 0, "running": 1, "done": 2, "failed": 2, "skipped": 2}
_BACK_RANK = {"compensating": 3, "compensated": 4, "compensation_failed": 4}


def _rank(status: str) -> int:
    return _FORWARD_RANK.get(status, _BACK_RANK.get(status, 0))


@dataclass(frozen=True)
class Event:
    """A step changed status: ``kind`` is the new status, or ``started``/``retrying``."""

    kind: str
    row: Row
    detail: str = ""


def _implied_finish(step: StepState) -> str:
    # A step first seen once its undo began: it failed if it still carries an
    # error (its forward one). A compensation_failed step's error is its
    # undo's, which says nothing of how its forward run ended.
    failed = step.error is not None and step.status in ("compensating", "compensated")
    return "failed" if failed else "done"


def _entry_events(
    old: str, step: StepState, row: Row, no_back: frozenset[str]
) -> tuple[list[Event], list[Event]]:
    """Forward and undo events of one entry going from ``old`` to its status."""
    new = step.status
    if new == old:
        return [], []
    if old == "failed" and new == "skipped":
        return [Event("skipped", row)], []
    before, after = _rank(old), _rank(new)
    again = ""
    if after < before or (after == before and before in (2, 4)):
        # It ran again: an operator's retry of the step, or of its undo.
        if after <= 2:
            before, again = 0, "again"
        else:
            before = 2
    forward: list[Event] = []
    back: list[Event] = []
    for rank in range(before + 1, after + 1):
        if rank == 1:
            forward.append(Event("started", row, again))
        elif rank == 2:
            kind = new if after == 2 else _implied_finish(step)
            detail = step.error.describe() if kind == "failed" and step.error else ""
            detail = f"{detail} {attempts_note(step)}".strip()
            # A sub-flow's failure is known once its own steps were undone.
            (back if kind == "failed" and step.kind == "flow" else forward).append(
                Event(kind, row, detail)
            )
        elif rank == 3:
            if step.path not in no_back:
                back.append(Event("compensating", row))
        else:
            detail = step.error.describe() if new == "compensation_failed" and step.error else ""
            if step.path in no_back:
                detail = "(no step_back: nothing to undo)"
            back.append(Event(new, row, detail))
    return forward, back


def _events(
    old: dict[str, StepState], steps: list[StepState], depth: int, no_back: frozenset[str]
) -> tuple[list[Event], list[Event]]:
    forward: list[Event] = []
    back: list[Event] = []
    for step in steps:
        row = Row(step, depth)
        before = old.get(step.path)
        f, b = _entry_events(before.status if before else "pending", step, row, no_back)
        inner_f, inner_b = _events(old, step.steps, depth + 1, no_back)
        # An entry starts before its sub-flow's steps and ends after them.
        starts = [e for e in f if e.kind == "started"]
        forward += starts + inner_f + [e for e in f if e.kind != "started"]
        comp = [e for e in b if e.kind == "compensating"]
        back = comp + inner_b + [e for e in b if e.kind != "compensating"] + back
    return forward, back


def diff(
    old: FlowState | None, new: FlowState, no_back: frozenset[str] = frozenset()
) -> list[Event]:
    """What changed between two polls, in the order the saga did it.

    Args:
        old: The state at the last poll (None: nothing seen yet).
        new: The state now.
        no_back: Paths of steps without a ``step_back``, whose undo is a no-op.
    """
    before = {row.step.path: row.step for row in rows(old.steps)} if old else {}
    forward, back = _events(before, new.steps, 0, no_back)
    return forward + back


async def running_attempts(
    client: temporalio.client.Client, state: FlowState
) -> dict[str, tuple[int, str]]:
    """Steps being retried right now: attempt number and last error, by path.

    The flow's state counts a step's attempts once it ends; Temporal knows
    the attempt in flight, from the workflow (or sub-flow) that runs it.
    """
    found: dict[str, tuple[int, str]] = {}

    async def visit(flow_id: str, steps: list[StepState]) -> None:
        running = {s.name: s for s in steps if s.status in ("running", "compensating")}
        if any(s.kind == "step" for s in running.values()):
            try:
                desc = await client.get_workflow_handle(flow_id).describe()
            except Exception:  # best effort: the flow may have just ended
                return
            for pending in desc.raw_description.pending_activities:
                step_name, _, _ = pending.activity_type.name.rpartition(".")
                step = running.get(step_name)
                if step is not None and pending.attempt > 1:
                    found[step.path] = (pending.attempt, pending.last_failure.message)
        for s in steps:
            if s.kind == "flow" and s.flow_id and s.status in ("running", "compensating"):
                await visit(s.flow_id, s.steps)

    await visit(state.flow_id, state.steps)
    return found


@dataclass
class Follower:
    """Prints a flow's progress as it runs, and tells how it ended.

    Attributes:
        out: Where the progress goes (stderr).
        react: The command an operator runs to decide a waiting flow.
        no_worker_hint: What to say when no worker answers for a while.
    """

    out: Console
    react: str = "qwit react"
    no_worker_hint: str = ""
    last: FlowState | None = None
    width: int = 0
    path_width: int = 1
    no_back: frozenset[str] = frozenset()
    symbols: bool = field(init=False)
    _retries: dict[str, int] = field(default_factory=dict)
    _waiting_seen: str | None = None
    _status: Text = field(default_factory=Text)

    def __post_init__(self) -> None:
        self.symbols = symbols_ok(self.out)

    def expect(self, plan: FlowNode) -> None:
        """Size the columns for every step of the plan, and learn which have no undo."""
        no_back = set()

        def walk(node: FlowNode, parent: str, depth: int) -> None:
            for i, step in enumerate(node.steps):
                path = child_path(parent, i)
                suffix = " (sub-flow)" if isinstance(step, FlowNode) else ""
                self.width = max(self.width, 2 * depth + len(step.name + suffix))
                self.path_width = max(self.path_width, len(path))
                if isinstance(step, FlowNode):
                    walk(step, path, depth + 1)
                elif not step.has_back:
                    no_back.add(path)

        walk(plan, "", 0)
        self.no_back = frozenset(no_back)

    def catch_up(self, state: FlowState) -> None:
        """Take ``state`` as seen, without printing it: show only what comes next."""
        every = list(rows(state.steps))
        self.width = max([len(r.label) for r in every] + [self.width])
        self.path_width = max([len(r.step.path) for r in every] + [self.path_width])
        self._waiting_seen = _wait_key(state)
        self.last = state

    def _print(self, kind: str, row: Row, detail: str = "") -> None:
        self.out.print(
            event_line(
                kind,
                row,
                detail,
                width=self.width,
                symbols=self.symbols,
                path_width=self.path_width,
            )
        )

    def show(self, state: FlowState, retrying: dict[str, tuple[int, str]]) -> None:
        """Print what changed since the last state."""
        # A sub-flow's steps appear once it starts: widen the columns for them.
        every = list(rows(state.steps))
        self.width = max([len(r.label) for r in every] + [self.width])
        self.path_width = max([len(r.step.path) for r in every] + [self.path_width])
        for event in diff(self.last, state, self.no_back):
            if event.kind in ("started", "compensating"):
                self._retries.pop(event.row.step.path, None)
            self._print(event.kind, event.row, event.detail)
        by_path = {r.step.path: r for r in rows(state.steps)}
        for path, (attempt, error) in sorted(retrying.items()):
            if self._retries.get(path, 1) < attempt and path in by_path:
                self._retries[path] = attempt
                detail = f"(attempt {attempt}) after {error}" if error else f"(attempt {attempt})"
                self._print("retrying", by_path[path], detail)
        waiting = state.waiting if not state.done else None
        key = _wait_key(state)
        if waiting is not None and key != self._waiting_seen:
            for line in wait_lines(waiting, state.flow_id, self.react):
                self.out.print(line)
        self._waiting_seen = key
        self.last = state
        self._status = self._status_line(state)

    def _status_line(self, state: FlowState) -> Text:
        busy = [r for r in rows(state.steps) if r.step.status in ("running", "compensating")]
        busy = [r for r in busy if r.step.kind == "step"] or busy
        text = Text(f"{state.flow} {state.status.replace('_', ' ')}")
        if busy:
            text.append(f": {busy[-1].step.path} {busy[-1].step.name}", style="bold")
        return text

    async def follow(
        self,
        handle: FlowHandle,
        client: temporalio.client.Client,
        *,
        on_interrupt: Callable[[int], Any] | None = None,
    ) -> dict[str, Any]:
        """Follow the flow to its end: its final args, or the FlowFailed it ended with.

        Args:
            handle: The flow.
            client: The temporalio client, to see attempts in flight.
            on_interrupt: Called with 1, 2... at each SIGINT; it may raise to stop following.
        """
        result = asyncio.ensure_future(handle.result())
        interrupts = asyncio.Queue[int]()
        loop = asyncio.get_running_loop()
        count = 0

        def interrupted() -> None:
            nonlocal count
            count += 1
            interrupts.put_nowait(count)

        installed = False
        if on_interrupt is not None:
            try:
                loop.add_signal_handler(signal.SIGINT, interrupted)
                installed = True
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not main thread
                pass
        live: Live | None = None
        if self.out.is_terminal:
            spinner = Spinner("dots", text=self._status, style="cyan")
            live = Live(spinner, console=self.out, transient=True, refresh_per_second=10)
            live.start()
        try:
            unanswered_since = time.monotonic()
            hinted = False
            while not result.done():
                try:
                    state = await asyncio.wait_for(handle.state(), QUERY_TIMEOUT)
                    retrying = await running_attempts(client, state)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # No worker has answered yet, or the flow just closed.
                    if (
                        not hinted
                        and self.no_worker_hint
                        and time.monotonic() - unanswered_since > NO_WORKER_HINT_AFTER
                    ):
                        self.out.print(Text(self.no_worker_hint, style="yellow"))
                        hinted = True
                else:
                    unanswered_since = time.monotonic()
                    self.show(state, retrying)
                    if live is not None:
                        live.update(Spinner("dots", text=self._status, style="cyan"))
                waiter = asyncio.ensure_future(interrupts.get())
                done, _ = await asyncio.wait(
                    {result, waiter}, timeout=POLL_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                )
                if waiter in done and on_interrupt is not None:
                    await _maybe_await(on_interrupt(waiter.result()))
                else:
                    waiter.cancel()
            # The last changes, so the story on screen is complete.
            try:
                final = await asyncio.wait_for(handle.state(), QUERY_TIMEOUT)
                self.show(final, {})
            except Exception:
                pass
        finally:
            if live is not None:
                live.stop()
            if installed:
                loop.remove_signal_handler(signal.SIGINT)
            if not result.done():
                result.cancel()
        return result.result()


def _wait_key(state: FlowState) -> str | None:
    """Tells one wait from the next, even when no poll saw the flow between them."""
    waiting = state.waiting
    if waiting is None or state.done:
        return None
    attempts = next((r.step.attempts for r in rows(state.steps) if r.step.path == waiting.path), 0)
    return f"{waiting.flow_id}/{waiting.path}/{waiting.direction}/{attempts}"


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value
