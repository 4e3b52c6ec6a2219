"""How the command line shows flows: step lines, tables, waits and outcomes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .._errors import (
    CompensationFailed,
    ErrorInfo,
    FlowAborted,
    FlowCancelled,
    FlowFailed,
    FlowRolledBack,
)
from .._plan import FlowNode, child_path, walk
from .._state import FINAL_STATUSES, FlowState, StepState, WaitInfo

#: Style of each flow and step status.
STATUS_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "done": "green",
    "completed": "green",
    "failed": "red",
    "skipped": "yellow",
    "waiting": "yellow bold",
    "compensating": "magenta",
    "compensated": "magenta",
    "rolled_back": "magenta",
    "cancelled": "magenta",
    "compensation_failed": "red bold",
    "aborted": "red",
}

#: Progress events: (symbol, ASCII symbol, style).
EVENT_LOOK = {
    "started": ("▶", ">", "cyan"),
    "retrying": ("↻", "~", "yellow"),
    "done": ("✓", "+", "green"),
    "failed": ("✗", "x", "red"),
    "skipped": ("↷", "-", "yellow"),
    "waiting": ("⏸", "=", "yellow bold"),
    "compensating": ("↩", "<", "magenta"),
    "compensated": ("↺", "<", "magenta"),
    "compensation_failed": ("✗", "!", "red bold"),
}


#: The label of a final step (``finally_step``), after its name.
FINAL_LABEL = " (final)"


@dataclass(frozen=True)
class Row:
    """One step of a flow, flattened: sub-flows' steps follow their entry.

    Attributes:
        step: The step.
        depth: How deep it is: 0 for the flow's own steps.
        final: It is one of the flow's final steps (``finally_step``).
    """

    step: StepState
    depth: int
    final: bool = False

    @property
    def label(self) -> str:
        suffix = {"flow": " (sub-flow)", "map": " (map)"}.get(self.step.kind, "")
        return "  " * self.depth + self.step.name + suffix + (FINAL_LABEL if self.final else "")


def rows(
    steps: list[StepState], depth: int = 0, finals: frozenset[str] = frozenset()
) -> Iterator[Row]:
    """Every step in plan order, sub-flows' steps after their entry, indented.

    Args:
        steps: The steps (``FlowState.steps``).
        depth: The depth of ``steps``.
        finals: Paths of final steps, labelled so (see ``final_paths``).
    """
    for step in steps:
        yield Row(step, depth, step.path in finals)
        yield from rows(step.steps, depth + 1, finals)


def final_paths(state: FlowState) -> frozenset[str]:
    """Paths of the flow's final steps (``finally_step``) that its state tells.

    The state of this QWIT marks them (``final``), its sub-flows' states
    too. That of an older QWIT does not: there a final step is told by what
    it did: it started after the flow had ended (its events say), or it
    failed (the flow's failure lists it); one that has not run yet is not
    told from a step not reached.
    """
    found: set[str] = {step.path for step in state.steps if step.final}
    if state.failure is not None:
        found.update(final.path for final in state.failure.final_failures)
    ended = next(
        (e.seq for e in state.events if e.kind == "flow" and e.status in FINAL_STATUSES), None
    )
    if ended is not None:
        found.update(
            e.path
            for e in state.events
            if e.seq > ended and e.kind == "step" and e.status == "running"
        )
    return frozenset(found)


def plan_final_paths(plan: FlowNode) -> frozenset[str]:
    """Paths of the final steps of ``plan`` and of its sub-flows (not those
    of a map's elements, whose paths the plan does not number)."""
    flows: list[tuple[str, FlowNode]] = [("", plan)]
    flows += [(path, node) for path, node, _ in walk(plan) if isinstance(node, FlowNode)]
    return frozenset(
        child_path(path, len(node.steps) + i)
        for path, node in flows
        if "*" not in path
        for i in range(len(node.finally_steps))
    )


#: A map with more elements than this is summarised by ``qwit status``.
MAP_ROWS = 20


def map_elements(step: StepState) -> list[StepState]:
    """A map's elements, through its shards (each a sub-flow mapping a part)."""
    found: list[StepState] = []
    for inner in step.steps:
        if inner.kind == "flow" and inner.steps and inner.steps[0].kind == "map":
            found.extend(map_elements(inner.steps[0]))
        else:
            found.append(inner)
    return found


def display_rows(
    steps: list[StepState], depth: int = 0, finals: frozenset[str] = frozenset()
) -> Iterator[Row]:
    """``rows``, with each map of more than ``MAP_ROWS`` elements summarised:
    a line of counts by status, then only its elements that failed."""
    for step in steps:
        yield Row(step, depth, step.path in finals)
        elements = map_elements(step) if step.kind == "map" else []
        if len(elements) <= MAP_ROWS:
            yield from display_rows(step.steps, depth + 1, finals)
            continue
        counts: dict[str, int] = {}
        for element in elements:
            counts[element.status] = counts.get(element.status, 0) + 1
        summary = ", ".join(f"{n:,} {status.replace('_', ' ')}" for status, n in counts.items())
        yield Row(
            StepState(
                name=f"{len(elements):,} elements: {summary}",
                path=f"{step.path}.*",
                status=step.status,
            ),
            depth + 1,
        )
        failed = [e for e in elements if e.status in ("failed", "compensation_failed")]
        for element in failed[:MAP_ROWS]:
            yield Row(element, depth + 1)
        if len(failed) > MAP_ROWS:
            yield Row(
                StepState(name=f"... and {len(failed) - MAP_ROWS:,} more failed", path=""),
                depth + 1,
            )


def event_line(
    kind: str, row: Row, detail: str, *, width: int, symbols: bool, path_width: int = 4
) -> Text:
    """``✓ 2  payments.charge  done``: one step event."""
    symbol, ascii_symbol, style = EVENT_LOOK[kind]
    line = Text()
    line.append(f"{symbol if symbols else ascii_symbol} ", style=style)
    line.append(f"{row.step.path:<{path_width}} ", style="dim")
    line.append(f"{row.label:<{width}} ")
    line.append(kind.replace("_", " "), style=style)
    if detail:
        line.append(f": {detail}" if kind in ("failed", "compensation_failed") else f" {detail}")
    return line


def attempts_note(attempts: int) -> str:
    """``(3 attempts)`` when a step needed more than one."""
    return f"({attempts} attempts)" if attempts > 1 else ""


def error_text(error: ErrorInfo) -> str:
    """``Type: message``, once: the last failure of an attempt in flight, as
    Temporal reports it, may carry the class name in its message already."""
    text = error.describe()
    name = error.type.rsplit(".", 1)[-1]
    doubled = f"{name}: {name}: "
    return text[len(name) + 2 :] if text.startswith(doubled) else text


def status_text(status: str) -> Text:
    """A status word in its colour."""
    return Text(status.replace("_", " "), style=STATUS_STYLE.get(status, ""))


def wait_lines(
    waiting: WaitInfo,
    flow_id: str,
    react: str | None = "qwit react",
    *,
    preview: bool = False,
    by_path: bool = False,
) -> list[Text]:
    """What a waiting flow waits for, and the commands that decide it.

    Args:
        waiting: The wait.
        flow_id: The flow's id, for the commands.
        react: How to call ``qwit react`` from another terminal (None: no
            other process can reach the flow: it runs in this ``qwit run``).
        preview: List what a rollback would undo with each step's args
            (else one line of names).
        by_path: Several steps wait: the commands name this one's path.
    """
    head = Text()
    head.append("flow waits for an operator", style=STATUS_STYLE["waiting"])
    undo = " (its step_back)" if waiting.direction == "step_back" else ""
    head.append(f" at step {waiting.path} {waiting.step!r}{undo}: {waiting.error.describe()}")
    lines = [head]
    if react is None:
        lines.append(
            Text(
                "    qwit react can't reach a flow of qwit.local, which lives in this "
                "process: Ctrl-C cancels it (and rolls it back)",
                style="bold",
            )
        )
    for reaction in waiting.allowed if react is not None else ():
        extra = " [--args JSON]" if reaction == "retry" else ""
        if by_path:
            extra = f" --path {waiting.path}{extra}"
        lines.append(Text(f"    {react} {flow_id} {reaction}{extra}", style="bold"))
    if waiting.rollback_preview and preview:
        lines.append(Text("  a rollback would undo, newest first, with these args:"))
        for item in waiting.rollback_preview:
            lines.append(
                Text(f"    {item.path:<6} {item.name}  {json.dumps(item.args)}", style="dim")
            )
    elif waiting.rollback_preview:
        undone = ", ".join(item.name for item in waiting.rollback_preview)
        lines.append(Text(f"  a rollback would undo, newest first: {undone}", style="dim"))
    return lines


def traceback_lines(title: str, error: ErrorInfo | None, indent: str = "    ") -> list[Text]:
    """Where a step raised its error: a title, then the traceback, indented.

    Nothing when the error carries no traceback (it was not raised by the
    step's own code: a timeout, a step no worker serves).
    """
    if error is None or not error.traceback.strip():
        return []
    lines = [Text(f"{indent[:-2]}{title}:", style="dim")]
    lines += [Text(indent + line, style="dim") for line in error.traceback.rstrip().splitlines()]
    return lines


def redrive_line(run_id: str) -> Text:
    """``redrive of run RUN_ID``: the run a redriven flow runs again."""
    return Text(f"redrive of run {run_id}", style="dim")


def final_failure_line(path: str, name: str, error: ErrorInfo | None) -> Text:
    """A final step that failed (the flow's outcome stands)."""
    why = f": {error_text(error)}" if error is not None else ""
    return Text(f"  final step {path} {name!r} failed{why}", style="red")


def failure_lines(
    failed: FlowFailed, flow: str, *, verbose: bool = False, redrive_of: str | None = None
) -> list[Text]:
    """The story of a failed flow: which step, why, what was undone (or
    not), and its final steps that failed.

    Args:
        failed: How the flow ended.
        flow: The flow's name ("" when not known).
        verbose: Show where the failing step raised its error (its
            traceback), and where each undo that failed raised its own.
        redrive_of: For a redriven flow, the run it redrives.
    """
    kind = failed.kind.replace("_", " ")
    head = Text()
    named = f"flow {flow!r}" if flow else "flow"
    head.append(f"{named} {kind}", style=STATUS_STYLE.get(failed.kind, "red"))
    head.append(f" (id {failed.flow_id})")
    lines = [head]
    if redrive_of:
        lines.append(Text(f"  redrive of run {redrive_of}", style="dim"))
    if failed.step:
        lines.append(Text(f"  failed step: {failed.step!r}"))
    lines.append(Text(f"  reason: {failed.reason}"))
    if verbose:
        lines += traceback_lines(f"traceback of step {failed.step!r}", failed.info.error)
    if isinstance(failed, FlowCancelled) and not failed.rolled_back:
        lines.append(Text("  cancelled without rollback: nothing was undone"))
    elif isinstance(failed, (FlowRolledBack, CompensationFailed)):
        undone = ", ".join(failed.compensated) or "nothing (no step had completed)"
        lines.append(Text(f"  undone, newest first: {undone}"))
    if isinstance(failed, CompensationFailed):
        lines.append(
            Text(
                "  could not undo: "
                + ", ".join(failed.failed_compensations)
                + " (undo these by hand)",
                style="red bold",
            )
        )
        if failed.not_compensated:
            left = ", ".join(failed.not_compensated)
            lines.append(
                Text(
                    f"  left as they were: {left} (the rollback stopped at the undo that failed)",
                    style="red",
                )
            )
        if verbose:
            for undo in failed.compensations:
                if undo.status == "compensation_failed":
                    title = f"traceback of the undo of step {undo.path} {undo.name!r}"
                    lines += traceback_lines(title, undo.error)
    if isinstance(failed, FlowAborted):
        lines.append(Text("  aborted: nothing was undone"))
    if isinstance(failed, FlowCancelled) and not failed.step:
        lines.append(Text("  it was cancelled between steps"))
    for final in failed.final_failures:
        lines.append(final_failure_line(final.path, final.name, final.error))
        if verbose:
            title = f"traceback of final step {final.path} {final.name!r}"
            lines += traceback_lines(title, final.error)
    return lines


def _retrying(step: StepState) -> tuple[int, ErrorInfo] | None:
    """The attempt in flight of a step being retried, and the last error.

    The state counts an attempt in flight's failed predecessors (on Temporal,
    from its pending activity), and names the last one's error.
    """
    if step.kind == "step" and step.status == "running" and step.error is not None:
        return step.attempts + 1, step.error
    if step.kind == "step" and step.status == "compensating" and step.back_error is not None:
        return step.back_attempts + 1, step.back_error
    return None


def state_view(state: FlowState, *, verbose: bool = False, react: str = "qwit react") -> Group:
    """``qwit status``: the flow, its steps in plan order, its wait or outcome.

    Args:
        state: The flow's state.
        verbose: Show where each step's error was raised (its traceback).
        react: How to call ``qwit react`` for this flow's engine.
    """
    head = Text()
    head.append("flow ", style="dim")
    head.append(state.flow, style="bold")
    head.append("  id ", style="dim")
    head.append(state.flow_id)
    head.append("  status ", style="dim")
    head.append_text(status_text(state.status))
    parts: list[RenderableType] = [head]
    if state.redrive_of:
        parts.append(redrive_line(state.redrive_of))
    finals = final_paths(state)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("path", "step", "status", "attempts", "error"):
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for row in display_rows(state.steps, finals=finals):
        step = row.step
        attempts = str(step.attempts)
        error = error_text(step.error) if step.error else ""
        retrying = _retrying(step)
        if retrying is not None:
            attempt, last = retrying
            attempts = f"{attempt} (retrying)"
            error = error or error_text(last)
        table.add_row(step.path, row.label, status_text(step.status), attempts, error)
    parts.append(table)
    if verbose:
        for row in rows(state.steps):
            step = row.step
            for title, raised in (
                (f"traceback of step {step.path} {step.name!r}", step.error),
                (f"traceback of the undo of step {step.path} {step.name!r}", step.back_error),
            ):
                found = traceback_lines(title, raised)
                if found:
                    parts.append(Text())
                    parts.extend(found)
    waits = state.waits or ([state.waiting] if state.waiting is not None else [])
    if waits and not state.done:
        for waiting in waits:
            parts.append(Text())
            parts.extend(
                wait_lines(waiting, state.flow_id, react, preview=True, by_path=len(waits) > 1)
            )
    if state.failure is not None:
        parts.append(Text())
        # The steps' tracebacks are above, with the table.
        parts.extend(failure_lines(FlowFailed.from_info(state.failure), state.flow))
    elif state.status == "completed":
        every = rows(state.steps, finals=finals)
        failed_finals = [r.step for r in every if r.final and r.step.status == "failed"]
        if failed_finals:
            parts.append(Text())
            head = Text()
            head.append(f"flow {state.flow!r} completed", style=STATUS_STYLE["completed"])
            head.append(f" (id {state.flow_id}); final steps change no outcome")
            parts.append(head)
            for step in failed_finals:
                parts.append(final_failure_line(step.path, step.name, step.error))
    return Group(*parts)
