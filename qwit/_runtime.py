"""What an engine supplies to the saga rules, and what they hand back.

``FlowRuntime`` is how one flow's steps run, its sub-flows start and it waits
for signals, on one engine; ``SubflowRun`` is a sub-flow seen from its parent;
``Decision`` is an operator's answer; ``FlowFailure`` is how a flow that did
not complete ends. The rules themselves are in ``qwit._saga``.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ._errors import ErrorInfo, FailureInfo
from ._options import Reaction
from ._plan import FlowInput, FlowNode, StepCall, StepNode, StepReturn
from ._state import FlowStatus

T = TypeVar("T")


class FlowFailure(Exception):
    """A sub-flow ended without completing; it has already undone itself."""

    def __init__(self, info: FailureInfo) -> None:
        super().__init__(info.reason)
        self.info = info


class SubflowStartCancelled(asyncio.CancelledError):
    """The flow, or the branch starting a sub-flow, was cancelled while the
    sub-flow started. ``sub`` is the sub-flow if it did start: it runs, and
    is stopped (and undoes itself) like any other sub-flow in flight."""

    def __init__(self, sub: SubflowRun | None) -> None:
        super().__init__()
        self.sub = sub


class Decision(BaseModel):
    """An operator's answer to a waiting flow."""

    model_config = ConfigDict(frozen=True)

    reaction: Reaction
    args: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    """The waiting step it decides (None: the only one that waits)."""


class SubflowRun(ABC):
    """A sub-flow started by an engine, seen from its parent."""

    flow_id: str
    held: bool = False
    """The sub-flow aborted, kept its effects, and waits for ``settle``:
    keep them (commit) or undo them (as its parent's rollback or cancel must)."""

    @abstractmethod
    async def forward(self) -> dict[str, Any]:
        """Wait until the sub-flow's steps have all run; return their outputs.

        Raises:
            FlowFailure: the sub-flow failed (and undid itself), or aborted
                (then, if it was started with ``abort_held``, ``held`` is set
                and it waits for ``settle``).
        """

    @abstractmethod
    async def settle(self, commit: bool) -> FailureInfo | None:
        """End a sub-flow whose steps have run: keep its effects (``commit``),
        or undo them and return how that went."""

    async def grant_place(self) -> None:
        """Let a sub-flow that gave back its place under its block's
        ``max_concurrency`` (``FlowRuntime.report_place``) go on: it has one
        again (engines whose runtime ``gives_places``)."""
        raise NotImplementedError

    @abstractmethod
    async def cancel(self, rollback: bool = True) -> FailureInfo:
        """Cancel a sub-flow in flight and wait until it has undone itself
        (with ``rollback=False``: until it has stopped where it was)."""


class FlowRuntime(ABC):
    """What an engine supplies to run one flow with the saga rules."""

    engine: str = ""
    tracing: bool = False
    """Whether the flow's spans are emitted (see ``qwit._tracing``)."""
    metered: bool = True
    """Whether ``record`` keeps anything: False lets a flow skip its metrics."""

    @abstractmethod
    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        """Run one direction of a step, retries included.

        Raises:
            StepFailure: the retries are spent, or the error is not retryable.
            asyncio.CancelledError: the flow was cancelled while the step ran;
                the step has stopped by the time this is raised.
        """

    @abstractmethod
    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        """Start a sub-flow (``attempt`` counts operator retries, from 1); its
        id is ``child_flow_id(input, input.path, attempt)``.

        Raises:
            StepFailure: the sub-flow could not start (e.g. its id is taken);
                the parent treats it as the failure of that step.
            SubflowStartCancelled: the flow was cancelled while the sub-flow
                started; raised once the start is decided, with the sub-flow
                if it started.
        """

    @abstractmethod
    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true (re-checked as signals arrive)."""

    @abstractmethod
    def cancel_requested(self) -> bool:
        """Whether someone asked to cancel this flow."""

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:  # noqa: B027
        """A sub-flow's steps have all run: tell the parent (sub-flows only)."""

    async def report_aborted(self, info: FailureInfo) -> None:
        """A sub-flow started with ``abort_held`` aborted: tell the parent,
        whose ``SubflowRun.forward`` raises ``FlowFailure(info)`` with
        ``held`` set (sub-flows only)."""
        raise NotImplementedError

    #: Whether a sub-flow of this engine can give back its place under its
    #: block's ``max_concurrency`` while a step in it waits (it then
    #: implements ``report_place``, and its ``SubflowRun`` ``grant_place``).
    gives_places = False

    async def report_place(self, wanted: bool) -> None:
        """A sub-flow started with ``gives_place`` tells its parent that it
        gives back its place (False: a step in it waits for an operator) or
        wants it again (True: it goes on once the parent's ``grant_place``
        comes). The parent's engine hands it to its interpreter's
        ``subflow_place``."""
        raise NotImplementedError

    def record(self, metric: str, value: float, **labels: str) -> None:  # noqa: B027
        """Record ``value`` in ``metric`` (one of ``qwit._metrics.METRICS``),
        with its labels; engines without metrics ignore it."""

    def now(self) -> float:
        """Seconds on the flow's clock (deterministic where the engine
        replays): what durations are measured with."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a durable timer where the engine has them: on
        Temporal, ``asyncio.sleep`` in a workflow is one)."""
        await asyncio.sleep(seconds)

    def patched(self, change: str) -> bool:
        """Whether this flow runs with ``change`` to what its engine records
        (Temporal: ``workflow.patched``, so that older histories replay as
        they ran); engines without recorded histories always do."""
        return True

    def status_changed(self, status: FlowStatus) -> None:  # noqa: B027
        """The flow's status changed (to publish it, e.g. for search)."""

    def refuse_forward(self, call: StepCall | FlowInput, pending_undos: int) -> ErrorInfo | None:
        """Why the engine can't run this ``step_forward`` (or start this
        sub-flow) now, or None.

        An engine with hard limits (payload size, history length) refuses a
        step here, before anything runs, so the flow fails that step and rolls
        back while it still can. ``pending_undos`` is how many undos a rollback
        would run.
        """
        return None

    async def shield(self, work: Awaitable[T]) -> T:
        """Run ``work`` (a coroutine, or a future already running) to its end
        even if the flow is cancelled meanwhile."""
        task = asyncio.ensure_future(work)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    return task.result()


__all__ = ["Decision", "FlowFailure", "FlowRuntime", "SubflowRun", "SubflowStartCancelled"]
