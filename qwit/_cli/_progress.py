"""Live progress of a flow on stderr.

Every flow execution (the root, and each sub-flow: on Temporal a workflow of
its own) records each transition of its own and of its steps as a numbered
event. A few times a second the follower reads the events it has not printed
yet and prints each as a line (``▶ started``, ``✓ done``, ``↩ compensating``...),
so the same story reads on a terminal and in a log, and nothing that happened
between two looks is lost.

A sub-flow's events are printed among its parent's, where they happened: its
run between its entry's ``started`` and ``done`` (or ``failed``), its undo
between the entry's ``compensating`` and ``compensated``. Events record an
attempt when it ends; an attempt in flight, the step being retried, is told
from the flow's state, which reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from .._engine import FlowHandle
from .._errors import FlowFailed
from .._plan import FlowNode, StepNode, walk
from .._state import FlowEvent, FlowState, StepState
from ._common import EXIT_FAILED, EXIT_INTERRUPTED, Interrupted, dump_json, symbols_ok
from ._render import (
    FINAL_LABEL,
    Row,
    attempts_note,
    error_text,
    event_line,
    failure_lines,
    final_paths,
    plan_final_paths,
    rows,
    wait_lines,
)

#: Seconds between two polls of a flow's state.
POLL_INTERVAL = 0.2
#: Seconds one state query may take before the poll gives up on it.
QUERY_TIMEOUT = 5.0
#: Seconds without an answer after which the user hears that no worker answers.
NO_WORKER_HINT_AFTER = 5.0

#: Statuses of a sub-flow's entry before which the sub-flow's whole story is told.
_AFTER_SUBFLOW = frozenset({"compensated", "compensation_failed", "skipped"})


@dataclass(frozen=True)
class Event:
    """A line of progress: ``kind`` is what the step did (``started``,
    ``retrying``, or the status it went to)."""

    kind: str
    row: Row
    detail: str = ""


@dataclass
class _Execution:
    """One flow execution followed: its last state, and how far its events were read."""

    flow_id: str
    state: FlowState | None = None
    seen: int = 0
    """The ``seq`` of the last event read (0: none)."""
    subflows: dict[str, list[_Execution]] = field(default_factory=dict)
    """Its sub-flows' executions, by their entry's path, oldest first: an
    operator's retry of a sub-flow runs a new one. (A sub-flow's execution is
    known by where it runs: a nested sub-flow's id may be the same in two
    executions of its parent.)"""

    @property
    def events(self) -> list[FlowEvent]:
        return self.state.events if self.state is not None else []

    @property
    def finished(self) -> bool:
        """Ended, and every event read: nothing more to fetch."""
        return self.state is not None and self.state.done and self.seen >= len(self.state.events)


def _undo_start(child: _Execution) -> int | None:
    """The ``seq`` where a sub-flow's undo starts, if its parent started it and
    it was not read yet: what comes from there is told after the parent's own
    ``compensating`` of the entry (or its ``failed``, when the parent was
    cancelled). A sub-flow that failed undoes itself as part of its run."""
    events = child.events
    start = next((e for e in events if e.kind == "flow" and e.status == "compensating"), None)
    if start is None or start.seq <= child.seen:
        return None
    last_step = next((e for e in reversed(events[: start.seq - 1]) if e.kind == "step"), None)
    if last_step is not None and last_step.status == "failed":
        return None
    return start.seq


def _tree(execution: _Execution) -> Iterator[_Execution]:
    """An execution and its sub-flows', and theirs."""
    yield execution
    for runs in execution.subflows.values():
        for child in runs:
            yield from _tree(child)


def _of(event: FlowEvent, path: str) -> bool:
    """Whether ``event`` is one of the step at ``path``."""
    return event.kind == "step" and event.path == path


def _cancel_of(events: list[FlowEvent], event: FlowEvent) -> bool:
    """Whether ``event`` (a step's ``failed``) is the step in flight failing
    because the flow was cancelled: then the flow turned ``compensating`` just before."""
    before = events[event.seq - 2] if event.seq >= 2 else None
    return before is not None and before.kind == "flow" and before.status == "compensating"


@dataclass
class Follower:
    """Prints a flow's progress as it runs, and tells how it ended.

    Attributes:
        out: Where the progress goes (stderr).
        react: The command an operator runs to decide a waiting flow.
        no_worker_hint: What to say when no worker answers for a while.
        width: Width of the step column (the widest label seen or expected).
        path_width: Width of the path column.
        no_back: Paths of steps without a ``step_back``, whose undo is a no-op.
        finals: Paths of final steps (``finally_step``) the plan names;
            others are told from the flow's state as they run.
    """

    out: Console
    react: str | None = "qwit react"
    no_worker_hint: str = ""
    width: int = 0
    path_width: int = 1
    no_back: frozenset[str] = frozenset()
    finals: frozenset[str] = frozenset()
    symbols: bool = field(init=False)
    _root: _Execution = field(default_factory=lambda: _Execution(""))
    _owner: dict[str, _Execution] = field(default_factory=dict)
    """The execution each step path belongs to (its latest)."""
    _retries: dict[str, int] = field(default_factory=dict)
    _back_base: dict[str, int] = field(default_factory=dict)
    _status: Text = field(default_factory=Text)

    def __post_init__(self) -> None:
        self.symbols = symbols_ok(self.out)

    def expect(self, plan: FlowNode) -> None:
        """Size the columns for every step of the plan, and learn which have no undo."""
        no_back = set()
        self.finals = plan_final_paths(plan)
        for path, node, depth in walk(plan):
            suffix = {"flow": " (sub-flow)", "map": " (map)"}.get(node.kind, "")
            suffix += FINAL_LABEL if path in self.finals else ""
            self.width = max(self.width, 2 * depth + len(node.name + suffix))
            self.path_width = max(self.path_width, len(path))
            if isinstance(node, StepNode) and not node.has_back:
                no_back.add(path)
        self.no_back = frozenset(no_back)

    @property
    def state(self) -> FlowState | None:
        """The flow's own state as last read (None before any)."""
        return self._root.state

    async def catch_up(self, handle: FlowHandle, state: FlowState) -> None:
        """Take the flow as it is now as seen, without printing it: show only what comes next.

        Args:
            handle: The flow.
            state: Its state (``handle.state()``), just read.
        """
        self._root = _Execution(handle.id)
        # Best effort: a sub-flow not read now is told from its start.
        with contextlib.suppress(Exception):
            await self._fetch(handle, self._root, state)
        for execution in _tree(self._root):
            execution.seen = len(execution.events)
        self._widen(state)
        self._note_back_attempts(state)

    async def poll(self, handle: FlowHandle) -> FlowState:
        """Read the state of the flow and of each sub-flow with events still to print.

        Returns:
            The flow's state, sub-flows' steps in (as ``handle.state()`` has it).
        """
        if self._root.flow_id != handle.id:
            self._root = _Execution(handle.id)
        # The flow's own state is read until its result has come: its final
        # steps run after it has ended.
        await self._fetch(handle, self._root, awaited=True)
        return self._merged(self._root)

    async def _fetch(
        self,
        handle: FlowHandle,
        execution: _Execution,
        state: FlowState | None = None,
        *,
        awaited: bool = False,
    ) -> None:
        """Read ``execution``'s state (unless given, or it has finished and
        nothing awaits it), then its sub-flows'.

        A sub-flow whose entry still runs (or is undone) is awaited by its
        parent: it may have ended and still run its final steps.
        """
        # A parent before its sub-flows: what a sub-flow did because of its
        # parent (its undo) is then never read before the parent's cause.
        if state is not None:
            execution.state = state
        elif awaited or not execution.finished:
            execution.state = await asyncio.wait_for(
                handle.flow_state(execution.flow_id), QUERY_TIMEOUT
            )
        assert execution.state is not None
        entries = {step.path: step for step in execution.state.steps}
        for step in execution.state.steps:
            self._owner[step.path] = execution
            if step.kind == "flow" and step.flow_id:
                runs = execution.subflows.setdefault(step.path, [])
                if not runs or runs[-1].flow_id != step.flow_id:
                    runs.append(_Execution(step.flow_id))
        for path, runs in execution.subflows.items():
            entry = entries.get(path)
            busy = entry is not None and entry.status in ("running", "compensating")
            for child in runs:
                await self._fetch(handle, child, awaited=busy and child is runs[-1])

    def _merged(self, execution: _Execution) -> FlowState:
        """An execution's state with its sub-flows' steps (and waits) in."""
        state = execution.state
        assert state is not None
        steps = list(state.steps)
        waiting = state.waiting
        for i, step in enumerate(steps):
            runs = execution.subflows.get(step.path)
            if not runs or runs[-1].state is None:
                continue
            child = self._merged(runs[-1])
            steps[i] = step.model_copy(update={"steps": child.steps})
            if waiting is None and child.waiting is not None:
                waiting = child.waiting
        status = "waiting" if waiting is not None and not state.done else state.status
        return state.model_copy(update={"steps": steps, "waiting": waiting, "status": status})

    # -- which events are new, in the order they happened ---------------------

    def _read(
        self, execution: _Execution, until: int | None = None
    ) -> list[tuple[FlowEvent, _Execution]]:
        """The events of ``execution`` not read yet (those before ``until``, if
        given), each sub-flow's put among them where they happened."""
        events = execution.events
        subflows = (
            [s.path for s in execution.state.steps if s.kind == "flow"] if execution.state else []
        )
        read: list[tuple[FlowEvent, _Execution]] = []
        for event in events[execution.seen :]:
            if until is not None and event.seq >= until:
                break
            if event.kind == "step" and event.path in subflows:
                read += self._before_entry(execution, event)
            read.append((event, execution))
            execution.seen = event.seq
        # A sub-flow still running: what it did so far comes after its entry's last event.
        for path in subflows:
            last = next(
                (e.status for e in reversed(events[: execution.seen]) if _of(e, path)), None
            )
            child = self._subflow(execution, path, execution.seen)
            read += self._read_subflow(child, undo=last not in (None, "running", "done"))
        return read

    def _before_entry(
        self, parent: _Execution, event: FlowEvent
    ) -> list[tuple[FlowEvent, _Execution]]:
        """What a sub-flow did before its entry's ``event`` in ``parent``."""
        status = event.status
        if status == "running":
            # The sub-flow's earlier execution (before an operator's retry) ended before.
            return self._read_subflow(self._subflow(parent, event.path, event.seq - 1), undo=True)
        child = self._subflow(parent, event.path, event.seq)
        if status == "done":
            return self._read_subflow(child, undo=False)
        if status == "failed":
            return self._read_subflow(child, undo=not _cancel_of(parent.events, event))
        if status in _AFTER_SUBFLOW:
            return self._read_subflow(child, undo=True)
        return []  # compensating: its undo starts now

    @staticmethod
    def _subflow(parent: _Execution, path: str, upto: int) -> _Execution | None:
        """The execution of ``parent``'s sub-flow at ``path`` that its entry's
        last ``running`` up to event ``upto`` started (None: not known).

        An operator's retry of a sub-flow runs a new execution: the last one
        known goes with the entry's last run, the one before with the run
        before, and so on.
        """
        starts = [e.seq for e in parent.events if _of(e, path) and e.status == "running"]
        run = sum(1 for seq in starts if seq <= upto)
        known = parent.subflows.get(path, [])
        index = len(known) - 1 - (len(starts) - run)
        return known[index] if run and index >= 0 else None

    def _read_subflow(
        self, child: _Execution | None, *, undo: bool
    ) -> list[tuple[FlowEvent, _Execution]]:
        """The new events of a sub-flow's execution: up to its undo (unless
        ``undo``, when the parent already started it or it undid itself)."""
        if child is None or child.state is None:
            return []
        return self._read(child, None if undo else _undo_start(child))

    # -- printing ----------------------------------------------------------------

    def _widen(self, state: FlowState) -> None:
        # A sub-flow's steps appear once it starts: widen the columns for them.
        every = list(rows(state.steps, finals=self._finals(state)))
        self.width = max([len(r.label) for r in every] + [self.width])
        self.path_width = max([len(r.step.path) for r in every] + [self.path_width])

    def _finals(self, state: FlowState) -> frozenset[str]:
        """Paths of the final steps known so far: the plan's, and those the
        flow's and its sub-flows' states tell (see ``final_paths``)."""
        told = [final_paths(e.state) for e in _tree(self._root) if e.state is not None]
        return self.finals.union(final_paths(state), *told)

    def _print(self, event: Event) -> None:
        self.out.print(
            event_line(
                event.kind,
                event.row,
                event.detail,
                width=self.width,
                symbols=self.symbols,
                path_width=self.path_width,
            )
        )

    def show(self, state: FlowState) -> None:
        """Print the events since the last call, then the steps being retried.

        Args:
            state: The flow's state, as ``poll`` returned it.
        """
        self._widen(state)
        by_path = {r.step.path: r for r in rows(state.steps, finals=self._finals(state))}
        no_back = self.no_back | {p for p, r in by_path.items() if not r.step.has_back}
        for event, execution in self._read(self._root):
            if event.kind == "flow":
                if event.status == "waiting":
                    self._print_wait(event, execution)
                continue
            if event.status in ("running", "compensating"):
                self._retries.pop(event.path, None)
            found = by_path.get(event.path)
            row = found or Row(StepState(name=event.name, path=event.path), event.path.count("."))
            line = _event(event, row, execution.events, no_back)
            if line is not None:
                self._print(line)
        for line in self._retried(state):
            self._print(line)
        self._note_back_attempts(state)
        self._status = self._status_line(state)

    def _print_wait(self, event: FlowEvent, execution: _Execution) -> None:
        """What the flow waits for, if ``event`` is the wait it is still in."""
        state = execution.state
        if state is None or state.waiting is None or state.done:
            return
        last = next((e for e in reversed(state.events) if e.kind == "flow"), None)
        if last is event:
            waits = state.waits or [state.waiting]
            for waiting in waits:
                for line in wait_lines(
                    waiting, self._root.flow_id, self.react, by_path=len(waits) > 1
                ):
                    self.out.print(line)

    def _retried(self, state: FlowState) -> list[Event]:
        """A line for each step whose attempt in flight is a retry not told yet."""
        lines = []
        for row in rows(state.steps):
            step = row.step
            if step.kind != "step":
                continue
            if step.status == "running":
                attempt = step.attempts - self._attempts_at_start(step) + 1
                error = step.error
            elif step.status == "compensating":
                attempt = step.back_attempts - self._back_base.get(step.path, 0) + 1
                error = step.back_error
            else:
                continue
            if self._retries.get(step.path, 1) < attempt:
                self._retries[step.path] = attempt
                detail = f"(attempt {attempt})"
                if error is not None:
                    detail += f" after {error_text(error)}"
                lines.append(Event("retrying", row, detail))
        return lines

    def _attempts_at_start(self, step: StepState) -> int:
        """A running step's attempts when its execution started (its event says)."""
        owner = self._owner.get(step.path)
        events = owner.events if owner is not None else []
        started = (
            e
            for e in reversed(events)
            if e.kind == "step" and e.path == step.path and e.status == "running"
        )
        return next((e.attempts for e in started), step.attempts)

    def _note_back_attempts(self, state: FlowState) -> None:
        # Attempts of a step's undo before the one that runs now (an operator's
        # retry of an undo that failed): the state counts them all.
        for row in rows(state.steps):
            if row.step.status != "compensating":
                self._back_base[row.step.path] = row.step.back_attempts

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
        *,
        on_interrupt: Callable[[int], Any] | None = None,
    ) -> dict[str, Any]:
        """Follow the flow to its end: its final args, or the FlowFailed it ended with.

        Args:
            handle: The flow.
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
                    state = await self.poll(handle)
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
                    self.show(state)
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
            # The last events, so the story on screen is complete.
            with contextlib.suppress(Exception):
                self.show(await self.poll(handle))
        finally:
            if live is not None:
                live.stop()
            if installed:
                loop.remove_signal_handler(signal.SIGINT)
            if not result.done():
                result.cancel()
        return result.result()


def _event(
    event: FlowEvent, row: Row, events: list[FlowEvent], no_back: frozenset[str]
) -> Event | None:
    """The line a step's event prints (None: a no-op undo starting, not worth one)."""
    status = event.status
    if status == "running":
        earlier = events[: event.seq - 1]
        again = any(
            e.kind == "step" and e.path == event.path and e.status == "running" for e in earlier
        )
        return Event("started", row, "again" if again else "")
    if status == "done":
        return Event("done", row, attempts_note(event.attempts))
    if status == "failed":
        return Event("failed", row, f"{event.error or ''} {attempts_note(event.attempts)}".strip())
    if status == "compensating":
        return None if event.path in no_back else Event("compensating", row)
    if status == "compensated" and event.path in no_back:
        return Event("compensated", row, "(no step_back: nothing to undo)")
    if status == "compensation_failed":
        return Event(status, row, event.error or "")
    return Event(status, row)


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value


async def caught_up(
    err: Console, handle: FlowHandle, state: FlowState, react: str | None = None
) -> tuple[Follower, FlowState]:
    """A Follower that has seen the flow as ``state`` shows it now (and that
    state): it will tell only what happens next (``react``: the command that
    decides a waiting flow, as its hint says)."""
    follower = Follower(err) if react is None else Follower(err, react=react)
    await follower.catch_up(handle, state)
    return follower, state


async def follow_run(
    err: Console,
    say: Callable[[str], None],
    handle: FlowHandle,
    follower: Follower,
    *,
    flow: str,
    kept: str = "",
    verbose: bool = False,
) -> int:
    """Follow a flow ``qwit run`` started to its end: print its result (exit
    0) or its story (exit 1). A first Ctrl-C cancels it (it rolls back), a
    second stops waiting (``kept`` says where the flow stays)."""

    async def on_interrupt(count: int) -> None:
        if count > 1:
            raise Interrupted
        say("cancelling the flow: it rolls back (Ctrl-C again to stop waiting)")
        await handle.cancel()

    try:
        result = await follower.follow(handle, on_interrupt=on_interrupt)
    except FlowFailed as failed:
        for line in failure_lines(failed, flow, verbose=verbose):
            err.print(line)
        return EXIT_FAILED
    except Interrupted:
        say(f"stopped waiting; flow {handle.id} stays as it is{kept}")
        return EXIT_INTERRUPTED
    click.echo(dump_json(result))
    return 0


async def follow_to_end(
    err: Console, handle: FlowHandle, follower: Follower, state: FlowState | None = None
) -> int:
    """Follow a flow to its end with ``follower``; print its result or its story.

    Only what happens after ``state``, which the follower caught up with, is
    shown: the operator saw the rest (without it, everything the follower
    reads is).
    """

    async def on_interrupt(count: int) -> None:
        raise Interrupted

    try:
        result = await follower.follow(handle, on_interrupt=on_interrupt)
    except FlowFailed as failed:
        seen = follower.state or state
        flow = seen.flow if seen is not None else ""
        redrive_of = seen.redrive_of if seen is not None else None
        for line in failure_lines(failed, flow, redrive_of=redrive_of):
            err.print(line)
        return EXIT_FAILED
    except Interrupted:
        return EXIT_INTERRUPTED
    click.echo(dump_json(result))
    return 0
