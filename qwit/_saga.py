"""The saga rules, written once for every engine.

``Interpreter`` runs one flow of a plan: it merges args, runs each step
through the engine's ``FlowRuntime``, chooses the reaction to a failure,
waits for an operator's decision, and undoes completed steps newest first.
It holds everything ``handle.state()`` reports. An engine supplies only how a
step runs, how a sub-flow runs, and how the flow waits; the Temporal workflow
and the in-process engine both drive this same class.

The interpreter must stay deterministic: it runs inside Temporal's workflow
(outside temporalio's sandbox, so no run-time check catches a slip:
``tests/test_workflow_determinism.py`` and the recorded histories replaying
in the tests do), so it reads no clock, no randomness and no I/O of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import (
    ArgumentsError,
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
    FALLBACK,
    RETRY,
    ROLLBACK,
    SKIP,
    SKIPBACK,
    WAIT,
    Direction,
    Reaction,
    Retry,
    parse_reaction,
)
from ._plan import (
    PAYLOAD_MARGIN,
    FlowInput,
    FlowNode,
    MapNode,
    Node,
    ParallelNode,
    Redrive,
    StepCall,
    StepNode,
    StepRecord,
    StepReturn,
    child_execution,
    child_path,
    forward_key,
    relative_place,
    walk,
)
from ._runtime import Decision, FlowFailure, FlowRuntime, SubflowRun, SubflowStartCancelled
from ._state import (
    ERROR_STATUSES,
    FINAL_STATUSES,
    UNDO_STATUSES,
    FlowEvent,
    FlowState,
    FlowStatus,
    PreviewItem,
    StepState,
    StepStatus,
    WaitInfo,
    choose_wait,
    path_key,
)
from ._tracing import OFF, Span, span

FORWARD_DECISIONS = [RETRY, SKIP, SKIPBACK, ROLLBACK, ABORT]
#: A sub-flow that aborts keeps its effects until its parent says whether to
#: undo them (``FlowInput.abort_held``): what the parent records changes.
ABORT_HELD = "qwit-abort-held"
#: An operator's choices for a failed undo: run it again, leave it and go on
#: with the rollback, or stop the rollback there (as ``back_on_failure=ABORT``).
BACK_DECISIONS = [RETRY, SKIP, ABORT]
#: An operator's RETRY of a failed undo merges its args into the undo's.
BACK_RETRY_ARGS = "qwit-back-retry-args"
#: A flow with final steps shows (and publishes) how it ended once they have
#: run; older QWIT did so before they ran.
END_AFTER_FINALS = "qwit-end-after-finals"
#: Once every step has run, telling the sub-flows to keep their effects goes
#: to its end even if a cancel comes meanwhile (older QWIT stopped there,
#: neither completed nor rolled back).
COMMIT_THROUGH_CANCEL = "qwit-commit-through-cancel"
#: A waiting member's rollback preview lists its block's other members only
#: for blocks (and maps) of at most this many: every waiting member of a
#: large map would otherwise carry the whole map in its preview.
PREVIEW_MEMBERS = 50
#: A member of a block or map that waits for an operator gives up its place
#: under ``max_concurrency`` meanwhile (older QWIT kept it: with as many
#: members waiting as the limit, the others did not run on).
WAIT_FREES_SLOT = "qwit-wait-frees-slot"
#: A sub-flow member of a block or map under ``max_concurrency`` gives its
#: place to the others while a step in it waits (``FlowInput.gives_place``),
#: as a step member does (older QWIT kept it).
SUBFLOW_GIVES_PLACE = "qwit-subflow-gives-place"
#: The steps of a sub-flow that is a map's element (or inside one) see the
#: element's index in ``qwit.context().index`` (``FlowInput.index``; older
#: QWIT gave them None).
SUBFLOW_INDEX = "qwit-subflow-index"
#: A sub-flow that gives its place back (``FlowInput.gives_place``) also
#: gives it while members of a block in it wait and none of the others runs
#: (older QWIT gave it only for a wait of its own sequence).
BLOCK_WAIT_GIVES_PLACE = "qwit-block-wait-gives-place"
#: A sub-flow that gave its place back takes one again before a ROLLBACK or
#: SKIPBACK decided for it undoes anything (older QWIT undid at once, beside
#: the members that ran in its place).
UNDO_TAKES_PLACE = "qwit-undo-takes-place"
#: When a block or map under ``max_concurrency`` is stopped, its sub-flows
#: that held a place are cancelled (and undo themselves) before those that
#: had given theirs back (older QWIT went in plan order: an element that had
#: given its place undid itself beside the one still stopping in it).
CANCEL_IN_PLACE_FIRST = "qwit-cancel-in-place-first"
#: A cancel that came while a flow's last step ran, and was spent on that
#: step (it completed anyway), cancels the flow (older QWIT completed it).
CANCEL_AFTER_LAST_STEP = "qwit-cancel-after-last-step"


class _Slot:
    """A member's place under its block's ``max_concurrency``."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self.gate = gate
        self.held = False

    async def take(self) -> None:
        await self.gate.acquire()
        self.held = True

    def give(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


@dataclass
class StepRun:
    """One step (or sub-flow) of a flow's plan, as the flow runs it."""

    node: Node
    path: str
    status: StepStatus = "pending"
    attempts: int = 0
    back_attempts: int = 0
    runs: int = 0
    """Executions of its forward so far (operator RETRYs start new ones)."""
    args: dict[str, Any] | None = None
    """The args its (last) forward got; an undo gets them, plus the output."""
    output: dict[str, Any] | None = None
    key: str | None = None
    """The idempotency key of the forward execution an undo would undo."""
    error: ErrorInfo | None = None
    back_error: ErrorInfo | None = None
    failed_step: str | None = None
    """For a sub-flow that failed: the name of its step that failed."""
    sub: SubflowRun | None = None
    members: list[StepRun] = field(default_factory=list)
    """A parallel block's branches, or a map's elements (made when it starts)."""
    index: int | None = None
    """A map element's 0-based index."""
    base: dict[str, Any] | None = None
    """A branch's or element's own view of the flow's args (None: the flow's)."""
    stopping: bool = False
    """A branch or element whose sibling stopped the block: cancelled."""
    undo_failed: bool = True
    """Whether a failed branch or element that may have done something is
    undone with its block (not when its reaction was SKIPBACK)."""
    started: int = 0
    """A block's (a map's) members started so far."""
    sharded: bool = False
    """A map run as shards: its members are sub-flows of its elements."""
    shard_of: str | None = None
    """A shard of a map: the map's path (the shard's own is ``<map>@<k>``)."""
    fell_back: bool = False
    """Its output is its ``step_fallback``'s."""
    skipped_back: bool = False
    """It failed with SKIPBACK: what it may have done is never undone."""
    ended: FailureKind | None = None
    """For a sub-flow that failed: how it ended (it rolled back, aborted...)."""
    recorded: list[StepRun] | None = None
    """For a sub-flow an earlier run of a redriven flow ran: its steps as
    they ended there (this run undoes them, if it must, itself)."""
    held: bool = False
    """A recorded sub-flow that aborted, keeping its effects."""
    redrive: list[StepRecord] | None = None
    """For a sub-flow a redrive resumes inside: its earlier run's records."""
    kept: dict[str, StepRun] | None = None
    """For the block (or map) a redrive resumes in: its members that
    completed in the earlier run, by path, kept as they ended."""
    back_args: dict[str, Any] | None = None
    """Args an operator's RETRY of its failed undo merged in (the undo's own)."""

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def is_flow(self) -> bool:
        return isinstance(self.node, FlowNode)

    @property
    def is_group(self) -> bool:
        """A parallel block or a map: its members run, and are undone, side by side."""
        return isinstance(self.node, ParallelNode | MapNode)

    @property
    def kind(self) -> Literal["step", "flow", "parallel", "map"]:
        return self.node.kind

    def needs_undo(self) -> bool:
        """Whether a rollback must undo this member of a block."""
        if self.status in ("done", "compensation_failed"):
            return True
        return self.status == "failed" and self.undo_failed and self.has_effect

    @property
    def has_effect(self) -> bool:
        """Whether a failed forward may have done something to undo."""
        if self.is_group:
            return False  # undone as the group it is (on the done stack)
        if self.is_flow:  # one that failed has undone itself, unless it aborted
            if self.recorded is not None:  # (in an earlier run, of a redriven flow)
                return any(_to_undo(inner) for inner in self.recorded)  # aborted, or stopped
            return self.sub is not None and self.sub.held  # and its parent holds it
        return self.args is not None and (self.error is None or self.error.started)


#: A flow event as the interpreter keeps it: ``FlowEvent``'s fields, in order.
EventRow = tuple[int, str, str, str, str, int, str | None]
EVENT_FIELDS = tuple(FlowEvent.model_fields)


@dataclass
class SagaState:
    """Everything one flow's run holds (``Interpreter`` changes it, nothing else).

    What has been done, and so what a rollback must walk, is the ``done``
    stack: a step is pushed when it completes, and undone newest first.
    """

    args: dict[str, Any]
    runs: list[StepRun]
    """Every step of the plan, in plan order."""
    status: FlowStatus = "running"
    phase: Literal["running", "compensating"] = "running"
    """What the flow does when nothing waits (its status is then this)."""
    outputs: dict[str, Any] = field(default_factory=dict)
    done: list[StepRun] = field(default_factory=list)
    """Completed steps, oldest first; a parallel block or map is one entry,
    its members undone side by side."""
    current: StepRun | None = None
    """The step going forward (or waiting for an operator) right now."""
    compensations: list[Compensation] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    failed_compensations: list[str] = field(default_factory=list)
    not_compensated: list[str] = field(default_factory=list)
    """What a rollback stopped by ``back_on_failure=ABORT`` did not undo."""
    rollback_stopped: bool = False
    failure: FailureInfo | None = None
    waits: dict[str, WaitInfo] = field(default_factory=dict)
    """What waits for an operator, by path (several branches may wait)."""
    decisions: dict[str, Decision] = field(default_factory=dict)
    """Decisions taken and not yet read, by the path they decide."""
    settle: bool | None = None
    place_granted: bool = False
    """The parent gave this sub-flow its place again (``gives_place``)."""
    cancel_rollback: bool | None = None
    """How a cancel asked through QWIT goes: roll back (True), or stop where
    it is (False); None when none was (an engine's own cancel rolls back)."""
    events: list[EventRow] = field(default_factory=list)
    """The flow's transitions, as ``FlowEvent`` fields in order: a state
    builds the events from them (a flow records one per transition, on every
    worker that runs it, and reads them far less often)."""
    finals: list[StepRun] = field(default_factory=list)
    """The flow's final steps (``finally_step``), run once it has ended."""
    final_failures: list[Compensation] = field(default_factory=list)
    undo_first: list[StepRun] = field(default_factory=list)
    """What a redrive undoes before it resumes (newest first): what the
    earlier run did at and after the step it resumes from."""


@dataclass(frozen=True)
class _Completed:
    output: dict[str, Any]


@dataclass(frozen=True)
class _Failed:
    reaction: Reaction


_Outcome = _Completed | _Failed


class _Stop(Exception):
    """The forward run stops at ``run`` with ``reaction`` (ROLLBACK, SKIPBACK, ABORT).

    ``undo_failed``: whether the rollback must still undo ``run`` itself (a
    step that failed with ROLLBACK and may have done something); a block's
    members are undone with the block, which is on the done stack.
    """

    def __init__(
        self, reaction: Reaction, run: StepRun, undo_failed: bool, *, redriving: bool = False
    ) -> None:
        self.reaction = reaction
        self.run = run
        self.undo_failed = undo_failed
        self.redriving = redriving
        """Stopped by an undo a redrive runs before it resumes: no step failed
        forward in this run."""


def _select(args: dict[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    if fields is None:
        return args
    return {key: args[key] for key in fields if key in args}


def _back_args(run: StepRun, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a step's undo gets: its forward's args and output (and what an
    operator's RETRY added, and ``extra``), as its model reads them."""
    node = run.node
    assert isinstance(node, StepNode)
    return _select(
        {**(run.args or {}), **(run.output or {}), **(run.back_args or {}), **(extra or {})},
        node.back_fields,
    )


class Interpreter:
    """Runs one flow (root or sub-flow) of a plan with the saga rules."""

    def __init__(self, input: FlowInput, runtime: FlowRuntime, flow_id: str) -> None:
        self.input = input
        self.runtime = runtime
        self.flow_id = flow_id
        if input.shard_of is not None:  # a shard of a map: the map, at its own path
            runs = [StepRun(input.flow.steps[0], input.shard_of)]
        else:
            runs = [
                StepRun(node, child_path(input.path, i)) for i, node in enumerate(input.flow.steps)
            ]
        for run in runs:
            if isinstance(run.node, ParallelNode):
                run.members = [
                    StepRun(branch, child_path(run.path, i))
                    for i, branch in enumerate(run.node.branches)
                ]
        self.saga = SagaState(args=dict(input.args), runs=runs)
        if input.redrive is not None:
            self._restore_all(input.redrive)
        first = len(input.flow.steps)
        self.saga.finals = [
            StepRun(node, child_path(input.path, first + i))
            for i, node in enumerate(input.flow.finally_steps)
        ]
        #: The places under ``max_concurrency`` of the members running now,
        #: by path.
        self._slots: dict[str, _Slot] = {}
        #: How the flow ended, held back while its final steps run (None:
        #: nothing held).
        self._end_held: FlowStatus | None = None
        #: This sub-flow gave back its place in its parent's block (see
        #: ``FlowInput.gives_place``) and has not asked for it again.
        self._place_given = False
        #: It has asked for its place again and not been given it yet.
        self._place_asked = False
        #: Members of its blocks that are sub-flows giving back their place
        #: in the block while a step in them waits, by path.
        self._resting: set[str] = set()
        #: What the sub-flows that give their place back say of it, not yet
        #: acted on (see ``_relay_place``), by their ids.
        self._place_asks: dict[str, list[bool]] = {}

    # -- redrive -----------------------------------------------------------------

    def _restore_all(self, redrive: Redrive) -> None:
        """Start from what an earlier run did: resume (the steps before
        ``resume`` as they ended, those at and after it to undo first), or
        finish its rollback (what it left to undo, on the done stack)."""
        records = {record.path: record for record in redrive.records}
        for run in self.saga.runs:
            record = records.get(run.path)
            if record is None:
                continue
            if redrive.mode == "rollback":
                self._restore(run, record)
                if _to_undo(run):
                    self.saga.done.append(run)
                if redrive.corrections:  # (what an operator fixed for the undos)
                    for inner in _all_runs([run]):
                        inner.back_args = {**(inner.back_args or {}), **redrive.corrections}
                continue
            assert redrive.resume is not None
            place = relative_place(run.path, redrive.resume)
            if place == "before":
                self._restore(run, record)
                if run.status == "done":
                    self.saga.done.append(run)
                    self.saga.args.update(run.output or {})
                    self.saga.outputs.update(run.output or {})
            elif place == "inside":  # a sub-flow: it resumes inside, from its records
                run.redrive = record.sub or []
            else:  # at or after it: what the earlier run did is undone, then it runs again
                earlier = StepRun(run.node, run.path, index=run.index)
                self._restore(earlier, record)
                if place == "at" and redrive.keep_members and earlier.is_group:
                    # the block it stopped in: what completed there is kept
                    run.kept = {m.path: m for m in earlier.members if m.status == "done"}
                    for member in earlier.members[::-1]:
                        if member.status != "done" and _to_undo(member):
                            self.saga.undo_first.insert(0, member)
                elif _to_undo(earlier):
                    self.saga.undo_first.insert(0, earlier)
        self.saga.args.update(redrive.corrections)

    def _restore(self, run: StepRun, record: StepRecord) -> None:
        """``run`` as ``record`` says it ended (its members, a sub-flow's steps)."""
        if record.sharded:
            raise ReactionError(
                f"the map at {run.path} ran in shards; a redrive can't reuse or undo it yet"
            )
        run.status = record.status
        run.output, run.key, run.attempts = record.output, record.key, record.attempts
        run.args = record.args if record.effect or run.status != "failed" else None
        node = run.node
        if isinstance(node, FlowNode):
            run.recorded = self._restored_steps(node, run.path, record.sub or [])
            run.held = record.held
        elif isinstance(node, ParallelNode):
            run.members = [
                StepRun(branch, child_path(run.path, i)) for i, branch in enumerate(node.branches)
            ]
        elif isinstance(node, MapNode):
            run.members = [
                StepRun(node.node, m.path, index=int(m.path.rpartition(".")[2]) - 1)
                for m in record.members
            ]
        by_path = {m.path: m for m in record.members}
        for member in run.members:
            if member.path in by_path:
                self._restore(member, by_path[member.path])

    def _restored_steps(
        self, flow: FlowNode, path: str, records: list[StepRecord]
    ) -> list[StepRun]:
        by_path = {record.path: record for record in records}
        runs = [StepRun(node, child_path(path, i)) for i, node in enumerate(flow.steps)]
        for run in runs:
            if run.path in by_path:
                self._restore(run, by_path[run.path])
        return runs

    async def _undo_first(self) -> None:
        """Undo, newest first, what the earlier run did at and after the step
        a redrive resumes from, so that nothing is applied twice. An undo
        that fails stops the redrive: the flow rolls back."""
        for run in self.saga.undo_first:
            await self._undo(run)
            if run.status == "compensation_failed" or any(
                r.status == "compensation_failed" for r in _all_runs(run.members)
            ):
                raise _Stop(ROLLBACK, run, undo_failed=False, redriving=True)

    async def _finish_rollback(self) -> FailureInfo:
        """A redrive of a flow whose rollback failed: undo what it left,
        newest first (the undos that failed, then what an ABORT left)."""
        self._flow_to("compensating")
        await self._rollback(None)
        return self._earlier_failure(otherwise="failed")

    def records(self) -> list[StepRecord]:
        """What each step did, as the flow stands: what a redrive starts from."""
        return [_record_of(run) for run in self.saga.runs]

    @property
    def status(self) -> FlowStatus:
        """The flow's status, as ``state()`` reports it."""
        return self.saga.status

    @property
    def waiting(self) -> WaitInfo | None:
        """What the flow waits for, while an operator must decide (the first
        in plan order, when several branches wait)."""
        waits = self._waits()
        return waits[0] if waits else None

    def _waits(self, pending_too: bool = False) -> list[WaitInfo]:
        """The steps waiting for an operator, in plan order: not those decided
        already, whose decision the flow has yet to act on (unless
        ``pending_too``)."""
        decided = () if pending_too else self.saga.decisions
        waits = [w for w in self.saga.waits.values() if w.path not in decided]
        return sorted(waits, key=lambda w: path_key(w.path))

    @property
    def is_subflow(self) -> bool:
        return self.input.parent_id is not None

    # -- transitions: the only places state changes, each recorded ---------------

    def _flow_to(self, status: FlowStatus) -> None:
        """Change the flow's status, record it, and have the engine publish it.

        ``running`` and ``compensating`` are the flow's phase: while some step
        waits for an operator, its status is ``waiting`` whatever the phase.
        """
        if status in ("running", "compensating"):
            self.saga.phase = "running" if status == "running" else "compensating"
        if status in ("running", "compensating", "waiting"):
            status = "waiting" if self.saga.waits else self.saga.phase
        if status == self.saga.status:
            return
        # Not ended until its final steps have run. (Gated whatever the end:
        # a completed flow publishes its status too once it has waited.)
        if (
            self._finals_ahead
            and status in FINAL_STATUSES
            and self.runtime.patched(END_AFTER_FINALS)
        ):
            self._end_held = status
            return
        self.saga.status = status
        self._record("", self.input.flow.name, status)
        self.runtime.status_changed(status)

    def _stopped(self, run: StepRun) -> None:
        """A step stopped mid-run (its flow or block was cancelled) has failed;
        the attempt it was in counts (how many more ran, retried by the
        engine, is not known here)."""
        if isinstance(run.node, StepNode) and run.status == "running":
            run.attempts += 1
        self._step_to(run, "failed")

    def _step_to(self, run: StepRun, status: StepStatus) -> None:
        run.status = status
        self._record(run.path, run.name, status, run)

    def _record(self, path: str, name: str, status: str, run: StepRun | None = None) -> None:
        error = None
        if run is not None:
            failed = run.back_error if status == "compensation_failed" else run.error
            error = failed.describe() if failed and status in ERROR_STATUSES else None
        self.saga.events.append(
            (
                len(self.saga.events) + 1,
                "flow" if run is None else "step",
                path,
                name,
                status,
                (run.back_attempts if status in UNDO_STATUSES else run.attempts) if run else 0,
                error,
            )
        )

    # -- the run ----------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the flow, then its final steps. Returns its final args (a
        sub-flow: its steps' outputs).

        Raises:
            FlowFailure: the flow did not complete; its ``info`` says how.
        """
        flow = self.input.flow.name
        self._metric("qwit_flows_started", 1, flow=flow)
        with self._span(f"flow {flow}", path=self.input.path or None) as span:
            try:
                result = await self._run_and_finally()
            except FlowFailure as failed:
                span.fail(failed.info.error, outcome=failed.info.kind)
                self._metric("qwit_flows_ended", 1, flow=flow, outcome=failed.info.kind)
                raise
            span.set(outcome="completed")
            self._metric("qwit_flows_ended", 1, flow=flow, outcome="completed")
            return result

    def _metric(self, metric: str, value: float, **labels: str) -> None:
        """Record ``value`` in ``metric`` through the runtime, unless its
        engine keeps no metrics (``FlowRuntime.metered``)."""
        if self.runtime.metered:
            self.runtime.record(metric, value, **labels)

    def _span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span]:
        """A span of this flow (when its runtime traces)."""
        if not self.runtime.tracing:
            return OFF
        return span(
            True,
            name,
            flow=self.input.flow.name,
            flow_id=self.input.root_id,
            **attributes,
        )

    async def _step_call(
        self, run: StepRun, node: StepNode, call: StepCall, direction: str | None = None
    ) -> StepReturn:
        """Run one direction of a step through the runtime, in a span, and
        record it in the metrics."""
        direction = direction or call.direction
        began = self.runtime.now()

        def measured(outcome: str) -> None:
            labels = {"step": node.name, "direction": direction}
            self._metric("qwit_steps", 1, outcome=outcome, **labels)
            self._metric("qwit_step_seconds", self.runtime.now() - began, **labels)

        with self._span(
            f"{direction} {node.name}", step=node.name, path=run.path, direction=direction
        ) as span:
            try:
                result = await self.runtime.run_step(node, call)
            except StepFailure as failure:
                measured("failed")
                span.set(attempt=failure.info.attempt)
                span.fail(failure.info)
                raise
            except asyncio.CancelledError:
                # (not when the engine drops the flow, e.g. from its cache)
                if self.runtime.cancel_requested() or run.stopping:
                    measured("cancelled")
                    span.set(outcome="cancelled")
                raise
            measured("done")
            span.set(attempt=result.attempt, outcome="done")
            return result

    async def _run_and_finally(self) -> dict[str, Any]:
        if not self.saga.finals:
            return await self._run()
        try:
            result = await self._run()
        except FlowFailure as failed:
            await self.runtime.shield(self._finally(failed.info))
            info = failed.info.model_copy(update={"final_failures": self.saga.final_failures})
            self.saga.failure = info
            self._end_after_finals()
            raise FlowFailure(info) from None
        await self.runtime.shield(self._finally(None))
        self._end_after_finals()
        return result

    def _end_after_finals(self) -> None:
        """The flow's final steps have run: it ends as it was to."""
        if self._end_held is not None:
            self._flow_to(self._end_held)

    @property
    def _finals_ahead(self) -> bool:
        """Whether final steps are still to run (or running): until then the
        flow has not ended."""
        return any(run.status in ("pending", "running") for run in self.saga.finals)

    async def _finally(self, failure: FailureInfo | None) -> None:
        """Run the final steps, in order, whatever the outcome; a failure is
        recorded, and changes nothing else."""
        args: dict[str, Any] = {
            **self.saga.args,
            "qwit_outcome": "completed" if failure is None else failure.kind,
        }
        if failure is not None:
            args["qwit_failure"] = {
                "step": failure.step,
                "reason": failure.reason,
                "compensated": list(failure.compensated),
                "failed_compensations": list(failure.failed_compensations),
            }
        for run in self.saga.finals:
            node = run.node
            assert isinstance(node, StepNode)
            run.runs += 1
            run.args = {**args, **node.static_args}
            call = self._call(run, "step_forward", _select(run.args, node.fields))
            run.key = call.key
            self._step_to(run, "running")
            try:
                refused = self.runtime.refuse_forward(call, 0)
                if refused is not None:
                    raise StepFailure(refused)
                result = await self._step_call(run, node, call, "final")
            except StepFailure as failure_of_final:
                run.attempts += failure_of_final.info.attempt
                run.error = failure_of_final.info
                self._step_to(run, "failed")
                self.saga.final_failures.append(
                    Compensation(name=run.name, path=run.path, status="failed", error=run.error)
                )
                continue
            run.attempts += result.attempt
            self._step_to(run, "done")

    async def _run(self) -> dict[str, Any]:
        try:
            if self.input.redrive is not None and self.input.redrive.mode == "rollback":
                raise self._failed(await self.runtime.shield(self._finish_rollback()))
            if self.saga.undo_first:
                await self.runtime.shield(self._undo_first())
            await self._forward_all()
            if (
                not self.is_subflow
                and self.runtime.cancel_requested()
                and self.runtime.patched(CANCEL_AFTER_LAST_STEP)
            ):
                # A cancel that came while the last step ran, spent on it (it
                # completed anyway): the flow is cancelled all the same, as
                # it would be during any other step (a sub-flow looks below).
                raise asyncio.CancelledError
            if self.is_subflow:
                await self.runtime.report_forward_done(self.saga.outputs)
                # A cancel that arrived as the last step completed may have
                # been spent on that step (Temporal turns a workflow's cancel
                # into a cancel of what it awaits, and an operation that
                # completes anyway swallows it): look at the request itself.
                await self.runtime.wait_until(
                    lambda: self.saga.settle is not None or self.runtime.cancel_requested()
                )
                if self.saga.settle is None:
                    raise asyncio.CancelledError
                if not self.saga.settle:
                    raise self._failed(await self.runtime.shield(self._parent_rollback()))
        except _Stop as stop:
            if stop.reaction == ABORT and self.input.abort_held:
                raise self._failed(await self.runtime.shield(self._held_abort(stop))) from None
            raise self._failed(await self.runtime.shield(self._on_stop(stop))) from None
        except asyncio.CancelledError:
            if not self.runtime.cancel_requested():
                raise
            raise self._failed(await self.runtime.shield(self._on_cancel())) from None
        await self._commit_children()
        self._flow_to("completed")
        return self.saga.outputs if self.is_subflow else self.saga.args

    def _failed(self, info: FailureInfo) -> FlowFailure:
        self.saga.failure = info
        self._flow_to(info.kind)
        return FlowFailure(info)

    async def _forward_all(self) -> None:
        for run in self.saga.runs:
            if run.status != "pending":
                continue  # done in an earlier run of a redriven flow
            if self.runtime.cancel_requested():
                raise asyncio.CancelledError
            self.saga.current = run
            if await self._forward(run):
                self.saga.done.append(run)
                assert run.output is not None
                self.saga.args.update(run.output)
                self.saga.outputs.update(run.output)
            self.saga.current = None

    async def _forward(self, run: StepRun) -> bool:
        """Run a step (a sub-flow, a block, a map) forward until it is done
        (True) or skipped (False); raise _Stop otherwise.

        The one place a step's outcome is decided.
        """
        while True:
            outcome = await self._attempt(run)
            if isinstance(outcome, _Completed):
                run.output = outcome.output
                self._step_to(run, "done")
                return True
            self._step_to(run, "failed")
            if self.runtime.cancel_requested() or run.stopping:
                raise asyncio.CancelledError
            retry = self._segment_retry(run)
            if retry is not None:
                await self.runtime.sleep(retry.delay(run.runs))
                continue
            reaction = outcome.reaction
            if reaction == WAIT:
                decision = await self._wait(run, "step_forward", FORWARD_DECISIONS)
                if decision.reaction == RETRY:
                    await self._undo_before_retry(run)
                    (self.saga.args if run.base is None else run.base).update(decision.args)
                    continue
                reaction = decision.reaction
            if reaction == SKIP:
                self._step_to(run, "skipped")
                return False
            run.skipped_back = reaction == SKIPBACK
            if reaction == FALLBACK:
                run.output = await self._fall_back(run)
                self._step_to(run, "done")
                return True
            if run.base is not None:  # a member: undone with its block, if at all
                run.undo_failed = reaction == ROLLBACK
                raise _Stop(reaction, run, undo_failed=False)
            raise _Stop(reaction, run, undo_failed=reaction == ROLLBACK and run.has_effect)

    async def _fall_back(self, run: StepRun) -> dict[str, Any]:
        """Undo the failed attempt (if it may have done something), then run
        the step's ``step_fallback``: its output stands in for the step's,
        and a later undo of the step, keyed on the fallback's key, gets it.
        A fallback that fails for good rolls the flow back: the failed
        attempt, undone already, is not undone again, and what the failed
        fallback may have done is its own to clean up (its step has one
        ``step_back``, for what stands in for its work)."""
        node = run.node
        assert isinstance(node, StepNode)
        assert run.error is not None
        error = run.error.model_copy(update={"traceback": ""})
        if run.has_effect:
            await self._undo(run)
        args = run.args
        if args is None:  # the forward never ran (refused before it started)
            args = {**(self.saga.args if run.base is None else run.base), **node.static_args}
            run.args = args
        self._step_to(run, "running")
        call = self._call(run, "step_fallback", args, error=error)
        # From here, what an undo of this step undoes is what the fallback
        # did: its undo is keyed on the fallback's key (never again on the
        # failed attempt's, whose undo ran already).
        if call.key is not None:
            run.key = call.idempotency_key
        run.output = None
        try:
            result = await self._step_call(run, node, call)
        except StepFailure as failure:
            run.attempts += failure.info.attempt
            run.error = failure.info
            self._step_to(run, "failed")
            run.undo_failed = False
            raise _Stop(ROLLBACK, run, undo_failed=False) from None
        run.attempts += result.attempt
        run.fell_back = True
        return result.output

    def _segment_retry(self, run: StepRun) -> Retry | None:
        """The policy under which a failed sub-flow runs again from its start
        (it rolled back cleanly, and has attempts left), or None."""
        node = run.node
        if not isinstance(node, FlowNode) or node.retry is None or run.ended != "rolled_back":
            return None
        limit = node.retry.max_attempts
        return node.retry if limit is None or run.runs < limit else None

    async def _undo_before_retry(self, run: StepRun) -> None:
        """Undo the failed execution of a step an operator retries, if it may
        have done something: the retry is a new execution, under a new key, so
        what the failed one did would otherwise stay applied beside it.

        Flows of older QWIT retried under the same key; they keep doing so.
        """
        if self.input.execution is not None and run.has_effect:
            await self._undo(run)

    async def _attempt(self, run: StepRun) -> _Outcome:
        """One execution of a step's forward (retries included), as an outcome."""
        node = run.node
        if isinstance(node, ParallelNode | MapNode):
            return await self._forward_group(run, node)
        args = {**(self.saga.args if run.base is None else run.base), **node.static_args}
        run.error = None
        run.runs += 1
        self._step_to(run, "running")
        try:
            if isinstance(node, FlowNode):
                return _Completed(await self._forward_subflow(run, args))
            return _Completed(await self._forward_step(run, node, args))
        except StepFailure as failure:
            run.attempts += failure.info.attempt
            run.error = failure.info
            return _Failed(node.on_failure.choose(failure.info.types or [failure.info.type]))
        except FlowFailure as failed:
            run.error = failed.info.error
            run.failed_step = failed.info.step
            run.ended = failed.info.kind
            self._absorb(failed.info)
            return _Failed(self._subflow_reaction(run, failed.info))

    # -- parallel blocks and maps ---------------------------------------------

    async def _forward_group(self, run: StepRun, node: ParallelNode | MapNode) -> _Outcome:
        """Run a block's branches (a map's elements) side by side.

        Completed, the block's output is its members' outputs merged in plan
        order (a map's: their list, in element order). Stopped by a member
        (or by a cancel), the block goes on the done stack as it is, so that
        a rollback undoes its members side by side; the member's stop is
        passed on.
        """
        args = self.saga.args
        run.error = None
        run.runs += 1
        if isinstance(node, MapNode):
            items = args.get(node.over)
            if not isinstance(items, list):
                found = "missing" if node.over not in args else f"a {type(items).__name__}"
                run.error = error_info(
                    ArgumentsError(
                        f"map {node.name!r} at {run.path}: args[{node.over!r}] must be a "
                        f"list, and is {found}"
                    ),
                    started=False,
                    with_traceback=False,
                )
                return _Failed(node.node.on_failure.choose(run.error.types))
            base = {key: value for key, value in args.items() if key != node.over}
            size = node.shard_size
            run.sharded = len(items) > size and self.input.shard_of is None
            if run.sharded:
                # Shards, one at a time: each a sub-flow that maps its part
                # (its own history), its elements keeping their paths.
                run.members = [
                    StepRun(
                        _shard(node, start, len(items)),
                        f"{run.path}@{start // size + 1}",
                        base={**base, node.over: items[start : start + size]},
                        shard_of=run.path,
                    )
                    for start in range(0, len(items), size)
                ]
            else:
                run.members = [
                    _kept(run, child_path(run.path, node.offset + i), node.item, element)
                    or StepRun(
                        node.node,
                        child_path(run.path, node.offset + i),
                        index=node.offset + i,
                        base={**base, node.item: element},
                    )
                    for i, element in enumerate(items)
                ]
        else:
            base = dict(args)
            run.members = [
                _kept(run, m.path) or StepRun(m.node, m.path, base=dict(base)) for m in run.members
            ]
        run.kept = None  # (once: a block run again runs whole)
        self._step_to(run, "running")
        limit = _limit(run)
        try:
            with self._span(f"{node.kind} {node.name}", step=node.name, path=run.path):
                await self._side_by_side(run, limit)
        except (_Stop, asyncio.CancelledError):
            self._step_to(run, "failed")
            self.saga.done.append(run)
            raise
        if isinstance(node, MapNode) and run.sharded:
            output = {node.into: [out for m in run.members for out in (m.output or {})[node.into]]}
        elif isinstance(node, MapNode):
            output = {node.into: [m.output if m.status == "done" else None for m in run.members]}
        else:
            clash = _clash(run.members)
            if clash is not None:
                run.error = clash
                self._step_to(run, "failed")
                self.saga.done.append(run)  # what completed is undone
                raise _Stop(ROLLBACK, run, undo_failed=False)
            output = {}
            for member in run.members:
                output.update(member.output if member.status == "done" and member.output else {})
        outgrown = self._outgrown(run, output)
        if outgrown is not None:
            run.error = outgrown
            self._step_to(run, "failed")
            self.saga.done.append(run)
            raise _Stop(ROLLBACK, run, undo_failed=False)
        return _Completed(output)

    async def _side_by_side(self, group: StepRun, limit: int | None) -> None:
        """Run ``group``'s members, at most ``limit`` at once, until all have
        ended; the first that stops the flow cancels the others (and is
        raised once they have stopped)."""
        members = group.members
        gate = asyncio.Semaphore(limit) if limit is not None and limit < len(members) else None
        stops: list[_Stop] = []
        tasks: list[asyncio.Future[None]] = []
        held: set[str] = set()  # members that held a place when they ended

        async def forward(member: StepRun) -> None:
            group.started += 1
            if member.status == "done":
                return  # kept from the run a redrive resumes
            try:
                await self._forward(member)
                self._resting.discard(member.path)
                if (self.saga.waits or self._resting) and self._gives_place_while_idle():
                    await self._give_place_if_idle(member)  # (the others wait)
            except _Stop as stop:
                stops.append(stop)
                if len(stops) == 1:
                    for other, task in zip(members, tasks, strict=True):
                        if other is not member and not task.done():
                            other.stopping = True
                            task.cancel()

        async def one(member: StepRun) -> None:
            if gate is None:
                await forward(member)
                return
            slot = self._slots[member.path] = _Slot(gate)
            try:
                await slot.take()
                if not stops:
                    await forward(member)
            finally:
                if slot.held:
                    held.add(member.path)
                slot.give()
                del self._slots[member.path]

        tasks.extend(asyncio.ensure_future(one(member)) for member in members)
        try:
            ended = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # The flow was cancelled. Once a member has stopped the block, its
            # reaction stands, as it does when a cancel comes during the
            # rollback (or the abort) of a sequence: the outcome was decided
            # before the cancel came, and the siblings are stopping anyway.
            if not stops:
                raise
            ended = []
        finally:
            await self.runtime.shield(self._after_side_by_side(group, held))
        for end in ended:  # a fault of QWIT's own is not swallowed
            if isinstance(end, BaseException) and not isinstance(end, asyncio.CancelledError):
                raise end
        if stops:
            raise stops[0]

    async def _after_side_by_side(self, group: StepRun, held: set[str]) -> None:
        """Once every member has ended: those stopped mid-run have failed, and
        a sub-flow stopped mid-run is cancelled (it undoes itself), one after
        another. Under ``max_concurrency``, those that held a place (``held``)
        go first: the undo of one that had given its place back then runs
        alone, not beside a member still stopping in its place."""
        stopped: list[tuple[StepRun, SubflowRun]] = []
        for member in group.members:
            self.saga.waits.pop(member.path, None)
            if member.status == "running":
                self._stopped(member)
            sub = _stopped_subflow(member)
            if sub is not None:
                stopped.append((member, sub))
        in_place = sorted(stopped, key=lambda stop: stop[0].path not in held)
        if in_place != stopped and self.runtime.patched(CANCEL_IN_PLACE_FIRST):
            stopped = in_place
        for member, sub in stopped:
            await self._cancel_subflow(member, sub)
        self._flow_to(self.saga.phase)

    async def _forward_step(
        self, run: StepRun, node: StepNode, args: dict[str, Any]
    ) -> dict[str, Any]:
        # All the args are kept for step_back; the step is sent only what its
        # model reads, so history grows with what is used.
        run.args = args
        call = self._call(run, "step_forward", _select(args, node.fields))
        run.key = call.key
        refused = self.runtime.refuse_forward(call, self._pending_undos())
        if refused is not None:
            raise StepFailure(refused)
        result = await self._step_call(run, node, call)
        run.attempts += result.attempt
        # A branch's or element's output joins the args with its block's,
        # which is checked as a whole when the block ends.
        outgrown = None if run.base is not None else self._outgrown(run, result.output)
        if outgrown is not None:
            run.output = result.output  # its undo gets it, as a completed step's does
            raise StepFailure(outgrown)
        return result.output

    async def _forward_subflow(self, run: StepRun, args: dict[str, Any]) -> dict[str, Any]:
        node = run.node
        assert isinstance(node, FlowNode)
        execution = self.input.execution
        child = FlowInput(
            version=self.input.version,
            flow=node,
            args=args,
            root_id=self.input.root_id,
            path=run.path,
            parent_id=self.flow_id,
            payload_limit=self.input.payload_limit,
            unserved_step_timeout=self.input.unserved_step_timeout,
            execution=None if execution is None else child_execution(execution, run.path, run.runs),
            shard_of=run.shard_of,
            abort_held=execution is not None and self.runtime.patched(ABORT_HELD),
            # a member under max_concurrency, or a step of the sequence of
            # one (the member's place is its own to give back while it waits)
            gives_place=(
                execution is not None
                and run.shard_of is None
                and (run.path in self._slots or (self.input.gives_place and run.base is None))
                and self.runtime.gives_places
                and self.runtime.patched(SUBFLOW_GIVES_PLACE)
            ),
        )
        index = self._index(run)
        if index is not None and execution is not None and self.runtime.patched(SUBFLOW_INDEX):
            child = child.model_copy(update={"index": index})
        if run.redrive is not None:  # the redrive resumes inside it
            child = child.model_copy(
                update={
                    "redrive": Redrive(records=run.redrive, resume=self.input.redrive.resume)
                    if self.input.redrive is not None
                    else None
                }
            )
            run.redrive = None
        refused = self.runtime.refuse_forward(child, self._pending_undos())
        if refused is not None:
            raise StepFailure(refused)
        try:
            run.sub = await self.runtime.start_subflow(node, child, run.runs)
        except SubflowStartCancelled as cancelled:
            run.sub = cancelled.sub  # if it started, it is stopped like any in flight
            if run.sub is not None:
                run.attempts += 1
            raise
        run.attempts += 1
        if child.gives_place:
            asks = self._place_asks[run.sub.flow_id] = []
            relay = asyncio.ensure_future(
                self._relay_place(run.sub, asks, self._slots.get(run.path), run)
            )
            try:
                outputs = await run.sub.forward()
            finally:
                relay.cancel()
                del self._place_asks[run.sub.flow_id]
        else:
            outputs = await run.sub.forward()
        outgrown = None if run.base is not None else self._outgrown(run, outputs)
        if outgrown is not None:
            # Its steps ran but their outputs can't join the args: undo it now,
            # as a sub-flow that failed would have undone itself.
            info = await self.runtime.shield(run.sub.settle(commit=False))
            if info is not None:
                self._absorb(info)
            raise StepFailure(outgrown)
        return outputs

    async def _relay_place(
        self, sub: SubflowRun, asks: list[bool], slot: _Slot | None, member: StepRun
    ) -> None:
        """Act on what a sub-flow says of its place (``asks``, in order): give
        it back while a step in it waits, and take one again (waiting for it,
        if need be) before letting it go on. The place is ``slot``, the
        sub-flow's own in this flow's block; without one (a step of this
        flow's sequence), it is this flow's own, in its parent's block."""
        while True:
            await self.runtime.wait_until(lambda: bool(asks))
            if asks.pop(0):
                if slot is None:
                    await self._take_place_back()
                else:
                    if member.path in self._resting:
                        self._resting.discard(member.path)
                        await self._take_place_back()  # (if this flow gave it)
                    if not slot.held:
                        await slot.take()
                await sub.grant_place()
            elif slot is None:
                await self._give_place_back()
            else:
                slot.give()
                if self._gives_place_while_idle():
                    self._resting.add(member.path)
                    await self._give_place_if_idle(member)

    async def _give_place_back(self) -> None:
        """This sub-flow (``gives_place``) waits: its parent may give its
        place to another member meanwhile."""
        if not self._place_given and not self._place_asked:
            self._place_given = True
            await self.runtime.report_place(False)

    async def _take_place_back(self) -> None:
        """This sub-flow goes on: once it has given its place back, it asks
        its parent for one again and waits for it (as does any other part of
        it that goes on meanwhile)."""
        if self._place_given:
            self._place_given = False
            self._place_asked = True
            self.saga.place_granted = False
            await self.runtime.report_place(True)
        if self._place_asked:
            await self.runtime.wait_until(lambda: self.saga.place_granted)
            self._place_asked = False

    def _gives_place_while_idle(self) -> bool:
        """Whether this flow gives its place back while members of its
        blocks wait and none of the others runs (see ``_give_place_if_idle``)."""
        return self.input.gives_place and self.runtime.patched(BLOCK_WAIT_GIVES_PLACE)

    async def _give_place_if_idle(self, member: StepRun) -> None:
        """``member`` of a block of this flow waits (or has ended): if no
        other member runs, or may start, and one waits, nothing of this flow
        runs: it gives its place back, as for a wait of its own sequence.
        (A member that is a sub-flow counts as running unless it gave its
        place in the block back.)"""
        group = self._groups().get(id(member))
        if group is None:
            return
        waits = False
        for other in group.members:
            if other.path in self.saga.waits or other.path in self._resting:
                waits = True
            elif other.status in ("pending", "running"):
                return
        if waits:
            await self._give_place_back()

    def subflow_place(self, flow_id: str, wanted: bool) -> None:
        """A sub-flow gives back its place (False) or wants it again (True):
        see ``FlowInput.gives_place``."""
        asks = self._place_asks.get(flow_id)
        if asks is not None:
            asks.append(wanted)

    def grant_place(self) -> None:
        """This sub-flow's parent gave it a place again: it goes on."""
        self.saga.place_granted = True

    def _pending_undos(self) -> int:
        """How many undos a rollback would run at most now: one for every
        completed step, and for every member of a block that has started."""
        runs = list(self.saga.done)
        current = self.saga.current
        if current is not None and current.is_group and current not in runs:
            runs.append(current)
        return sum(run.started if run.is_group else 1 for run in runs)

    def _subflow_reaction(self, run: StepRun, info: FailureInfo) -> Reaction:
        if info.kind == "aborted":
            return ABORT
        if info.kind == "cancelled" and self.runtime.cancel_requested():
            return ROLLBACK
        node = run.node
        assert isinstance(node, FlowNode)
        return node.on_failure.choose(info.error.types if info.error else [])

    def _call(
        self,
        run: StepRun,
        direction: Direction,
        args: dict[str, Any],
        error: ErrorInfo | None = None,
    ) -> StepCall:
        execution = self.input.execution
        node = run.node
        assert isinstance(node, StepNode)
        if direction == "step_forward":
            key = None if execution is None else forward_key(execution, run.path, run.runs)
        else:
            key = run.key
        return StepCall(
            flow_id=self.input.root_id,
            path=run.path,
            step=run.name,
            direction=direction,
            args=args,
            key=key,
            timeout=None if node.timeout_grace is None else node.limit(direction),
            index=self._index(run),
            error=error,
        )

    def _index(self, run: StepRun) -> int | None:
        """The index of the map element ``run`` is in: its own, or, for a
        member of a sub-flow that is an element (or inside one), the one
        this flow was given."""
        return run.index if run.index is not None else self.input.index

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

    def _outgrown(self, run: StepRun, output: dict[str, Any]) -> ErrorInfo | None:
        """A PayloadTooLarge failure if ``output`` pushes the args over the limit.

        The flow's result, every later step's args and a sub-flow's report to
        its parent carry the accumulated args: past the limit none of them
        could be sent, so the step that pushed them over fails (its effect is
        undone as a failed step's is) while the flow can still roll back.
        """
        size = self._too_big({**self.saga.args, **output}) if output else None
        if size is None:
            return None
        what = "sub-flow" if run.is_flow else "step"
        return error_info(
            PayloadTooLarge(
                f"{what} {run.name!r} returned outputs that take the flow's args to "
                f"{size} bytes, over the {self.input.payload_limit}-byte payload limit: "
                "return references (ids, URLs) instead of large values"
            ),
            attempt=0,  # the step's attempts are counted already
        )

    # -- failure ------------------------------------------------------------

    async def _on_stop(self, stop: _Stop) -> FailureInfo:
        if stop.reaction == ABORT:
            await self._settle_children(commit=True)
            return self._info("aborted", stop.run)
        self._flow_to("compensating")
        await self._rollback(stop.run if stop.undo_failed else None)
        if stop.redriving:
            return self._earlier_failure(
                otherwise=f"the redrive could not undo {stop.run.name!r} before resuming",
                forward_only=True,
                run=stop.run,
            )
        return self._info("rolled_back", stop.run)

    def _earlier_failure(
        self, otherwise: str, forward_only: bool = False, run: StepRun | None = None
    ) -> FailureInfo:
        """How a redriven flow ends when it rolls back with no step failing
        forward in this run: its step, reason and error are those of the
        forward failure that ended the earlier run (an undo's error is never
        the reason), or ``otherwise`` is the reason (``forward_only``: also
        when a cancel, not a failure, ended the earlier run; ``run`` then
        names the step)."""
        redrive = self.input.redrive
        failure = redrive.failure if redrive is not None else None
        if failure is None or (forward_only and failure.kind == "cancelled"):
            info = self._info("rolled_back", None, reason=otherwise)
            return info if run is None else info.model_copy(update={"step": run.name})
        info = self._info("rolled_back", None, reason=failure.reason)
        return info.model_copy(update={"step": failure.step, "error": failure.error})

    async def _held_abort(self, stop: _Stop) -> FailureInfo:
        """A sub-flow aborts, keeping its effects, and waits for its parent's
        word: keep them (the parent aborts too), or undo them (the parent was
        cancelled, or another branch rolls it back, meanwhile)."""
        info = self._info("aborted", stop.run)
        await self.runtime.report_aborted(info)
        await self.runtime.wait_until(
            lambda: self.saga.settle is not None or self.runtime.cancel_requested()
        )
        if self.saga.settle or (self.saga.settle is None and not self._cancel_rolls_back):
            await self._settle_children(commit=True)
            if self.saga.settle is None:
                return self._cancelled_in_place(stop.run)
            return info
        self._flow_to("compensating")
        self._undo_every_member()
        failed = stop.run if stop.run.base is None and stop.run.has_effect else None
        await self._rollback(failed)
        if self.saga.settle is None:
            return self._info("cancelled", stop.run, reason="the flow was cancelled")
        return self._info("rolled_back", stop.run, reason="the parent flow rolled back")

    @property
    def _cancel_rolls_back(self) -> bool:
        """Whether the cancel this flow is under (if any) rolls it back."""
        return self.saga.cancel_rollback is not False

    def _cancelled_in_place(self, run: StepRun | None) -> FailureInfo:
        info = self._info("cancelled", run, reason="the flow was cancelled without rollback")
        return info.model_copy(update={"rolled_back": False})

    async def _on_cancel(self) -> FailureInfo:
        self.saga.waits.clear()
        if not self._cancel_rolls_back:
            return await self._stop_in_place()
        self._flow_to("compensating")
        self._undo_every_member()
        in_flight = self.saga.current
        undo: StepRun | None = None
        if in_flight is not None:
            self._stopped(in_flight)
            stopped = _stopped_subflow(in_flight)
            if stopped is not None:
                await self._cancel_subflow(in_flight, stopped)
            elif in_flight.has_effect:
                undo = in_flight
        await self._rollback(undo)
        return self._info("cancelled", in_flight, reason="the flow was cancelled")

    async def _stop_in_place(self) -> FailureInfo:
        """A cancel without rollback: the flow stops where it is. The step in
        flight has been cancelled (its effect, if any, stays); a sub-flow in
        flight stops likewise; sub-flows that ran keep their effects."""
        in_flight = self.saga.current
        if in_flight is not None:
            self._stopped(in_flight)
            stopped = _stopped_subflow(in_flight)
            if stopped is not None:
                await self._cancel_subflow(in_flight, stopped)
        await self._settle_children(commit=True)
        return self._cancelled_in_place(in_flight)

    def _undo_every_member(self) -> None:
        """Have a rollback undo everything a block's members may have done (a
        failed branch too, whatever reaction stopped its block): what a
        cancel, or a parent's word to undo, asks."""
        for run in self.saga.done:
            for member in run.members:
                member.undo_failed = True

    async def _cancel_subflow(self, run: StepRun, sub: SubflowRun) -> None:
        """Cancel a sub-flow stopped mid-run; it undoes itself (unless this
        flow is cancelled without rollback), and says how."""
        rollback = self._cancel_rolls_back
        info = await sub.cancel(rollback)
        self._absorb(info)
        if info.step is not None:
            run.failed_step = info.step  # the step it had in flight (names are flat)
        if not rollback:
            return  # it stopped where it was: the step stays failed
        self._step_to(run, "compensation_failed" if info.failed_compensations else "compensated")

    async def _parent_rollback(self) -> FailureInfo:
        self._flow_to("compensating")
        await self._rollback(None)
        return self._info("rolled_back", None, reason="the parent flow rolled back")

    def _info(
        self, kind: FailureKind, run: StepRun | None, reason: str | None = None
    ) -> FailureInfo:
        error = run.error if run else None
        step = (run.failed_step or run.name) if run else None
        if kind != "aborted" and self.saga.failed_compensations:
            kind = "compensation_failed"
        if reason is None:
            reason = error.describe() if error else "failed"
        return FailureInfo(
            kind=kind,
            flow_id=self.input.root_id,
            step=step,
            reason=reason,
            error=error,
            compensated=list(self.saga.compensated),
            failed_compensations=list(self.saga.failed_compensations),
            compensations=list(self.saga.compensations),
            not_compensated=list(self.saga.not_compensated),
            rollback_stopped=self.saga.rollback_stopped,
        )

    def _undo_order(self, failed: StepRun | None) -> list[StepRun]:
        """What a rollback undoes, in order: ``failed`` (if given), then the
        done stack, newest first (a block's members side by side: listed
        newest branch first)."""
        order: list[StepRun] = []
        for run in ([failed] if failed is not None else []) + self.saga.done[::-1]:
            if run.is_group:
                order.extend(m for m in run.members[::-1] if m.needs_undo())
            else:
                order.append(run)
        return order

    async def _rollback(self, failed: StepRun | None) -> None:
        """Undo ``failed`` (if given) and every completed step, newest first:
        the reverse of the order they depend on each other."""
        with self._span("rollback", path=self.input.path or None):
            for run in ([failed] if failed is not None else []) + self.saga.done[::-1]:
                await self._undo(run)
        if self.saga.rollback_stopped:
            # The sub-flows it did not get to keep their effects, and end (a
            # redrive finishes the rollback from what they report).
            await self._settle_children(commit=True)

    def _left(self, run: StepRun) -> list[str]:
        """The names of what undoing ``run`` would have undone, newest first
        (as the rollback lists what it undid): a stopped rollback leaves them
        as they were."""
        node = run.node
        if run.is_group:
            return [name for m in run.members[::-1] if m.needs_undo() for name in self._left(m)]
        if isinstance(node, FlowNode):
            names = [n.name for _, n, _ in walk(node) if isinstance(n, StepNode) and n.has_back]
            return names[::-1]
        assert isinstance(node, StepNode)
        return [run.name] if node.has_back else []

    async def _undo_group(self, group: StepRun) -> None:
        """Undo a block's members side by side (a map's: at most its
        ``max_concurrency`` at once), each as a step is undone."""
        todo = [member for member in group.members[::-1] if member.needs_undo()]
        self._step_to(group, "compensating")
        limit = _limit(group)
        gate = asyncio.Semaphore(limit) if limit is not None and limit < len(todo) else None

        async def undo(member: StepRun) -> None:
            if gate is None:
                await self._undo(member)
                return
            async with gate:
                await self._undo(member)  # (left alone once the rollback stopped)

        marks = self._compensation_marks()
        await asyncio.gather(*(undo(member) for member in todo))
        self._in_the_order_they_ended(marks)
        failed = any(m.status == "compensation_failed" for m in todo)
        self._step_to(group, "compensation_failed" if failed else "compensated")

    def _compensation_marks(self) -> tuple[int, int, int]:
        saga = self.saga
        return len(saga.compensations), len(saga.compensated), len(saga.failed_compensations)

    def _in_the_order_they_ended(self, marks: tuple[int, int, int]) -> None:
        """Put the undos listed since ``marks`` in the order they ended: a
        sub-flow's are listed when its whole rollback ends, though they ran
        beside its siblings' (whose own may have ended in between)."""
        saga = self.saga
        at, names, failed = marks
        tail = saga.compensations[at:]
        done = [c.name for c in tail if c.status == "compensated"]
        not_done = [c.name for c in tail if c.status == "compensation_failed"]
        if (
            any(c.ended_at is None for c in tail)  # a sub-flow of an older QWIT
            or done != saga.compensated[names:]
            or not_done != saga.failed_compensations[failed:]  # a shortened list
        ):
            return  # left as they came
        tail.sort(key=lambda c: c.ended_at or 0.0)  # stable: ties keep their order
        saga.compensations[at:] = tail
        saga.compensated[names:] = [c.name for c in tail if c.status == "compensated"]
        saga.failed_compensations[failed:] = [
            c.name for c in tail if c.status == "compensation_failed"
        ]

    async def _undo(self, run: StepRun) -> None:
        node = run.node
        if self.saga.rollback_stopped:
            self.saga.not_compensated.extend(self._left(run))
            return
        if isinstance(node, ParallelNode | MapNode):
            await self._undo_group(run)
            return
        self._step_to(run, "compensating")
        if isinstance(node, FlowNode) and run.recorded is not None:
            for inner in run.recorded[::-1]:
                if _to_undo(inner):
                    await self._undo(inner)
            failed = any(r.status == "compensation_failed" for r in _all_runs(run.recorded))
            self._step_to(run, "compensation_failed" if failed else "compensated")
            return
        if isinstance(node, FlowNode):
            assert run.sub is not None
            info = await run.sub.settle(commit=False)
            if info is not None:
                self._absorb(info)
            failed = info is not None and bool(info.failed_compensations)
            self._step_to(run, "compensation_failed" if failed else "compensated")
            return
        if not node.has_back:
            self._undone(run, None)
            return
        while True:
            call = self._call(run, "step_back", _back_args(run))
            try:
                result = await self._step_call(run, node, call)
            except StepFailure as failure:
                run.back_attempts += failure.info.attempt
                run.back_error = failure.info
                self._step_to(run, "compensation_failed")
                stop = node.back_on_failure == ABORT
                if node.back_on_failure == WAIT:
                    decision = await self._wait(run, "step_back", BACK_DECISIONS)
                    if decision.reaction == RETRY:
                        # Its args go to the undo (older QWIT dropped them).
                        if decision.args and self.runtime.patched(BACK_RETRY_ARGS):
                            run.back_args = {**(run.back_args or {}), **decision.args}
                        self._step_to(run, "compensating")
                        continue
                    stop = decision.reaction == ABORT
                self._undone(run, failure.info)
                if stop:
                    self.saga.rollback_stopped = True  # what is left stays as it is
                return
            run.back_attempts += result.attempt
            self._undone(run, None)
            return

    def _undone(self, run: StepRun, error: ErrorInfo | None) -> None:
        """Record the end of one step's undo: done, or failed with ``error``."""
        status: Literal["compensated", "compensation_failed"] = (
            "compensated" if error is None else "compensation_failed"
        )
        self._step_to(run, status)
        self._metric("qwit_compensations", 1, step=run.name, outcome=status)
        (self.saga.compensated if error is None else self.saga.failed_compensations).append(
            run.name
        )
        self.saga.compensations.append(
            Compensation(
                name=run.name,
                path=run.path,
                status=status,
                error=error,
                ended_at=self.runtime.now() if self.input.execution is not None else None,
            )
        )

    def _absorb(self, info: FailureInfo) -> None:
        """Take in what a sub-flow undid (it rolled itself back)."""
        self.saga.compensated.extend(info.compensated)
        self.saga.failed_compensations.extend(info.failed_compensations)
        self.saga.compensations.extend(info.compensations)
        self.saga.not_compensated.extend(info.not_compensated)
        self.saga.rollback_stopped |= info.rollback_stopped

    async def _commit_children(self) -> None:
        """Every step has run: tell the sub-flows that wait for this flow's
        word to keep their effects. A cancel that comes meanwhile is too
        late (some may have ended already): the flow completes."""
        if not self._waiting_subs():
            return
        if self.runtime.patched(COMMIT_THROUGH_CANCEL):
            await self.runtime.shield(self._settle_children(commit=True))
        else:
            await self._settle_children(commit=True)

    def _waiting_subs(self) -> list[SubflowRun]:
        """The sub-flows that wait for this flow's word (their steps all ran,
        or they aborted)."""
        runs = [run for top in self.saga.done for run in (top.members if top.is_group else [top])]
        current = self.saga.current
        if current is not None and current not in self.saga.done:
            runs.append(current)  # a sub-flow that aborted the flow
        return [
            run.sub
            for run in runs
            if run.sub is not None
            and (run.status == "done" or (run.status == "failed" and run.sub.held))
        ]

    async def _settle_children(self, commit: bool) -> None:
        """Tell every sub-flow that waits for this flow's word to keep its
        effects, or to undo them."""
        subs = self._waiting_subs()
        if subs:
            await asyncio.gather(*(sub.settle(commit=commit) for sub in subs))

    # -- operator decisions ----------------------------------------------------

    async def _wait(
        self, run: StepRun, direction: Literal["step_forward", "step_back"], allowed: list[Reaction]
    ) -> Decision:
        error = run.back_error if direction == "step_back" else run.error
        assert error is not None
        self.saga.waits[run.path] = WaitInfo(
            step=run.failed_step or run.name,
            path=run.path,
            flow_id=self.flow_id,
            direction=direction,
            error=error,
            allowed=[r.value for r in allowed],
            rollback_preview=self._preview(run) if direction == "step_forward" else [],
        )
        self.saga.decisions.pop(run.path, None)
        self._flow_to("waiting")
        step = run.failed_step or run.name
        self._metric("qwit_waits", 1, step=step)
        began = self.runtime.now()
        # A waiting member of a block or map lets the others run on in its
        # place; it takes a place again to run once more.
        slot = self._slots.get(run.path) if direction == "step_forward" else None
        if slot is not None and slot.held and self.runtime.patched(WAIT_FREES_SLOT):
            slot.give()
        if direction == "step_forward" and self.input.gives_place and run.base is None:
            # So does a sub-flow, in its parent's block, once nothing else in
            # it runs: a step of its own sequence waits, or members of a
            # block in it wait and none of the others runs or may start.
            await self._give_place_back()
        elif direction == "step_forward" and self._gives_place_while_idle():
            await self._give_place_if_idle(run)
        # No try/finally: a wait that ends in an exception (a cancel, or the
        # engine dropping this flow) must not change the status, because that
        # may publish it, and a dropped flow's coroutine can be closed later,
        # in another flow's context. The cancel path sets the status itself.
        await self.runtime.wait_until(lambda: run.path in self.saga.decisions)
        self._metric("qwit_wait_seconds", self.runtime.now() - began, step=step)
        del self.saga.waits[run.path]
        self._flow_to(self.saga.phase)
        decision = self.saga.decisions.pop(run.path)
        if slot is not None and not slot.held and decision.reaction == RETRY:
            await slot.take()
        if direction == "step_forward" and decision.reaction in (RETRY, SKIP):
            await self._take_place_back()  # (a sub-flow that gave it back)
        elif (
            direction == "step_forward"
            and decision.reaction in (ROLLBACK, SKIPBACK)
            and (self._place_given or self._place_asked)
            and self.runtime.patched(UNDO_TAKES_PLACE)
        ):
            await self._take_place_back()  # its undos count under the limit too
        return decision

    def _groups(self) -> dict[int, StepRun]:
        """The block (or map) each member belongs to, by the member's id()."""
        return {
            id(member): group
            for group in _all_runs(self.saga.runs)
            if group.is_group
            for member in group.members
        }

    def _preview(
        self, failed: StepRun, groups: dict[int, StepRun] | None = None
    ) -> list[PreviewItem]:
        """What a ROLLBACK decided for ``failed`` (waiting) would undo, in
        order (``groups``: ``_groups()``, when previewing several waits)."""
        group = (self._groups() if groups is None else groups).get(id(failed))
        if (
            group is not None
            and group.status == "running"
            and len(group.members) <= PREVIEW_MEMBERS
        ):
            # A member of a block in progress: the block stops, and its
            # members are undone side by side (newest first) before what ran
            # before it; a running one once it has stopped, one that failed if
            # it may have done something.
            order = [
                m
                for m in group.members[::-1]
                if m.status in ("done", "compensation_failed", "running")
                or (m.status == "failed" and m.has_effect)
            ] + self._undo_order(None)
        else:
            order = self._undo_order(failed if failed.has_effect else None)
        return [
            PreviewItem(
                name=run.name,
                path=run.path,
                args=_back_args(run) if isinstance(run.node, StepNode) else {},
            )
            for run in order
        ]

    def _rollbacks_after(self) -> dict[str, list[PreviewItem]]:
        """For each sub-flow that runs and whose failure rolls this flow back
        whatever it failed with: what the rollback would undo once the
        sub-flow has undone itself (``StepState.rollback_after``), by path."""
        running = [
            run
            for run in _all_runs(self.saga.runs)
            if isinstance(run.node, FlowNode)
            and run.status == "running"
            and run.sub is not None
            and run.node.on_failure.reactions() <= {ROLLBACK, SKIPBACK}
        ]
        if not running:
            return {}
        groups = self._groups()
        return {
            run.path: [item for item in self._preview(run, groups) if item.path != run.path]
            for run in running
        }

    def check_decision(
        self, reaction: Any, args: Any = None, path: str | None = None, *, pending_too: bool = False
    ) -> Decision:
        """Validate an operator's decision without applying it.

        Args:
            path: The waiting step it decides; needed only when several wait.
            pending_too: Count a step decided already, whose decision the
                flow has not acted on yet, as waiting still.

        Raises:
            ReactionError: the flow is not waiting (or not at ``path``, or at
                several paths and none was named; a step decided already
                waits no more), or the reaction or args are not valid for
                what it waits on.
        """

        # a failed undo waits: what a RETRY's args reach is that undo alone
        def undo_at(path: str) -> StepRun | None:
            return next((r for r in _all_runs(self.saga.runs) if r.path == path), None)

        def back_fields(waiting: WaitInfo) -> tuple[str, ...] | None:
            undo = undo_at(waiting.path)
            return undo.node.back_fields if undo and isinstance(undo.node, StepNode) else None

        decision, waiting = check_reaction(
            self.flow_id, self._waits(pending_too), reaction, args, path, back_fields, self.status
        )
        extra = decision.args
        undo = undo_at(waiting.path) if waiting.direction == "step_back" else None
        if undo is not None:
            size = self._too_big(_back_args(undo, extra)) if extra else None
            what = "the undo's args"
        else:
            size = self._too_big({**self.saga.args, **extra}) if extra else None
            what = "the flow's args"
        if size is not None:
            raise ReactionError(
                f"flow {self.flow_id!r}: with these args {what} would take {size} "
                f"bytes, over the {self.input.payload_limit}-byte payload limit"
            )
        return decision

    def decide(self, decision: Decision, *, over_pending: bool = False) -> Decision:
        """Apply a decision checked by ``check_decision``; the decision as
        checked (its ``path`` set), which the waiting step takes in.

        Args:
            over_pending: A decision the flow can't take as it stands may
                replace one made for the same step that the flow has not
                acted on yet, instead of being refused (as older QWIT took
                them: Temporal flows replay the updates they accepted).
        """
        try:
            checked = self.check_decision(decision.reaction, decision.args, decision.path)
        except ReactionError:
            if not over_pending:
                raise
            checked = self.check_decision(
                decision.reaction, decision.args, decision.path, pending_too=True
            )
        assert checked.path is not None
        self.saga.decisions[checked.path] = checked
        return checked

    def taken_in(self, decision: Decision) -> bool:
        """Whether the step ``decision`` (as ``decide`` returned it) is for
        has taken it in."""
        return self.saga.decisions.get(decision.path or "") is not decision

    def request_cancel(self, rollback: bool) -> None:
        """Someone asked through QWIT to cancel the flow, rolling it back or
        not; the engine then cancels the flow's task. The first request
        decides."""
        if self.saga.cancel_rollback is None and not self.runtime.cancel_requested():
            self.saga.cancel_rollback = rollback

    def settle(self, commit: bool) -> None:
        """A sub-flow's parent decided: keep (True) or undo (False) its effects."""
        if self.saga.settle is None:
            self.saga.settle = commit

    # -- state -----------------------------------------------------------------

    def state(self) -> FlowState:
        """The flow's progress, as ``handle.state()`` reports it."""
        waits = self._waits()
        if any(w.direction == "step_forward" for w in waits):
            # what a ROLLBACK would undo now (members of a block may have
            # ended since the wait began)
            runs = {run.path: run for run in _all_runs(self.saga.runs)}
            groups = self._groups()
            waits = [
                w.model_copy(update={"rollback_preview": self._preview(runs[w.path], groups)})
                if w.direction == "step_forward" and w.path in runs
                else w
                for w in waits
            ]
        status = self.saga.status
        if status == "waiting" and not waits:  # decided: it goes on at once
            status = self.saga.phase
        after = self._rollbacks_after()
        return FlowState(
            flow=self.input.flow.name,
            flow_id=self.flow_id,
            status=status,
            steps=[_step_state(run, after=after) for run in self.saga.runs]
            + [_step_state(run, final=True) for run in self.saga.finals],
            waiting=waits[0] if waits else None,
            waits=waits,
            failure=self.saga.failure,
            args=self.saga.args,
            events=[
                FlowEvent.model_validate(dict(zip(EVENT_FIELDS, row, strict=True)))
                for row in self.saga.events
            ],
            redrive_of=self.input.redrive.of_run if self.input.redrive else None,
        )


def stopped_by_cancel(waits: list[WaitInfo], path: str | None) -> bool:
    """Whether a decision for ``path`` (None: the only wait) would decide a
    step that a cancel under way stops: a failed forward's wait goes as the
    cancel reaches it. A failed undo's wait (``back_on_failure=WAIT``), which
    the cancel's own rollback may meet, is still decided. (No such wait:
    False, and ``check_reaction`` says why.)"""
    try:
        return choose_wait("", waits, path).direction == "step_forward"
    except ReactionError:
        return False


def check_reaction(
    flow_id: str,
    waits: list[WaitInfo],
    reaction: Any,
    args: Any,
    path: str | None,
    back_fields: Callable[[WaitInfo], tuple[str, ...] | None],
    status: str,
) -> tuple[Decision, WaitInfo]:
    """An operator's decision for one of ``waits`` (the steps of flow
    ``flow_id`` that wait, in plan order), checked against what that step
    waits for; and that wait. ``back_fields`` gives what the ``step_back`` of
    a waiting undo reads (None: all args). Every engine checks decisions
    with this, the flow itself and a client that reads its saved state alike.

    Raises:
        ReactionError: nothing waits (``status`` says what the flow is), or
            not at ``path``, or several wait and ``path`` is None; or the
            reaction is not one the step allows, or the args are not JSON,
            come with another reaction than RETRY, or name args the undo's
            ``step_back`` does not read.
    """
    if not waits:
        raise ReactionError(f"flow {flow_id!r} is not waiting (it is {status})")
    waiting = choose_wait(flow_id, waits, path)
    allowed = frozenset(Reaction(r) for r in waiting.allowed)
    try:
        chosen = parse_reaction(reaction, allowed=allowed)
    except ValueError as exc:
        raise ReactionError(f"flow {flow_id!r}: {exc}") from None
    try:
        extra = as_args(args, "args")
    except NotJSON as exc:
        raise ReactionError(f"flow {flow_id!r}: args {exc}") from None
    if extra and chosen != RETRY:
        raise ReactionError(f"flow {flow_id!r}: args only go with {RETRY.value!r}")
    fields = back_fields(waiting) if waiting.direction == "step_back" else None
    unread = sorted(set(extra) - set(fields)) if fields is not None else []
    if unread:
        raise ReactionError(
            f"flow {flow_id!r}: the step_back of {waiting.step!r} reads only "
            f"{sorted(fields or ())}, not {unread}"
        )
    return Decision(reaction=chosen, args=extra, path=waiting.path), waiting


def _step_state(
    run: StepRun, final: bool = False, after: dict[str, list[PreviewItem]] | None = None
) -> StepState:
    return StepState(
        name=run.name,
        path=run.path,
        status=run.status,
        attempts=run.attempts,
        back_attempts=run.back_attempts,
        back_error=run.back_error,
        kind=run.kind,
        has_back=not isinstance(run.node, StepNode) or run.node.has_back,
        error=run.error,
        flow_id=run.sub.flow_id if run.sub else None,
        index=run.index,
        final=final,
        steps=[_step_state(member, after=after) for member in run.members],
        rollback_after=(after or {}).get(run.path, []),
    )


def _kept(
    group: StepRun, path: str, item: str | None = None, element: Any = None
) -> StepRun | None:
    """The member at ``path`` of ``group`` that a redrive keeps as it
    completed (a map's element, only if it ran on the same item)."""
    kept = (group.kept or {}).get(path)
    if kept is None or (item is not None and (kept.args or {}).get(item) != element):
        return None
    return kept


def _stopped_subflow(run: StepRun) -> SubflowRun | None:
    """The sub-flow ``run`` started, if it was stopped mid-run (it had not
    ended, failed or aborted, on its own): cancelled, it undoes itself."""
    sub = run.sub
    if not run.is_flow or sub is None or sub.held:
        return None
    return sub if run.status == "failed" and run.error is None else None


def _all_runs(runs: list[StepRun]) -> list[StepRun]:
    """``runs`` and everything inside them (members, recorded sub-flow steps)."""
    found = []
    for run in runs:
        found.append(run)
        found += _all_runs(run.members) + _all_runs(run.recorded or [])
    return found


def _to_undo(run: StepRun) -> bool:
    """Whether a step an earlier run ended with has something left to undo."""
    if run.is_group:
        return any(_to_undo(member) for member in run.members)
    if run.recorded is not None:
        return any(_to_undo(inner) for inner in run.recorded)
    if run.status in ("done", "compensation_failed"):
        return True
    return run.status == "failed" and run.has_effect


def _record_of(run: StepRun) -> StepRecord:
    return StepRecord(
        path=run.path,
        status=run.status,
        args=run.args,
        output=run.output,
        key=run.key,
        attempts=run.attempts,
        effect=run.status == "failed" and run.has_effect and not run.skipped_back,
        held=run.held or (run.sub is not None and run.sub.held),
        members=[_record_of(member) for member in run.members],
        sub_id=run.sub.flow_id if run.sub is not None else None,
        sub=None if run.recorded is None else [_record_of(r) for r in run.recorded],
        sharded=run.sharded,
    )


def _limit(group: StepRun) -> int | None:
    """How many of a block's members run (or are undone) at once: all of a
    parallel block's, a map's ``max_concurrency``, one shard at a time."""
    node = group.node
    if not isinstance(node, MapNode):
        return None
    return 1 if group.sharded else node.max_concurrency


def _shard(node: MapNode, start: int, total: int) -> FlowNode:
    """The plan of the shard of ``node`` whose first element is ``start``."""
    end = min(start + node.shard_size, total)
    return FlowNode(
        name=f"{node.name} [{start}:{end}]",
        steps=(node.model_copy(update={"offset": start}),),
    )


def _clash(members: list[StepRun]) -> ErrorInfo | None:
    """The error of a block two of whose branches returned the same key."""
    owner: dict[str, StepRun] = {}
    for member in members:
        if member.status != "done" or not member.output:
            continue
        for key in member.output:
            first = owner.setdefault(key, member)
            if first is not member:
                return error_info(
                    ArgumentsError(
                        f"branches {first.name!r} ({first.path}) and {member.name!r} "
                        f"({member.path}) both returned {key!r}: the parallel block can't "
                        "merge their outputs"
                    ),
                    started=False,
                    with_traceback=False,
                )
    return None


__all__ = [
    "Decision",
    "FlowFailure",
    "FlowRuntime",
    "Interpreter",
    "SagaState",
    "StepRun",
    "SubflowRun",
]
