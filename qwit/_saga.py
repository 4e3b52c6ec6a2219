"""The saga rules, written once for every engine.

``Interpreter`` runs one flow of a plan: it merges args, runs each step
through the engine's ``FlowRuntime``, chooses the reaction to a failure,
waits for an operator's decision, and undoes completed steps newest first.
It holds everything ``handle.state()`` reports. An engine supplies only how a
step runs, how a sub-flow runs, and how the flow waits; the Temporal workflow
and the in-process engine both drive this same class.

The interpreter must stay deterministic: it runs inside Temporal's workflow
sandbox, so it reads no clock, no randomness and no I/O of its own.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ._errors import (
    Compensation,
    ErrorInfo,
    FailureInfo,
    FailureKind,
    PayloadTooLarge,
    ReactionError,
    StepFailure,
    error_info,
)
from ._jsonargs import NotJSON, as_args, json_size
from ._options import (
    ABORT,
    RETRY,
    ROLLBACK,
    SKIP,
    SKIPBACK,
    WAIT,
    Reaction,
    parse_reaction,
)
from ._plan import (
    PAYLOAD_MARGIN,
    FlowInput,
    FlowNode,
    Node,
    StepCall,
    StepNode,
    StepReturn,
    child_execution,
    child_path,
    forward_key,
)
from ._state import FlowState, FlowStatus, PreviewItem, StepState, StepStatus, WaitInfo

T = TypeVar("T")

FORWARD_DECISIONS = [RETRY, SKIP, SKIPBACK, ROLLBACK, ABORT]
BACK_DECISIONS = [RETRY, SKIP]


class FlowFailure(Exception):
    """A sub-flow ended without completing; it has already undone itself."""

    def __init__(self, info: FailureInfo) -> None:
        super().__init__(info.reason)
        self.info = info


class Decision(BaseModel):
    """An operator's answer to a waiting flow."""

    model_config = ConfigDict(frozen=True)

    reaction: Reaction
    args: dict[str, Any] = Field(default_factory=dict)


class SubflowRun(ABC):
    """A sub-flow started by an engine, seen from its parent."""

    flow_id: str

    @abstractmethod
    async def forward(self) -> dict[str, Any]:
        """Wait until the sub-flow's steps have all run; return their outputs.

        Raises:
            FlowFailure: the sub-flow failed (and undid itself).
        """

    @abstractmethod
    async def settle(self, commit: bool) -> FailureInfo | None:
        """End a sub-flow whose steps have run: keep its effects (``commit``),
        or undo them and return how that went."""

    @abstractmethod
    async def cancel(self) -> FailureInfo:
        """Cancel a sub-flow in flight and wait until it has undone itself."""


class FlowRuntime(ABC):
    """What an engine supplies to run one flow with the saga rules."""

    engine: str = ""

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
        """

    @abstractmethod
    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true (re-checked as signals arrive)."""

    @abstractmethod
    def cancel_requested(self) -> bool:
        """Whether someone asked to cancel this flow."""

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:  # noqa: B027
        """A sub-flow's steps have all run: tell the parent (sub-flows only)."""

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

    async def shield(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to its end even if the flow is cancelled meanwhile."""
        task = asyncio.ensure_future(coro)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    return task.result()


class _Stop(Exception):
    def __init__(self, reaction: Reaction, rec: _Rec) -> None:
        self.reaction = reaction
        self.rec = rec


@dataclass
class _Rec:
    node: Node
    path: str
    status: StepStatus = "pending"
    attempts: int = 0
    args: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    sub: SubflowRun | None = None
    failed_step: str | None = None
    runs: int = 0
    key: str | None = None
    """The idempotency key of the forward execution an undo would undo."""
    back_error: ErrorInfo | None = None
    back_attempts: int = 0

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def is_flow(self) -> bool:
        return isinstance(self.node, FlowNode)


def _select(args: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    if fields is None:
        return args
    return {key: args[key] for key in fields if key in args}


class Interpreter:
    """Runs one flow (root or sub-flow) of a plan with the saga rules."""

    def __init__(self, input: FlowInput, runtime: FlowRuntime, flow_id: str) -> None:
        self.input = input
        self.runtime = runtime
        self.flow_id = flow_id
        self.args: dict[str, Any] = dict(input.args)
        self.outputs: dict[str, Any] = {}
        self.recs = [
            _Rec(node, child_path(input.path, i)) for i, node in enumerate(input.flow.steps)
        ]
        self._status: FlowStatus = "running"
        self.failure: FailureInfo | None = None
        self.waiting: WaitInfo | None = None
        self._decision: Decision | None = None
        self._settle: bool | None = None
        self._compensated: list[str] = []
        self._failed_compensations: list[str] = []
        self._compensations: list[Compensation] = []

    @property
    def status(self) -> FlowStatus:
        """The flow's status, as ``state()`` reports it."""
        return self._status

    @status.setter
    def status(self, status: FlowStatus) -> None:
        if status != self._status:
            self._status = status
            self.runtime.status_changed(status)

    @property
    def is_subflow(self) -> bool:
        return self.input.parent_id is not None

    # -- the run ----------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the flow. Returns its final args (a sub-flow: its steps' outputs).

        Raises:
            FlowFailure: the flow did not complete; its ``info`` says how.
        """
        try:
            await self._forward_all()
            if self.is_subflow:
                await self.runtime.report_forward_done(self.outputs)
                await self.runtime.wait_until(lambda: self._settle is not None)
                if not self._settle:
                    raise self._failed(await self.runtime.shield(self._parent_rollback()))
        except _Stop as stop:
            raise self._failed(await self.runtime.shield(self._on_stop(stop))) from None
        except asyncio.CancelledError:
            if not self.runtime.cancel_requested():
                raise
            raise self._failed(await self.runtime.shield(self._on_cancel())) from None
        await self._settle_children(commit=True)
        self.status = "completed"
        return self.outputs if self.is_subflow else self.args

    def _undo_count(self) -> int:
        return sum(1 for r in self.recs if r.status == "done")

    def _failed(self, info: FailureInfo) -> FlowFailure:
        self.failure = info
        self.status = info.kind
        return FlowFailure(info)

    async def _forward_all(self) -> None:
        for rec in self.recs:
            if self.runtime.cancel_requested():
                raise asyncio.CancelledError
            await self._forward(rec)

    async def _forward(self, rec: _Rec) -> None:
        node = rec.node
        while True:
            args = {**self.args, **node.static_args}
            rec.status = "running"
            rec.error = None
            rec.runs += 1
            try:
                if isinstance(node, FlowNode):
                    output = await self._forward_subflow(rec, args)
                else:
                    # All the args are kept for step_back; the step is sent only
                    # what its model reads, so history grows with what is used.
                    rec.args = args
                    call = self._call(rec, "step_forward", _select(args, node.fields))
                    rec.key = call.key
                    refused = self.runtime.refuse_forward(call, self._undo_count())
                    if refused is not None:
                        raise StepFailure(refused)
                    result = await self.runtime.run_step(node, call)
                    rec.attempts += result.attempt
                    output = result.output
                    outgrown = self._outgrown(rec, output)
                    if outgrown is not None:
                        rec.output = output  # its undo gets it, as a completed step's does
                        raise StepFailure(outgrown)
            except StepFailure as failure:
                rec.attempts += failure.info.attempt
                rec.error = failure.info
                reaction = node.on_failure.choose(failure.info.types or [failure.info.type])
            except FlowFailure as failed:
                rec.error = failed.info.error
                rec.failed_step = failed.info.step
                self._absorb(failed.info)
                reaction = self._subflow_reaction(rec, failed.info)
            else:
                rec.output = output
                rec.status = "done"
                self.args.update(output)
                self.outputs.update(output)
                return
            rec.status = "failed"
            if self.runtime.cancel_requested():
                raise asyncio.CancelledError
            if reaction == WAIT:
                decision = await self._wait(rec, "step_forward", FORWARD_DECISIONS)
                if decision.reaction == RETRY:
                    self.args.update(decision.args)
                    continue
                reaction = decision.reaction
            if reaction == SKIP:
                rec.status = "skipped"
                return
            raise _Stop(reaction, rec)

    async def _forward_subflow(self, rec: _Rec, args: dict[str, Any]) -> dict[str, Any]:
        node = rec.node
        assert isinstance(node, FlowNode)
        execution = self.input.execution
        child = FlowInput(
            version=self.input.version,
            flow=node,
            args=args,
            root_id=self.input.root_id,
            path=rec.path,
            parent_id=self.flow_id,
            payload_limit=self.input.payload_limit,
            unserved_step_timeout=self.input.unserved_step_timeout,
            execution=None if execution is None else child_execution(execution, rec.path, rec.runs),
        )
        refused = self.runtime.refuse_forward(child, self._undo_count())
        if refused is not None:
            raise StepFailure(refused)
        rec.sub = await self.runtime.start_subflow(node, child, rec.runs)
        rec.attempts += 1
        outputs = await rec.sub.forward()
        outgrown = self._outgrown(rec, outputs)
        if outgrown is not None:
            # Its steps ran but their outputs can't join the args: undo it now,
            # as a sub-flow that failed would have undone itself.
            info = await self.runtime.shield(rec.sub.settle(commit=False))
            if info is not None:
                self._absorb(info)
            raise StepFailure(outgrown)
        return outputs

    def _subflow_reaction(self, rec: _Rec, info: FailureInfo) -> Reaction:
        node = rec.node
        if info.kind == "aborted":
            return ABORT
        if info.kind == "cancelled" and self.runtime.cancel_requested():
            return ROLLBACK
        return node.on_failure.choose(info.error.types if info.error else [])

    def _call(
        self, rec: _Rec, direction: Literal["step_forward", "step_back"], args: dict[str, Any]
    ) -> StepCall:
        execution = self.input.execution
        node = rec.node
        assert isinstance(node, StepNode)
        if direction == "step_forward":
            key = None if execution is None else forward_key(execution, rec.path, rec.runs)
        else:
            key = rec.key
        return StepCall(
            flow_id=self.input.root_id,
            path=rec.path,
            step=rec.name,
            direction=direction,
            args=args,
            key=key,
            timeout=None if node.timeout_grace is None else node.timeout,
        )

    def _too_big(self, args: dict[str, Any]) -> int | None:
        """The size of ``args`` if they are over the payload limit, else None.

        Only flows started by this version of QWIT (``execution`` set) check:
        older flows in flight keep the behaviour they started with.
        """
        limit = self.input.payload_limit
        if not limit or self.input.execution is None:
            return None
        size = json_size(args)
        return size if size > limit - PAYLOAD_MARGIN else None

    def _outgrown(self, rec: _Rec, output: dict[str, Any]) -> ErrorInfo | None:
        """A PayloadTooLarge failure if ``output`` pushes the args over the limit.

        The flow's result, every later step's args and a sub-flow's report to
        its parent carry the accumulated args: past the limit none of them
        could be sent, so the step that pushed them over fails (its effect is
        undone as a failed step's is) while the flow can still roll back.
        """
        size = self._too_big({**self.args, **output}) if output else None
        if size is None:
            return None
        what = "sub-flow" if rec.is_flow else "step"
        return error_info(
            PayloadTooLarge(
                f"{what} {rec.name!r} returned outputs that take the flow's args to "
                f"{size} bytes, over the {self.input.payload_limit}-byte payload limit: "
                "return references (ids, URLs) instead of large values"
            ),
            attempt=0,  # the step's attempts are counted already
        )

    def _absorb(self, info: FailureInfo) -> None:
        """Take in what a sub-flow undid (it rolled itself back)."""
        self._compensated.extend(info.compensated)
        self._failed_compensations.extend(info.failed_compensations)
        self._compensations.extend(info.compensations)

    # -- failure ------------------------------------------------------------

    async def _on_stop(self, stop: _Stop) -> FailureInfo:
        rec = stop.rec
        if stop.reaction == ABORT:
            await self._settle_children(commit=True)
            return self._info("aborted", rec)
        self.status = "compensating"
        undo_failed = stop.reaction == ROLLBACK and self._failed_step_has_effect(rec)
        await self._rollback(rec if undo_failed else None)
        return self._info("rolled_back", rec)

    async def _on_cancel(self) -> FailureInfo:
        self.status = "compensating"
        self.waiting = None
        in_flight = next((r for r in self.recs if r.status in ("running", "failed")), None)
        undo: _Rec | None = None
        if in_flight is not None:
            in_flight.status = "failed"
            if in_flight.is_flow and in_flight.sub is not None and in_flight.error is None:
                info = await in_flight.sub.cancel()
                self._absorb(info)
                in_flight.status = (
                    "compensation_failed" if info.failed_compensations else "compensated"
                )
            elif self._failed_step_has_effect(in_flight):
                undo = in_flight
        await self._rollback(undo)
        return self._info("cancelled", in_flight, reason="the flow was cancelled")

    async def _parent_rollback(self) -> FailureInfo:
        self.status = "compensating"
        await self._rollback(None)
        return self._info("rolled_back", None, reason="the parent flow rolled back")

    def _failed_step_has_effect(self, rec: _Rec) -> bool:
        if rec.is_flow:
            return False
        assert isinstance(rec.node, StepNode)
        return rec.args is not None and (rec.error is None or rec.error.started)

    def _info(self, kind: FailureKind, rec: _Rec | None, reason: str | None = None) -> FailureInfo:
        error = rec.error if rec else None
        step = (rec.failed_step or rec.name) if rec else None
        if kind != "aborted" and self._failed_compensations:
            kind = "compensation_failed"
        if reason is None:
            reason = error.describe() if error else "failed"
        return FailureInfo(
            kind=kind,
            flow_id=self.input.root_id,
            step=step,
            reason=reason,
            error=error,
            compensated=list(self._compensated),
            failed_compensations=list(self._failed_compensations),
            compensations=list(self._compensations),
        )

    async def _rollback(self, failed: _Rec | None) -> None:
        """Undo ``failed`` (if given) and every completed step, newest first."""
        todo = [r for r in self.recs if r.status == "done"]
        if failed is not None:
            todo.append(failed)
        for rec in reversed(todo):
            await self._undo(rec)

    async def _undo(self, rec: _Rec) -> None:
        node = rec.node
        rec.status = "compensating"
        if isinstance(node, FlowNode):
            assert rec.sub is not None
            info = await rec.sub.settle(commit=False)
            if info is not None:
                self._absorb(info)
                if info.failed_compensations:
                    rec.status = "compensation_failed"
                    return
            rec.status = "compensated"
            return
        if not node.has_back:
            self._undone(rec, None)
            return
        while True:
            rec.status = "compensating"
            back_args = _select({**(rec.args or {}), **(rec.output or {})}, node.back_fields)
            try:
                result = await self.runtime.run_step(node, self._call(rec, "step_back", back_args))
            except StepFailure as failure:
                rec.back_attempts += failure.info.attempt
                rec.back_error = failure.info
                rec.status = "compensation_failed"
                if node.back_on_failure == WAIT:
                    decision = await self._wait(rec, "step_back", BACK_DECISIONS)
                    if decision.reaction == RETRY:
                        continue
                self._undone(rec, failure.info)
                return
            rec.back_attempts += result.attempt
            self._undone(rec, None)
            return

    def _undone(self, rec: _Rec, error: ErrorInfo | None) -> None:
        """Record the end of one step's undo: done, or failed with ``error``."""
        status: Literal["compensated", "compensation_failed"] = (
            "compensated" if error is None else "compensation_failed"
        )
        rec.status = status
        (self._compensated if error is None else self._failed_compensations).append(rec.name)
        self._compensations.append(
            Compensation(name=rec.name, path=rec.path, status=status, error=error)
        )

    async def _settle_children(self, commit: bool) -> None:
        subs = [r.sub for r in self.recs if r.status == "done" and r.sub is not None]
        if subs:
            await asyncio.gather(*(sub.settle(commit=commit) for sub in subs))

    # -- operator decisions ----------------------------------------------------

    async def _wait(
        self, rec: _Rec, direction: Literal["step_forward", "step_back"], allowed: list[Reaction]
    ) -> Decision:
        error = rec.back_error if direction == "step_back" else rec.error
        assert error is not None
        previous = self.status
        self.waiting = WaitInfo(
            step=rec.failed_step or rec.name,
            path=rec.path,
            flow_id=self.flow_id,
            direction=direction,
            error=error,
            allowed=[r.value for r in allowed],
            rollback_preview=self._preview(rec) if direction == "step_forward" else [],
        )
        self.status = "waiting"
        self._decision = None
        # No try/finally: a wait that ends in an exception (a cancel, or the
        # engine dropping this flow) must not change the status, because that
        # may publish it, and a dropped flow's coroutine can be closed later,
        # in another flow's context. The cancel path sets the status itself.
        await self.runtime.wait_until(lambda: self._decision is not None)
        self.waiting = None
        self.status = previous
        decision = self._decision
        assert decision is not None
        self._decision = None
        return decision

    def _preview(self, failed: _Rec) -> list[PreviewItem]:
        todo = [r for r in self.recs if r.status == "done"]
        if self._failed_step_has_effect(failed):
            todo.append(failed)
        items = []
        for rec in reversed(todo):
            node = rec.node
            args = (
                _select({**(rec.args or {}), **(rec.output or {})}, node.back_fields)
                if isinstance(node, StepNode)
                else {}
            )
            items.append(PreviewItem(name=rec.name, path=rec.path, args=args))
        return items

    def check_decision(self, reaction: Any, args: Any = None) -> Decision:
        """Validate an operator's decision without applying it.

        Raises:
            ReactionError: the flow is not waiting, or the reaction or args
                are not valid for what it waits on.
        """
        if self.waiting is None:
            raise ReactionError(f"flow {self.flow_id!r} is not waiting (it is {self.status})")
        allowed = frozenset(Reaction(r) for r in self.waiting.allowed)
        try:
            chosen = parse_reaction(reaction, allowed=allowed)
        except ValueError as exc:
            raise ReactionError(f"flow {self.flow_id!r}: {exc}") from None
        try:
            extra = as_args(args, "args")
        except NotJSON as exc:
            raise ReactionError(f"flow {self.flow_id!r}: args {exc}") from None
        if extra and chosen != RETRY:
            raise ReactionError(f"flow {self.flow_id!r}: args only go with {RETRY.value!r}")
        size = self._too_big({**self.args, **extra}) if extra else None
        if size is not None:
            raise ReactionError(
                f"flow {self.flow_id!r}: with these args the flow's args would take {size} "
                f"bytes, over the {self.input.payload_limit}-byte payload limit"
            )
        return Decision(reaction=chosen, args=extra)

    def decide(self, decision: Decision) -> None:
        """Apply a decision checked by ``check_decision``."""
        self.check_decision(decision.reaction, decision.args)
        self._decision = decision

    def settle(self, commit: bool) -> None:
        """A sub-flow's parent decided: keep (True) or undo (False) its effects."""
        if self._settle is None:
            self._settle = commit

    # -- state -----------------------------------------------------------------

    def state(self) -> FlowState:
        """The flow's progress, as ``handle.state()`` reports it."""
        return FlowState(
            flow=self.input.flow.name,
            flow_id=self.flow_id,
            status=self.status,
            steps=[
                StepState(
                    name=rec.name,
                    path=rec.path,
                    status=rec.status,
                    attempts=rec.attempts,
                    back_attempts=rec.back_attempts,
                    back_error=rec.back_error,
                    kind="flow" if rec.is_flow else "step",
                    has_back=not isinstance(rec.node, StepNode) or rec.node.has_back,
                    error=rec.error,
                    flow_id=rec.sub.flow_id if rec.sub else None,
                )
                for rec in self.recs
            ],
            waiting=self.waiting,
            failure=self.failure,
            args=self.args,
        )


__all__ = [
    "Decision",
    "FlowFailure",
    "FlowRuntime",
    "Interpreter",
    "SubflowRun",
]
