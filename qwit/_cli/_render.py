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
from .._state import FlowState, StepState, WaitInfo

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


@dataclass(frozen=True)
class Row:
    """One step of a flow, flattened: sub-flows' steps follow their entry."""

    step: StepState
    depth: int

    @property
    def label(self) -> str:
        suffix = {"flow": " (sub-flow)", "map": " (map)"}.get(self.step.kind, "")
        return "  " * self.depth + self.step.name + suffix


def rows(steps: list[StepState], depth: int = 0) -> Iterator[Row]:
    """Every step in plan order, sub-flows' steps after their entry, indented."""
    for step in steps:
        yield Row(step, depth)
        yield from rows(step.steps, depth + 1)


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


def display_rows(steps: list[StepState], depth: int = 0) -> Iterator[Row]:
    """``rows``, with each map of more than ``MAP_ROWS`` elements summarised:
    a line of counts by status, then only its elements that failed."""
    for step in steps:
        yield Row(step, depth)
        elements = map_elements(step) if step.kind == "map" else []
        if len(elements) <= MAP_ROWS:
            yield from display_rows(step.steps, depth + 1)
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
    react: str = "qwit react",
    *,
    preview: bool = False,
    by_path: bool = False,
) -> list[Text]:
    """What a waiting flow waits for, and the commands that decide it.

    Args:
        waiting: The wait.
        flow_id: The flow's id, for the commands.
        react: How to call ``qwit react`` from another terminal.
        preview: List what a rollback would undo with each step's args
            (else one line of names).
        by_path: Several steps wait: the commands name this one's path.
    """
    head = Text()
    head.append("flow waits for an operator", style=STATUS_STYLE["waiting"])
    undo = " (its step_back)" if waiting.direction == "step_back" else ""
    head.append(f" at step {waiting.path} {waiting.step!r}{undo}: {waiting.error.describe()}")
    lines = [head]
    for reaction in waiting.allowed:
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


def failure_lines(failed: FlowFailed, flow: str, *, verbose: bool = False) -> list[Text]:
    """The story of a failed flow: which step, why, what was undone (or not).

    Args:
        failed: How the flow ended.
        flow: The flow's name.
        verbose: Show where the failing step raised its error (its
            traceback), and where each undo that failed raised its own.
    """
    kind = failed.kind.replace("_", " ")
    head = Text()
    head.append(f"flow {flow!r} {kind}", style=STATUS_STYLE.get(failed.kind, "red"))
    head.append(f" (id {failed.flow_id})")
    lines = [head]
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
        if verbose:
            for undo in failed.compensations:
                if undo.status == "compensation_failed":
                    title = f"traceback of the undo of step {undo.path} {undo.name!r}"
                    lines += traceback_lines(title, undo.error)
    if isinstance(failed, FlowAborted):
        lines.append(Text("  aborted: nothing was undone"))
    if isinstance(failed, FlowCancelled) and not failed.step:
        lines.append(Text("  it was cancelled between steps"))
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


def state_view(state: FlowState, *, verbose: bool = False) -> Group:
    """``qwit status``: the flow, its steps in plan order, its wait or outcome.

    Args:
        state: The flow's state.
        verbose: Show where each step's error was raised (its traceback).
    """
    head = Text()
    head.append("flow ", style="dim")
    head.append(state.flow, style="bold")
    head.append("  id ", style="dim")
    head.append(state.flow_id)
    head.append("  status ", style="dim")
    head.append_text(status_text(state.status))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("path", "step", "status", "attempts", "error"):
        table.add_column(column, justify="right" if column == "attempts" else "left")
    for row in display_rows(state.steps):
        step = row.step
        attempts = str(step.attempts)
        error = error_text(step.error) if step.error else ""
        retrying = _retrying(step)
        if retrying is not None:
            attempt, last = retrying
            attempts = f"{attempt} (retrying)"
            error = error or error_text(last)
        table.add_row(step.path, row.label, status_text(step.status), attempts, error)
    parts: list[RenderableType] = [head, table]
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
            parts.extend(wait_lines(waiting, state.flow_id, preview=True, by_path=len(waits) > 1))
    if state.failure is not None:
        parts.append(Text())
        # The steps' tracebacks are above, with the table.
        parts.extend(failure_lines(FlowFailed.from_info(state.failure), state.flow))
    return Group(*parts)
