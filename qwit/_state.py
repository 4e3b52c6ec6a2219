"""What ``handle.state()`` reports about a flow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ._errors import ErrorInfo, FailureInfo, ReactionError

FlowStatus = Literal[
    "running",
    "compensating",
    "waiting",
    "completed",
    "rolled_back",
    "cancelled",
    "compensation_failed",
    "aborted",
]
StepStatus = Literal[
    "pending",
    "running",
    "done",
    "failed",
    "skipped",
    "compensating",
    "compensated",
    "compensation_failed",
]

#: Flow statuses after which nothing more happens.
FINAL_STATUSES: frozenset[str] = frozenset(
    {"completed", "rolled_back", "cancelled", "compensation_failed", "aborted"}
)
#: Flow statuses that end a flow without completing it.
FAILED_STATUSES: frozenset[str] = FINAL_STATUSES - {"completed"}


#: Step statuses of its undo: an event with one counts the undo's attempts.
UNDO_STATUSES: frozenset[str] = frozenset({"compensating", "compensated", "compensation_failed"})
#: Step statuses that come with an error.
ERROR_STATUSES: frozenset[str] = frozenset({"failed", "compensation_failed"})


class FlowEvent(BaseModel):
    """One transition of a flow or of one of its steps, in the order they happened.

    A flow's ``state().events`` lists them all, numbered from 1, so a watcher
    prints what is new since the last number it saw instead of guessing the
    transitions it missed between two looks.
    """

    model_config = ConfigDict(frozen=True)

    seq: int
    kind: Literal["flow", "step"]
    path: str
    """The step's path ('' for the flow itself)."""
    name: str
    status: str
    """The status it went to (a FlowStatus or a StepStatus)."""
    attempts: int = 0
    """The step's forward attempts; with an undo's status, its undo's."""
    error: str | None = None
    """With ``failed`` and ``compensation_failed``: the error, in words."""


class PreviewItem(BaseModel):
    """A step a rollback would undo, with the args its ``step_back`` would get."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    args: dict[str, Any] = Field(default_factory=dict)


class StepState(BaseModel):
    """One step of a flow, in plan order.

    A sub-flow appears as one entry whose ``steps`` lists its own steps; a
    parallel block, as one whose ``steps`` are its branches (paths ``n.1``,
    ``n.2``...); a map, as one whose ``steps`` are its elements, once it
    has started (element i has the path ``n.(i+1)`` and ``index`` i).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    status: StepStatus = "pending"
    attempts: int = 0
    """Attempts of its ``step_forward`` that have ended (failed, done, or
    stopped by a cancel), and of its ``step_fallback`` if it fell back; one
    in flight counts once it ends."""
    kind: Literal["step", "flow", "parallel", "map"] = "step"
    """A step, a sub-flow, a parallel block or a map."""
    has_back: bool = True
    """False for a step without ``step_back``: its undo does nothing."""
    error: ErrorInfo | None = None
    """What its ``step_forward`` (or sub-flow) failed with, last."""
    back_attempts: int = 0
    """Attempts of its ``step_back`` so far."""
    back_error: ErrorInfo | None = None
    """What its ``step_back`` failed with, last (the flow's own failure stays
    in ``error``)."""
    flow_id: str | None = None
    """For a sub-flow: the id of the engine's execution that runs it."""
    index: int | None = None
    """For an element of a map: its 0-based index in the list."""
    final: bool = False
    """A final step (``finally_step``): it runs once the flow has ended."""
    steps: list[StepState] = Field(default_factory=list)
    """A sub-flow's steps, a parallel block's branches or a map's elements."""
    rollback_after: list[PreviewItem] = Field(default_factory=list)
    """For a sub-flow that runs, whose failure rolls this flow back: what
    this flow's rollback would undo once the sub-flow has undone itself, in
    order. ``handle.state()`` appends it to the rollback preview of a wait
    inside the sub-flow."""


class WaitInfo(BaseModel):
    """Why a flow is waiting for an operator."""

    model_config = ConfigDict(frozen=True)

    step: str
    path: str
    flow_id: str
    """Id of the execution that waits (a sub-flow's, when the wait is in one)."""
    direction: Literal["step_forward", "step_back"]
    error: ErrorInfo
    allowed: list[str]
    """Reactions ``handle.react`` accepts here."""
    rollback_preview: list[PreviewItem] = Field(default_factory=list)
    """What ROLLBACK would undo, in the order it would undo it."""


def path_key(path: str) -> tuple[int, ...]:
    """A step's path as numbers, for plan order ('10' after '9'; a shard's
    ``n@k`` sorts with its map)."""
    return tuple(int(part) for part in path.split(".") if part.isdigit())


def choose_wait(flow_id: str, waits: list[WaitInfo], path: str | None) -> WaitInfo:
    """The wait a decision for ``path`` is for (``path`` None: the only one).

    Raises:
        ReactionError: nothing waits, nothing waits at ``path``, or several
            wait and ``path`` is None.
    """
    if not waits:
        raise ReactionError(f"flow {flow_id!r} is not waiting")
    paths = ", ".join(w.path for w in waits)
    if path is None:
        if len(waits) > 1:
            raise ReactionError(
                f"flow {flow_id!r}: {len(waits)} steps wait (paths {paths}): "
                "name the one this decides (path=...)"
            )
        return waits[0]
    for waiting in waits:
        if waiting.path == path:
            return waiting
    raise ReactionError(f"flow {flow_id!r}: no step waits at path {path!r} (waiting: {paths})")


class FlowState(BaseModel):
    """A flow's progress, as ``handle.state()`` returns it."""

    model_config = ConfigDict(frozen=True)

    flow: str
    flow_id: str
    status: FlowStatus
    steps: list[StepState]
    waiting: WaitInfo | None = None
    """What waits for an operator (the first in plan order, if several do)."""
    waits: list[WaitInfo] = Field(default_factory=list)
    """Every step that waits for an operator, in plan order: branches of a
    parallel block (or elements of a map) may wait at once; ``react`` names
    the one it decides with ``path=``."""
    failure: FailureInfo | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    """The flow's current args (its result, once completed)."""
    events: list[FlowEvent] = Field(default_factory=list)
    """The flow's own transitions and its steps', in order (a sub-flow's
    steps' are in its own state)."""
    redrive_of: str | None = None
    """For a redriven flow: the run it redrives (on Temporal, its run id)."""

    @property
    def done(self) -> bool:
        """True once the flow has ended, one way or another."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class AttemptsInFlight:
    """What an engine knows of a step it retries that the flow learns only
    once the step's attempts end: how many of them have ended so far, and
    how the last one failed."""

    step: str | None
    """The step's name (None: not known; then its ``path`` is)."""
    direction: Literal["step_forward", "step_back"]
    ended: int
    error: ErrorInfo | None = None
    path: str | None = None
    """The step's path; None when the engine does not know it: then it is
    the only step of that name running in that direction."""


def with_attempts_in_flight(state: FlowState, flights: Sequence[AttemptsInFlight]) -> FlowState:
    """``state`` with the attempts of the steps being retried counted (see
    ``StepState.attempts``) as the engine sees them."""
    flights = [f for f in flights if f.ended > 0]
    if not flights:
        return state
    live = {"step_forward": "running", "step_back": "compensating"}

    def steps_of(steps: list[StepState]) -> Iterator[StepState]:
        for step in steps:
            yield step
            yield from steps_of(step.steps)

    found: dict[str, AttemptsInFlight] = {}
    for flight in flights:
        matches = [
            s.path
            for s in steps_of(state.steps)
            if s.kind == "step"
            and flight.step in (None, s.name)
            and s.status == live[flight.direction]
            and flight.path in (None, s.path)
        ]
        if len(matches) == 1:
            found[matches[0]] = flight

    def counted(step: StepState) -> StepState:
        update: dict[str, Any] = {}
        if step.steps:
            update["steps"] = [counted(s) for s in step.steps]
        flight = found.get(step.path)
        if flight is not None and flight.direction == "step_forward":
            update["attempts"] = step.attempts + flight.ended
            update["error"] = flight.error or step.error
        elif flight is not None:
            update["back_attempts"] = step.back_attempts + flight.ended
            update["back_error"] = flight.error or step.back_error
        return step.model_copy(update=update) if update else step

    return state.model_copy(update={"steps": [counted(s) for s in state.steps]})
