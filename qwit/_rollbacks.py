"""``check_rollbacks``: a fault matrix for a user's flow.

The flow runs once without a fault, then once per step and per kind of
failure, with the user's own step code. The failure is injected where the
engine runs a step: each step class is served as an instrumented subclass
(the user's classes are left as they are) whose methods record every call
and, at the chosen step, fail after the user's method has returned, hang
past the attempt's deadline, or fail an undo. Every case is then checked
against the saga rules, from what the harness recorded itself: a model of
the rules predicts, from the plan and the recorded calls, what must be
undone and how the flow ends, and QWIT's own account (its outcome,
``compensated``...) must agree with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._context import context
from ._engine import Backend, Engine, FlowHandle
from ._errors import Compensation, FlowFailed, ReactionError, StepError, qualified_name
from ._flow import Flow, compile_flow, step_classes
from ._options import ABORT, FALLBACK, ROLLBACK, SKIP, SKIPBACK, WAIT, Reaction, Retry
from ._plan import FlowInput, FlowNode, MapNode, Node, ParallelNode, StepNode, child_path
from ._state import StepState
from ._step import Step, defines

if TYPE_CHECKING:
    from ._client import Client
    from ._memory import Heartbeats
    from ._plan import StepCall

#: The kinds of failure a case injects, in the order a step's cases run.
Kind = Literal["none", "raises", "non_retryable", "timeout", "undo_fails"]
KINDS: tuple[Kind, ...] = ("raises", "non_retryable", "timeout", "undo_fails")

#: The ``timeout`` case's limit for one attempt of its step, in seconds, and
#: the ``timeout_grace`` it gets (set in the case's plan).
CASE_TIMEOUT = 0.2
CASE_GRACE = 0.1
#: Waits between attempts (of every step, both directions, and retried
#: segments) are cut to this many seconds in every case's plan; the number of
#: attempts stays the flow's own.
RETRY_WAIT = 0.01
#: How long a case may run before the harness cancels its flow (a violation).
CASE_LIMIT = 60.0
#: How long an injected hang lasts at most (the attempt's deadline ends it).
HANG = 30.0

Outcome = Literal["ok", "failed", "cancelled", "timed_out"]


class InjectedFault(Exception):
    """The retryable error ``check_rollbacks`` makes a step raise (``raises``)."""


class InjectedUndoFault(Exception):
    """The error ``check_rollbacks`` makes a ``step_back`` raise (``undo_fails``)."""


# Both read as qwit.testing's, where they are exported (error types name them).
InjectedFault.__module__ = InjectedUndoFault.__module__ = "qwit.testing"


@dataclass(frozen=True)
class StepCallRecord:
    """One call of a step's method (one attempt), as the harness saw it.

    Attributes:
        path: The step's path (``qwit.context().path``).
        step: The step's name.
        direction: ``step_forward``, ``step_back`` or ``step_fallback``.
        key: The call's idempotency key.
        attempt: Its attempt number (1, 2...).
        start: When the user's method was called (seconds since the case
            started, from a monotonic clock).
        end: When the call ended: the user's method returned or raised (and,
            for an injected hang, the hang ended).
        outcome: ``ok``, ``failed``, ``cancelled`` (stopped from outside) or
            ``timed_out`` (an injected hang cut at the attempt's deadline).
        error: The error it ended with, in words (``Type: message``).
        error_types: Qualified class names of that error, most specific first.
        injected: The failure was the harness's own.
    """

    path: str
    step: str
    direction: str
    key: str
    attempt: int
    start: float
    end: float
    outcome: Outcome
    error: str | None = None
    error_types: tuple[str, ...] = ()
    injected: bool = False


@dataclass
class RollbackCase:
    """One run of the flow with one fault, and what was found.

    Attributes:
        step: The name of the step the fault is injected at ("" for the run
            without a fault).
        path: That step's path (for a map: its first element's).
        kind: ``none``, ``raises``, ``non_retryable``, ``timeout`` or
            ``undo_fails``.
        outcome: How the flow ended: ``completed``, ``rolled_back``,
            ``compensation_failed``, ``aborted``, ``cancelled``; ``did not
            end`` (the harness cancelled it after ``CASE_LIMIT`` seconds and it
            did not stop either); or ``skipped`` (the case could not be
            made; ``notes`` say why).
        expected: The outcome the saga rules predict ("" when they can't).
        undone: The names of the steps whose ``step_back`` ran to its end,
            in the order they ended; an undo that failed for good reads
            ``name (failed)``.
        violations: The saga rules the case broke (empty: none).
        notes: What the harness did or could not check (e.g. it decided
            ROLLBACK for a waiting flow).
        calls: Every step call of the case, in the order they started.
        fails_at: For ``undo_fails``: the path of the step the flow is made
            to fail at.
        flow_id: The id of the case's flow.
        result: The flow's final args, when it completed.
        error: The flow's failure, when it did not complete.
        seconds: How long the case took.
    """

    step: str
    path: str
    kind: Kind
    outcome: str = ""
    expected: str = ""
    undone: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calls: list[StepCallRecord] = field(default_factory=list)
    fails_at: str | None = None
    flow_id: str = ""
    result: dict[str, Any] | None = None
    error: FlowFailed | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """The case in words: ``2 payments.charge: raises``."""
        if self.kind == "none":
            return "no fault"
        return f"{self.path} {self.step}: {self.kind}"


@dataclass
class RollbackReport:
    """What ``check_rollbacks`` ran and found.

    Attributes:
        flow: The flow's name.
        engine: The engine the cases ran on.
        cases: Every case, the run without a fault first.
    """

    flow: str
    engine: str
    cases: list[RollbackCase] = field(default_factory=list)

    @property
    def failed(self) -> list[RollbackCase]:
        """The cases with a violation, in the order they ran."""
        return [case for case in self.cases if case.violations]

    def table(self) -> str:
        """The cases as a text table: case, outcome, undone, violations."""
        rows = [("case", "outcome", "undone", "violations")]
        for case in self.cases:
            rows.append(
                (
                    case.label,
                    case.outcome,
                    ", ".join(case.undone) or "-",
                    "; ".join(v.splitlines()[0] for v in case.violations) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 10)
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return f"check_rollbacks of {self.flow} on {self.engine}:\n{self.table()}"


class RollbackCheckFailed(AssertionError):
    """A case of ``check_rollbacks`` broke a saga rule.

    Attributes:
        report: The whole report.
        case: The first case with a violation.
    """

    def __init__(self, report: RollbackReport, case: RollbackCase) -> None:
        self.report = report
        self.case = case
        found = "\n".join(f"  - {violation}" for violation in case.violations)
        others = len(report.failed) - 1
        more = f" ({others} more case(s) with violations)" if others else ""
        super().__init__(
            f"check_rollbacks of {report.flow}: case {case.label!r} broke the saga rules"
            f"{more}:\n{found}\n\n{report.table()}"
        )


#: ``oracle(case)``: sync, or async (its result is awaited).
Oracle = Callable[[RollbackCase], Any]


# -- the faults, and the instrumented steps -------------------------------------


@dataclass(frozen=True)
class _Fault:
    """What one case injects, by path."""

    forward: dict[str, str] = field(default_factory=dict)
    """Paths whose ``step_forward`` fails: ``raises``, ``non_retryable`` or ``timeout``."""
    fallback: frozenset[str] = frozenset()
    """Paths whose ``step_fallback`` fails (not retryable)."""
    back: frozenset[str] = frozenset()
    """Paths whose ``step_back`` fails on every attempt."""


def _error_types(exc: BaseException | type[BaseException]) -> tuple[str, ...]:
    cls = exc if isinstance(exc, type) else type(exc)
    return tuple(qualified_name(c) for c in cls.__mro__ if c not in (BaseException, object))


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception:
        message = ""
    return f"{name}: {message}" if message else name


class _Call:
    """One call of a step's method in progress, and what the case injects in it."""

    def __init__(self, probe: _Probe, direction: str) -> None:
        ctx = context()
        self.probe = probe
        self.path = ctx.path
        self.step = ctx.step
        self.direction = direction
        self.key = ctx.idempotency_key
        self.attempt = ctx.attempt
        self.start = probe.now()
        fault = probe.fault
        self.action: str | None = None
        if direction == "step_forward":
            self.action = fault.forward.get(self.path)
        elif direction == "step_fallback" and self.path in fault.fallback:
            self.action = "non_retryable"
        elif direction == "step_back" and self.path in fault.back:
            self.action = "undo_fails"

    def injected(self) -> BaseException | None:
        """The error to raise once the user's method returned, if any."""
        where = f"{self.direction} of {self.step} ({self.path})"
        if self.action == "raises":
            return InjectedFault(f"check_rollbacks: {where} raises after it returned")
        if self.action == "non_retryable":
            return StepError(
                f"check_rollbacks: {where} fails after it returned (not retryable)", retry=False
            )
        if self.action == "undo_fails":
            return InjectedUndoFault(f"check_rollbacks: {where} fails")
        return None

    def end(
        self, outcome: Outcome, error: BaseException | None = None, injected: bool = False
    ) -> None:
        self.probe.record(
            StepCallRecord(
                path=self.path,
                step=self.step,
                direction=self.direction,
                key=self.key,
                attempt=self.attempt,
                start=self.start,
                end=self.probe.now(),
                outcome=outcome,
                error=_describe(error) if error is not None else None,
                error_types=_error_types(error) if error is not None else (),
                injected=injected,
            )
        )


def _wrap(original: Callable[..., Any], direction: str) -> Callable[..., Any]:
    """``original`` (a step's method), recording each call and injecting the
    case's fault: after the user's method returned (its effect happened), or,
    for an undo that fails, instead of it."""
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            call = _Call(type(self)._qwit_probe, direction)
            if call.action == "undo_fails":
                fault = call.injected()
                assert fault is not None
                call.end("failed", fault, injected=True)
                raise fault
            try:
                result = await original(self, *args, **kwargs)
            except asyncio.CancelledError:
                call.end("timed_out" if call.action == "timeout" else "cancelled")
                raise
            except BaseException as exc:
                call.end("failed", exc)
                raise
            if call.action == "timeout":  # outlive the attempt's deadline
                try:
                    await asyncio.sleep(HANG)
                finally:
                    call.end("timed_out", injected=True)
                return result
            fault = call.injected()
            call.end("ok" if fault is None else "failed", fault, injected=fault is not None)
            if fault is not None:
                raise fault
            return result

        return method

    @functools.wraps(original)
    def plain(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = _Call(type(self)._qwit_probe, direction)
        if call.action == "undo_fails":
            fault = call.injected()
            assert fault is not None
            call.end("failed", fault, injected=True)
            raise fault
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            call.end("failed", exc)
            raise
        if call.action == "timeout":  # outlive the deadline, until told to stop
            ctx = context()
            until = time.monotonic() + HANG
            while not ctx.cancelled and time.monotonic() < until:
                time.sleep(0.005)
            call.end("timed_out", injected=True)
            return result
        fault = call.injected()
        call.end("ok" if fault is None else "failed", fault, injected=fault is not None)
        if fault is not None:
            raise fault
        return result

    return plain


class _Probe:
    """The harness's side of one check: the instrumented step classes, the
    current case's fault, and the calls recorded."""

    def __init__(self) -> None:
        self.fault = _Fault()
        self.calls: list[StepCallRecord] = []
        self.origin = time.monotonic()
        self._lock = threading.Lock()
        self._classes: dict[type[Step], type[Step]] = {}

    def now(self) -> float:
        return time.monotonic() - self.origin

    def record(self, call: StepCallRecord) -> None:
        with self._lock:
            self.calls.append(call)

    def begin_case(self, fault: _Fault) -> None:
        with self._lock:
            self.fault = fault
            self.calls = []
            self.origin = time.monotonic()

    def instrumented(self, cls: type[Step]) -> type[Step]:
        """A subclass of ``cls`` (same name) whose methods record and inject."""
        found = self._classes.get(cls)
        if found is not None:
            return found
        body: dict[str, Any] = {
            "_qwit_probe": self,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        for direction in ("step_forward", "step_back", "step_fallback"):
            if defines(cls, direction):
                body[direction] = _wrap(getattr(cls, direction), direction)
        made = types.new_class(cls.__name__, (cls,), {"name": cls.name}, lambda ns: ns.update(body))
        self._classes[cls] = made
        return made


# -- the in-process engine of the cases -------------------------------------------


def _local_engine(probe: _Probe) -> Engine:
    """A ``qwit.local`` engine whose steps run as ``probe``'s instrumented classes."""
    from .local import LocalEngine, LocalRuntime

    class CheckRuntime(LocalRuntime):
        async def run_attempt(
            self,
            cls: type[Any],
            node: StepNode,
            call: StepCall,
            attempt: int,
            beats: Heartbeats,
        ) -> Any:
            return await super().run_attempt(probe.instrumented(cls), node, call, attempt, beats)

    class CheckEngine(LocalEngine):
        runtime_class = CheckRuntime

    return CheckEngine()


@contextlib.asynccontextmanager
async def _temporal_engine(
    client: Client, flow: type[Flow], probe: _Probe
) -> AsyncIterator[Engine]:
    """A Temporal worker serving ``probe``'s instrumented steps on a fresh task
    queue of ``client``'s Temporal, and an engine that starts flows there."""
    from ._client import Client as QwitClient
    from .temporal import TemporalEngine, create_worker

    engine = client.engine(_temporal_backend())
    assert isinstance(engine, TemporalEngine)
    temporal = await engine.temporal_client()
    queue = f"qwit-check-{uuid.uuid4().hex[:12]}"
    steps = [probe.instrumented(cls) for cls in step_classes(flow)]
    async with create_worker(temporal, *steps, task_queue=queue):
        own = QwitClient(temporal_client=temporal, task_queue=queue)
        try:
            yield own.engine(_temporal_backend())
        finally:
            await own.close()


def _temporal_backend() -> Backend:
    from . import temporal

    return temporal


# -- plans ----------------------------------------------------------------------


def _quick(retry: Retry) -> Retry:
    """``retry`` with its waits cut to ``RETRY_WAIT`` (its attempts kept)."""
    return retry.model_copy(
        update={
            "initial_interval": min(retry.initial_interval, RETRY_WAIT),
            "max_interval": min(retry.max_interval, RETRY_WAIT),
        }
    )


StepEdit = Callable[[str, StepNode], StepNode]


def _rewrite(flow: FlowNode, prefix: str, edit: StepEdit) -> FlowNode:
    """``flow`` with every step passed through ``edit(path, step)`` and every
    retried segment's waits cut. A map's element is edited at its first
    element's path."""
    steps = tuple(
        _rewrite_node(node, child_path(prefix, i), edit) for i, node in enumerate(flow.steps)
    )
    first = len(flow.steps)
    finals = tuple(
        edit(child_path(prefix, first + i), node) for i, node in enumerate(flow.finally_steps)
    )
    retry = _quick(flow.retry) if flow.retry is not None else None
    return flow.model_copy(update={"steps": steps, "finally_steps": finals, "retry": retry})


def _rewrite_node(node: Node, path: str, edit: StepEdit) -> Any:
    if isinstance(node, StepNode):
        return edit(path, node)
    if isinstance(node, FlowNode):
        return _rewrite(node, path, edit)
    if isinstance(node, ParallelNode):
        branches = tuple(
            _rewrite_node(branch, child_path(path, i), edit)
            for i, branch in enumerate(node.branches)
        )
        return node.model_copy(update={"branches": branches})
    return node.model_copy(update={"node": _rewrite_node(node.node, f"{path}.1", edit)})


@dataclass(frozen=True)
class _Target:
    path: str
    node: StepNode
    final: bool


def _targets(flow: FlowNode, prefix: str = "", final: bool = False) -> Iterator[_Target]:
    """Every step of the plan, in plan order, at its path (a map's: at its
    first element's), final steps flagged."""
    for i, node in enumerate((*flow.steps, *flow.finally_steps)):
        yield from _node_targets(node, child_path(prefix, i), final or i >= len(flow.steps))


def _node_targets(node: Node, path: str, final: bool) -> Iterator[_Target]:
    if isinstance(node, StepNode):
        yield _Target(path, node, final)
    elif isinstance(node, FlowNode):
        yield from _targets(node, path, final)
    elif isinstance(node, ParallelNode):
        for i, branch in enumerate(node.branches):
            yield from _node_targets(branch, child_path(path, i), final)
    else:
        yield from _node_targets(node.node, f"{path}.1", final)


def _node_at(plan: FlowNode, path: str) -> Node | None:
    """The plan's node at a run path (any element of a map: its node)."""
    node: Node = plan
    if not path:
        return node
    for part in path.split("."):
        if not part.isdigit():
            return None  # a shard of a large map
        index = int(part) - 1
        if isinstance(node, FlowNode):
            children: tuple[Node, ...] = (*node.steps, *node.finally_steps)
        elif isinstance(node, ParallelNode):
            children = node.branches
        elif isinstance(node, MapNode):
            children = (node.node,)
            index = 0
        else:
            return None
        if not 0 <= index < len(children):
            return None
        node = children[index]
    return node


def _ancestors(plan: FlowNode, path: str) -> list[tuple[str, Node]]:
    """The nodes that contain the step at ``path``, innermost first (the root last)."""
    parts = path.split(".")
    found: list[tuple[str, Node]] = []
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        node = _node_at(plan, prefix)
        if node is not None:
            found.append((prefix, node))
    return found


#: What a ``StepError(retry=False)`` is, to an ``on_failure`` mapping.
_STEP_ERROR = ("qwit.StepError", "builtins.Exception")


def _rolls_back_root(plan: FlowNode, path: str, itself: bool = False) -> bool:
    """Whether a step at ``path`` failing for good (not retryable, its
    fallback failing too) rolls the whole flow back, by the plan's reactions
    (WAIT decided ROLLBACK, as the harness does); with ``itself``, undoing
    that step too (not SKIPBACK)."""
    node = _node_at(plan, path)
    assert isinstance(node, StepNode)
    reaction = node.on_failure.choose(list(_STEP_ERROR))
    if itself and reaction == SKIPBACK:
        return False
    for _, outer in _ancestors(plan, path):
        if reaction in (WAIT, FALLBACK):
            reaction = ROLLBACK
        if reaction in (SKIP, ABORT):
            return False
        if isinstance(outer, FlowNode) and outer is not plan:
            reaction = outer.on_failure.choose(list(_STEP_ERROR))
    return reaction in (ROLLBACK, SKIPBACK, WAIT, FALLBACK)


# -- the model of the rules -------------------------------------------------------


@dataclass(eq=False)
class _Exec:
    """One execution of a step's forward (or of its fallback): its attempts,
    and the undo executions that ran for it."""

    path: str
    step: str
    key: str
    direction: str
    attempts: list[StepCallRecord]
    node: StepNode | None
    undos: list[list[StepCallRecord]] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.attempts[0].start

    @property
    def end(self) -> float:
        return max(a.end for a in self.attempts)

    @property
    def result(self) -> Outcome:
        return self.attempts[-1].outcome

    @property
    def types(self) -> tuple[str, ...]:
        last = self.attempts[-1]
        if last.outcome == "timed_out":
            return _error_types(TimeoutError)
        return last.error_types

    @property
    def has_back(self) -> bool:
        return self.node is not None and self.node.has_back

    @property
    def label(self) -> str:
        return f"{self.step} ({self.path})"

    def undone(self) -> int:
        """Undo executions of it that ran to their end."""
        return sum(1 for undo in self.undos if undo[-1].outcome == "ok")


@dataclass(eq=False)
class _Group:
    """Members of a block, undone side by side (each a sequence)."""

    members: list[list[_Item]]


_Item = _Exec | _Group


def _flat(items: list[_Item]) -> Iterator[_Exec]:
    for item in items:
        if isinstance(item, _Group):
            for member in item.members:
                yield from _flat(member)
        else:
            yield item


@dataclass
class _UnitEnd:
    status: Literal["done", "skipped", "stop", "cancelled", "missing"]
    reaction: Reaction | None = None
    undo: list[_Item] = field(default_factory=list)
    step: str | None = None
    types: tuple[str, ...] = ()
    time: float = 0.0


@dataclass
class _FlowEnd:
    kind: Literal["completed", "rolled_back", "aborted", "cancelled"]
    undo: list[_Item] = field(default_factory=list)
    step: str | None = None
    types: tuple[str, ...] = ()
    time: float = 0.0


class _Unpredictable(Exception):
    """The recorded calls don't say what the rules would do next."""


class _NeverRan(_Unpredictable):
    """The flow got to a step (outside a block) whose ``step_forward`` ran no
    code: a violation, unless QWIT refused the step's call before it ran."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(f"{name} ({path}) ran no code")
        self.name = name
        self.path = path


#: What QWIT refuses a step's call with before the step runs any code (its
#: error types end so): a flow that failed so at a step ran none of it.
_REFUSED_BEFORE_RUNNING = ("ArgumentsError", "PayloadTooLarge", "StepNotRegistered")


def _is_refusal(error_type: str | None) -> bool:
    """Whether a step's error of this type is QWIT refusing its call before it ran."""
    return error_type is not None and error_type.endswith(_REFUSED_BEFORE_RUNNING)


class _Model:
    """The saga rules, applied to what a case's steps did (as recorded): what
    must be undone, what must stay, and how the flow ends."""

    def __init__(self, plan: FlowNode, execs: list[_Exec], undo_fails: set[str]) -> None:
        self.plan = plan
        self.undo_fail_paths = undo_fails
        self.queue: dict[tuple[str, str], list[_Exec]] = {}
        for ex in sorted(execs, key=lambda e: e.start):
            self.queue.setdefault((ex.path, ex.direction), []).append(ex)
        self.expected: list[tuple[_Exec, bool]] = []
        """Executions a rollback undoes, in order, and whether their undo fails."""
        self.left: list[_Exec] = []
        """Executions a stopped rollback leaves as they were."""
        self.stopped = False
        self.notes: list[str] = []
        self.waits: list[str] = []
        self.blocks = 0
        self.reached: set[str] = set()
        """Paths of the steps the flow got to (a block's: all of its members)."""

    def reached_at(self, path: str) -> bool:
        """Whether the flow got to the step at ``path``."""
        return any(path == p or path.startswith(f"{p}.") for p in self.reached)

    def run(self) -> _FlowEnd:
        end = self.flow(self.plan, "")
        if end.kind == "rolled_back":
            self.apply(end.undo)
        return end

    def outcome(self, end: _FlowEnd) -> str:
        if end.kind != "completed" and end.kind != "aborted" and self.any_failed:
            return "compensation_failed"
        return end.kind

    @property
    def any_failed(self) -> bool:
        return self.failures > 0

    @property
    def failures(self) -> int:
        return sum(1 for _, fails in self.expected if fails)

    def next(self, path: str, direction: str) -> _Exec | None:
        queue = self.queue.get((path, direction))
        return queue.pop(0) if queue else None

    # rollbacks

    def apply(self, items: list[_Item]) -> None:
        """A rollback undoes ``items`` in order (a group's members side by side)."""
        for item in items:
            if isinstance(item, _Group):
                if self.stopped:
                    self.left.extend(_flat([item]))
                    continue
                stops = False
                for member in item.members:
                    self.stopped = False
                    self.apply(member)
                    stops |= self.stopped
                self.stopped = stops
                continue
            if self.stopped:
                self.left.append(item)
                continue
            fails = self.fails(item)
            self.expected.append((item, fails))
            if fails and item.node is not None and item.node.back_on_failure == ABORT:
                self.stopped = True

    def fails(self, ex: _Exec) -> bool:
        """Whether undoing ``ex`` fails for good: injected, or it did."""
        if not ex.has_back:
            return False
        if ex.path in self.undo_fail_paths:
            return True
        return bool(ex.undos) and ex.undone() == 0

    # the forward run

    def reaction(self, chosen: Reaction, path: str, name: str) -> Reaction:
        if chosen == WAIT:
            self.waits.append(f"{name} ({path})")
            return ROLLBACK
        return chosen

    def flow(self, node: FlowNode, prefix: str) -> _FlowEnd:
        done: list[list[_Item]] = []
        for i, step in enumerate(node.steps):
            path = child_path(prefix, i)
            end = self.unit(step, path)
            if end.status == "done":
                done.append(end.undo)
                continue
            if end.status == "skipped":
                continue
            undo = end.undo + [item for entry in reversed(done) for item in entry]
            if end.status in ("cancelled", "missing"):
                if end.status == "missing" and not self.blocks:
                    raise _NeverRan(step.name, path)
                self.apply(undo)  # a sub-flow stopped mid-run undoes itself
                return _FlowEnd("cancelled", time=end.time)
            if end.reaction == ABORT:
                return _FlowEnd("aborted", undo, end.step, end.types, end.time)
            return _FlowEnd("rolled_back", undo, end.step, end.types, end.time)
        return _FlowEnd("completed", [item for entry in reversed(done) for item in entry])

    def unit(self, node: Node, path: str) -> _UnitEnd:
        if isinstance(node, StepNode):
            return self.step(node, path)
        if isinstance(node, FlowNode):
            return self.subflow(node, path)
        return self.group(node, path)

    def step(self, node: StepNode, path: str) -> _UnitEnd:
        self.reached.add(path)
        ex = self.next(path, "step_forward")
        if ex is None:
            return _UnitEnd("missing")
        if ex.result == "ok":
            return _UnitEnd("done", undo=[ex], time=ex.end)
        if ex.result == "cancelled":
            return _UnitEnd("cancelled", undo=[ex], time=ex.end)
        reaction = self.reaction(node.on_failure.choose(list(ex.types)), path, node.name)
        if reaction == FALLBACK:
            self.apply([ex])  # the failed attempt is undone first
            fallback = self.next(path, "step_fallback")
            if fallback is None:
                raise _Unpredictable(f"the fallback of {node.name} ({path}) ran no code")
            if fallback.result == "ok":
                return _UnitEnd("done", undo=[fallback], time=fallback.end)
            return _UnitEnd("stop", ROLLBACK, [], node.name, fallback.types, fallback.end)
        if reaction == SKIP:
            return _UnitEnd("skipped", time=ex.end)
        undo: list[_Item] = [ex] if reaction == ROLLBACK else []
        return _UnitEnd("stop", reaction, undo, node.name, ex.types, ex.end)

    def subflow(self, node: FlowNode, path: str) -> _UnitEnd:
        attempts = 0
        while True:
            attempts += 1
            end = self.flow(node, path)
            if end.kind == "completed":
                return _UnitEnd("done", undo=end.undo)
            if end.kind == "aborted":  # it keeps its effects; its parent aborts too
                return _UnitEnd("stop", ABORT, [], end.step, end.types, end.time)
            if end.kind == "cancelled":  # stopped by its block: it undid itself
                return _UnitEnd("cancelled", time=end.time)
            failed_before = self.failures
            self.apply(end.undo)  # it undoes itself
            clean = self.failures == failed_before
            retry = node.retry
            if (
                clean
                and retry is not None
                and (retry.max_attempts is None or attempts < retry.max_attempts)
            ):
                continue
            chosen = node.on_failure.choose(list(end.types))
            reaction = self.reaction(chosen, path, node.name)
            if reaction == SKIP:
                return _UnitEnd("skipped", time=end.time)
            return _UnitEnd("stop", reaction, [], end.step, end.types, end.time)

    def group(self, node: ParallelNode | MapNode, path: str) -> _UnitEnd:
        if isinstance(node, ParallelNode):
            members: list[tuple[str, Node]] = [
                (child_path(path, i), branch) for i, branch in enumerate(node.branches)
            ]
        else:
            seen = {
                int(p[len(path) + 1 :].split(".")[0])
                for p, _ in self.queue
                if p.startswith(f"{path}.") and p[len(path) + 1 :].split(".")[0].isdigit()
            }
            members = [(f"{path}.{i}", node.node) for i in range(1, max(seen, default=0) + 1)]
        self.reached.add(path)  # (a member cancelled before it ran left no record)
        self.blocks += 1
        try:
            ends = [self.unit(member, member_path) for member_path, member in members]
        finally:
            self.blocks -= 1
        stops = [end for end in ends if end.status == "stop"]
        if not stops:
            if isinstance(node, ParallelNode) and any(
                end.status in ("cancelled", "missing") for end in ends
            ):
                raise _Unpredictable(f"a branch of the block at {path} did not run to its end")
            return _UnitEnd(
                "done", undo=[_Group([end.undo for end in ends if end.status == "done"])]
            )
        first = min(stops, key=lambda end: end.time)
        if first.reaction == ABORT:
            return _UnitEnd("stop", ABORT, [], first.step, first.types, first.time)
        undo: list[list[_Item]] = []
        for end in ends:
            if end.status in ("done", "cancelled") or (
                end.status == "stop" and end.reaction == ROLLBACK
            ):
                undo.append(end.undo)
        assert first.reaction is not None
        return _UnitEnd("stop", first.reaction, [_Group(undo)], first.step, first.types, first.time)


# -- the checks -------------------------------------------------------------------


def _executions(
    plan: FlowNode, calls: list[StepCallRecord]
) -> tuple[list[_Exec], list[list[StepCallRecord]]]:
    """The calls grouped into executions (forwards, fallbacks), each with the
    undo executions attributed to it; and the undo executions of a forward
    that ran no code (QWIT undoes a step that may have started: one its flow
    reached, whose code a cancel stopped before it ran)."""
    by_key: dict[tuple[str, str], list[StepCallRecord]] = {}
    undos: dict[str, list[StepCallRecord]] = {}
    for call in sorted(calls, key=lambda c: c.start):
        if call.direction == "step_back":
            undos.setdefault(call.key.removesuffix("/step_back"), []).append(call)
        else:
            by_key.setdefault((call.key, call.direction), []).append(call)
    execs: list[_Exec] = []
    base: dict[str, list[_Exec]] = {}
    for (key, direction), attempts in by_key.items():
        node = _node_at(plan, attempts[0].path)
        ex = _Exec(
            path=attempts[0].path,
            step=attempts[0].step,
            key=key,
            direction=direction,
            attempts=attempts,
            node=node if isinstance(node, StepNode) else None,
        )
        execs.append(ex)
        base.setdefault(key.removesuffix("/step_fallback"), []).append(ex)
    orphans: list[list[StepCallRecord]] = []
    for key, attempts in undos.items():
        runs: list[list[StepCallRecord]] = []
        for call in attempts:  # a new undo execution starts at attempt 1
            if call.attempt == 1 or not runs:
                runs.append([call])
            else:
                runs[-1].append(call)
        if key.endswith("/step_fallback"):  # the undo of what a fallback did
            owners = [e for e in base.get(key.removesuffix("/step_fallback"), []) if e.key == key]
        else:
            owners = sorted(base.get(key, []), key=lambda e: e.start)
        for run in runs:
            earlier = [ex for ex in owners if ex.start <= run[0].start]
            if earlier:
                earlier[-1].undos.append(run)
            else:
                orphans.append(run)
    return execs, orphans


def _siblings(plan: FlowNode, a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` lie in different members of one block."""
    pa, pb = a.split("."), b.split(".")
    for depth in range(min(len(pa), len(pb))):
        if pa[depth] != pb[depth]:
            return isinstance(_node_at(plan, ".".join(pa[:depth])), ParallelNode | MapNode)
    return False


def _span(calls: list[StepCallRecord]) -> tuple[float, float]:
    return calls[0].start, max(c.end for c in calls)


def _attempt_violations(what: str, attempts: list[StepCallRecord]) -> list[str]:
    """Attempts of one execution (one key) run one after another, and none
    runs once one has completed: each effect is applied (or undone) once."""
    found: list[str] = []
    for before, after in itertools.pairwise(attempts):
        if after.start < before.end:
            found.append(
                f"attempt {after.attempt} of the {what} started "
                f"{(before.end - after.start) * 1000:.0f} ms before attempt "
                f"{before.attempt} ended"
            )
        elif before.outcome == "ok":
            found.append(
                f"attempt {after.attempt} of the {what} ran under its key after "
                f"attempt {before.attempt} had completed"
            )
    return found


def _invariants(
    plan: FlowNode, execs: list[_Exec], calls: list[StepCallRecord], finals: set[str]
) -> list[str]:
    """The rules that hold whatever the outcome, from the recorded calls alone."""
    found: list[str] = []
    for ex in execs:
        if ex.undone() > 1:
            found.append(f"{ex.label} was undone {ex.undone()} times (at most once)")
        elif len(ex.undos) > 1:
            found.append(f"the undo of {ex.label} ran {len(ex.undos)} times (at most once)")
        what = "fallback" if ex.direction == "step_fallback" else "step_forward"
        found.extend(_attempt_violations(f"{what} of {ex.label}", ex.attempts))
        for undo_run in ex.undos:
            found.extend(_attempt_violations(f"step_back of {ex.label}", undo_run))
    # no undo before its forward's attempts ended
    forwards: dict[str, list[StepCallRecord]] = {}
    for call in calls:
        if call.direction != "step_back":
            forwards.setdefault(call.key.removesuffix("/step_fallback"), []).append(call)
    for undo in (c for c in calls if c.direction == "step_back"):
        for forward in forwards.get(undo.key.removesuffix("/step_back"), []):
            if forward.direction == "step_forward" and forward.end > undo.start:
                found.append(
                    f"the undo of {undo.step} ({undo.path}) started "
                    f"{(forward.end - undo.start) * 1000:.0f} ms before attempt "
                    f"{forward.attempt} of its step_forward ended"
                )
            elif (
                forward.direction == "step_fallback"
                and forward.start < undo.end
                and undo.start < forward.end
            ):
                found.append(f"the undo of {undo.step} ({undo.path}) ran beside its step_fallback")
    # reverse dependency order
    undone = [(ex, _span([c for run in ex.undos for c in run])) for ex in execs if ex.undos]
    for a, (a_start, _) in undone:
        for b, (_, b_end) in undone:
            if a is b or _siblings(plan, a.path, b.path):
                continue
            if a.end <= b.start and a_start >= b.start and b_end > a_start:
                found.append(
                    f"the undo of {b.label} ended after the undo of {a.label} started, "
                    f"though {a.step} ran before {b.step} (newest first)"
                )
    # final steps: never undone, and run once every undo has ended
    for call in calls:
        if call.path in finals and call.direction == "step_back":
            found.append(f"final step {call.step} ({call.path}) was undone")
    last_undo = max((c.end for c in calls if c.direction == "step_back"), default=None)
    for call in calls:
        if call.path in finals and call.direction == "step_forward" and last_undo is not None:
            top = "." not in call.path
            if top and call.start < last_undo:
                found.append(f"final step {call.step} ({call.path}) ran before the rollback ended")
    return found


def _multiset_diff(what: str, got: list[str], want: list[str]) -> list[str]:
    extra = Counter(got) - Counter(want)
    missing = Counter(want) - Counter(got)
    if not extra and not missing:
        return []
    parts = []
    if missing:
        parts.append(f"misses {', '.join(sorted(missing.elements()))}")
    if extra:
        parts.append(f"has {', '.join(sorted(extra.elements()))} too")
    return [f"{what} is {got}: it {' and '.join(parts)} (the rules predict {want})"]


#: Seconds by which, on an engine whose workers report to a server, an undo
#: listed first may seem to start after one listed later has ended. The
#: engine learns that an undo ended when its worker reports it, and the
#: reports of undos ending together race: on Temporal, an undo that ended a
#: millisecond after another may reach the server first. (``qwit.local``
#: learns it at once: no slack there.)
REPORT_SLACK = 0.005


def _order_violations(
    reported: list[Compensation], execs: list[_Exec], slack: float = 0.0
) -> list[str]:
    """QWIT's ``compensations`` (each undo, in the order they ended) against
    the recorded undos, matched by path: one listed before another must not
    have started after that other ended (give or take ``slack``)."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for ex in execs:
        for run in ex.undos:
            runs.setdefault(ex.path, []).append(_span(run))
    for spans in runs.values():
        spans.sort(key=lambda span: span[1])
    listed: list[tuple[Compensation, tuple[float, float]]] = []
    seen: Counter[str] = Counter()
    for entry in reported:
        own = runs.get(entry.path, [])
        if seen[entry.path] < len(own):  # (a step without step_back ran nothing)
            listed.append((entry, own[seen[entry.path]]))
        seen[entry.path] += 1
    for i, (entry, (start, _)) in enumerate(listed):
        for later, (_, later_end) in listed[i + 1 :]:
            if later_end < start - slack:
                return [
                    f"compensated lists {entry.name} ({entry.path}) before {later.name} "
                    f"({later.path}), but the undo of {later.name} ended "
                    f"{(start - later_end) * 1000:.1f} ms before the undo of {entry.name} "
                    "started (the order the undos ended)"
                ]
    return []


# -- running the matrix -------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """A case to run: its target and what it injects."""

    target: _Target | None
    kind: Kind
    fault: _Fault
    edit: StepEdit
    fails_at: str | None = None
    skip: str | None = None


def _case_plans(plan: FlowNode, wanted: Callable[[_Target, Kind], bool]) -> list[_Plan]:
    targets = list(_targets(plan))
    forward = [t for t in targets if not t.final]
    plans = [_Plan(None, "none", _Fault(), _base_edit)]
    for target in targets:
        for kind in KINDS:
            if not wanted(target, kind):
                continue
            node = target.node
            if kind == "undo_fails":
                if target.final or not node.has_back:
                    continue  # nothing to undo
                plans.append(_undo_fails(plan, target, forward))
                continue
            skip = None
            if kind == "raises" and node.retry.max_attempts is None:
                skip = "its retry has no limit: a retryable error never fails it"
            fault = _Fault(forward={target.path: kind})
            plans.append(_Plan(target, kind, fault, _edit_for(target.path, kind), skip=skip))
    return plans


def _undo_fails(plan: FlowNode, target: _Target, forward: list[_Target]) -> _Plan:
    """Fail the flow at its last step whose failure rolls it back (at or
    after ``target``), while ``target``'s undo fails."""
    candidates = [t for t in forward if t.path == target.path or _after(t.path, target.path)]
    point = next(
        (
            t
            for t in reversed(candidates)
            if _rolls_back_root(plan, t.path, itself=t.path == target.path)
        ),
        None,
    )
    if point is None:
        return _Plan(
            target,
            "undo_fails",
            _Fault(),
            _base_edit,
            skip="no step's failure at or after it rolls the flow back over it",
        )
    fault = _Fault(
        forward={point.path: "non_retryable"},
        fallback=frozenset({point.path}),
        back=frozenset({target.path}),
    )
    return _Plan(
        target, "undo_fails", fault, _edit_for(target.path, "undo_fails"), fails_at=point.path
    )


def _after(path: str, other: str) -> bool:
    """``path`` comes after ``other`` in plan order, not beside it in a block."""
    a = [int(p) for p in path.split(".")]
    b = [int(p) for p in other.split(".")]
    return a > b and a[: len(b)] != b


def _base_edit(path: str, node: StepNode) -> StepNode:
    return node.model_copy(
        update={"retry": _quick(node.retry), "back_retry": _quick(node.back_retry)}
    )


def _edit_for(target: str, kind: str) -> StepEdit:
    def edit(path: str, node: StepNode) -> StepNode:
        node = _base_edit(path, node)
        if path != target:
            return node
        if kind == "timeout":
            grace = (
                CASE_GRACE if node.timeout_grace is None else min(node.timeout_grace, CASE_GRACE)
            )
            return node.model_copy(
                update={"timeout": min(node.timeout, CASE_TIMEOUT), "timeout_grace": grace}
            )
        if kind == "undo_fails":
            return node.model_copy(update={"back_retry": Retry(max_attempts=1)})
        return node

    return edit


def _matcher(cases: Iterable[Any] | None) -> Callable[[_Target, Kind], bool]:
    """Which (target, kind) to run: every one, or those ``cases`` names."""
    if cases is None:
        return lambda target, kind: True
    items = list(cases)

    def names(target: _Target, what: Any) -> bool:
        return what in (target.path, target.node.name)

    for item in items:
        kind = item[1] if isinstance(item, tuple) else item
        if isinstance(item, tuple) and kind not in KINDS:
            raise ValueError(f"cases: {kind!r} is not a kind of failure (one of {KINDS})")
        if not isinstance(item, str | tuple):
            raise ValueError(f"cases: {item!r} is not a kind, a step (name or path) or a pair")

    def wanted(target: _Target, kind: Kind) -> bool:
        for item in items:
            if isinstance(item, tuple):
                if names(target, item[0]) and item[1] == kind:
                    return True
            elif item == kind or names(target, item):
                return True
        return False

    return wanted


async def _drive(
    handle: FlowHandle, case: RollbackCase, poll: float
) -> tuple[dict[str, Any] | None, FlowFailed | None]:
    """Wait for the flow's end, deciding for it whenever it waits: ROLLBACK
    for a failed step (SKIP for a failed undo), as ``notes`` say."""
    result = asyncio.ensure_future(handle.result())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CASE_LIMIT
    decided: set[tuple[str, str, str]] = set()
    try:
        while not result.done():
            await asyncio.wait({result}, timeout=poll)
            if result.done():
                break
            if loop.time() > deadline:
                case.violations.append(
                    f"the flow did not end within {CASE_LIMIT:g} s; the harness cancelled it"
                )
                await handle.cancel()
                await asyncio.wait({result}, timeout=CASE_LIMIT)
                break
            state = await handle.state()
            for wait in state.waits:
                reaction = ROLLBACK if wait.direction == "step_forward" else SKIP
                with contextlib.suppress(ReactionError):
                    await handle.react(reaction, path=wait.path)
                    what = "step" if wait.direction == "step_forward" else "undo"
                    mark = (wait.flow_id, wait.path, wait.direction)
                    if mark not in decided:
                        decided.add(mark)
                        case.notes.append(
                            f"{wait.step} ({wait.path}) waited after its failed {what}: "
                            f"the harness decided {reaction.value}"
                        )
    finally:
        if not result.done():
            result.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        try:
            return result.result(), None
        except FlowFailed as failed:
            return None, failed
    return None, None


def _kind_message(kind: Kind) -> str:
    return {
        "raises": "InjectedFault",
        "non_retryable": "StepError",
        "timeout": "timed out",
    }.get(kind, "")


def _judge(
    case: RollbackCase,
    plan: FlowNode,
    calls: list[StepCallRecord],
    fault: _Fault,
    slack: float = 0.0,
    refused: set[str] | None = None,
) -> None:
    """Check one case's recorded calls and outcome against the rules
    (``refused``: the paths of steps whose call QWIT refused before it ran)."""
    finals = {t.path for t in _targets(plan) if t.final}
    execs, orphans = _executions(plan, calls)
    case.notes.extend(
        f"step_back of {run[0].step} ({run[0].path}) ran for a forward that ran no "
        "code (QWIT undoes a step that may have started)"
        for run in orphans
    )
    case.violations.extend(_invariants(plan, execs, calls, finals))
    undos = sorted(
        [run for ex in execs for run in ex.undos] + orphans, key=lambda run: _span(run)[1]
    )
    case.undone = [
        run[0].step if run[-1].outcome == "ok" else f"{run[0].step} (failed)" for run in undos
    ]
    for run in undos:
        last = run[-1]
        if last.outcome != "ok" and not last.injected:
            case.violations.append(
                f"the step_back of {last.step} ({last.path}) failed for good: {last.error}"
            )
    # the injected failure: its retries spent (or none, for a non-retryable one)
    if case.kind in ("raises", "non_retryable", "timeout"):
        for ex in execs:
            if ex.path != case.path or ex.direction != "step_forward" or ex.node is None:
                continue
            if ex.result == "cancelled":
                continue
            if not ex.attempts[0].injected:
                continue  # the step failed by itself, before the fault: its own error's rule
            want = 1 if case.kind == "non_retryable" else ex.node.retry.max_attempts
            if want is not None and len(ex.attempts) != want:
                case.violations.append(
                    f"{ex.label} ran {len(ex.attempts)} attempt(s) of its step_forward, "
                    f"not {want} (its retry policy)"
                )
    if case.outcome == "did not end":
        return
    model = _Model(plan, [ex for ex in execs if ex.path not in finals], set(fault.back))
    try:
        end = model.run()
    except _NeverRan as never:
        excused = never.path in (refused or set()) or (
            case.error is not None
            and case.error.step == never.name
            and _is_refusal(case.error.error_type)
        )
        if excused or case.outcome == "cancelled":
            case.notes.append(f"the rules' outcome can't be predicted: {never}")
        else:  # (a step skipped, a reaction not honoured, a segment not run again)
            case.violations.append(
                f"the flow got to {never.name} ({never.path}), which the rules run next, "
                "and never ran its step_forward"
            )
        return
    except _Unpredictable as unknown:
        case.notes.append(f"the rules' outcome can't be predicted: {unknown}")
        return
    case.expected = model.outcome(end)
    for run in orphans:  # an undo of a step its flow never reached
        if not model.reached_at(run[0].path):
            case.violations.append(
                f"the step_back of {run[0].step} ({run[0].path}) ran, though its flow never "
                "got to the step"
            )
    for waited in model.waits:
        if not any(waited in note for note in case.notes):
            case.notes.append(f"{waited} reacts WAIT: the harness decides ROLLBACK")
    if case.outcome != case.expected:
        case.violations.append(f"the flow ended {case.outcome}; the rules predict {case.expected}")
    # what was undone, by the harness's own record
    expected = {id(ex): fails for ex, fails in model.expected}
    left = {id(ex) for ex in model.left}
    for ex, fails in model.expected:
        if not ex.has_back:
            continue
        if fails and ex.undone():
            case.violations.append(f"{ex.label} was undone, though its step_back fails")
        elif fails and not ex.undos:
            case.violations.append(f"the undo of {ex.label} never ran")
        elif not fails and not ex.undone():
            case.violations.append(f"{ex.label} was not undone")
    for ex in execs:
        if id(ex) in expected or not ex.has_back:
            continue
        if id(ex) in left and ex.undos:
            case.violations.append(f"{ex.label} was undone, though the rollback stopped before it")
        elif id(ex) not in left and ex.undone():
            why = "the flow completed" if end.kind == "completed" else "the rules keep it"
            case.violations.append(f"{ex.label} was undone, though {why}")
    # QWIT's own account
    error = case.error
    if error is None:
        return
    info = error.info
    want_undone = [ex.step for ex, fails in model.expected if not fails]
    want_failed = [ex.step for ex, fails in model.expected if fails]
    want_left = [ex.step for ex in model.left if ex.has_back]
    case.violations.extend(_multiset_diff("compensated", info.compensated, want_undone))
    case.violations.extend(_order_violations(info.compensations, execs, slack))
    case.violations.extend(
        _multiset_diff("failed_compensations", info.failed_compensations, want_failed)
    )
    case.violations.extend(_multiset_diff("not_compensated", info.not_compensated, want_left))
    if end.step is not None and info.step != end.step:
        case.violations.append(f"the failure names step {info.step!r}, not {end.step!r}")
    if "InjectedUndoFault" in info.reason or "check_rollbacks: step_back" in info.reason:
        case.violations.append(f"the failure's reason is an undo's error: {info.reason}")
    wanted = _kind_message(case.kind)
    if wanted and end.step == case.step and info.step == case.step and wanted not in info.reason:
        case.violations.append(f"the failure's reason does not say {wanted!r}: {info.reason}")


async def check_rollbacks(
    flow: type[Flow],
    args: Any = None,
    *,
    cases: Iterable[Any] | None = None,
    oracle: Oracle | None = None,
    backend: Backend | None = None,
    client: Client | None = None,
) -> RollbackReport:
    """Run ``flow`` once per step and per kind of failure, and check every
    rollback against the saga rules.

    The flow first runs with ``args`` and no fault: it must complete. Then,
    for every step of its plan (inside sub-flows and parallel blocks too;
    for a map, its first element; final steps too), one case per kind:

    - ``raises``: the step's ``step_forward`` raises a retryable error on
      every attempt, until its retries are spent.
    - ``non_retryable``: it raises ``qwit.StepError(retry=False)``.
    - ``timeout``: every attempt outlives its timeout (cut to 0.2 s, with a
      0.1 s ``timeout_grace``, in the case's plan): it hangs until its
      deadline stops it.
    - ``undo_fails`` (steps that define ``step_back``): the flow is made to
      fail at its last step whose failure rolls it back (not retryable, its
      fallback failing too), and this step's ``step_back`` raises on every
      attempt (its ``back_retry`` cut to one attempt).

    The user's step code really runs, as it would in production: the fault
    is injected **after** the step's ``step_forward`` has returned, so its
    effect has happened and the rollback must undo it (a timed-out step
    hangs after it returned). A failing ``step_back`` fails instead of the
    user's. The failure is injected where the engine runs steps (it serves
    each step as an instrumented subclass of the user's class, which is left
    as it is), never in the flow's classes. In every case's plan the waits
    between attempts are cut to 10 ms (the attempts are the flow's own).

    A flow that waits for an operator (``on_failure=WAIT``) is decided by
    the harness: ROLLBACK for a failed step, SKIP for a failed undo
    (``back_on_failure=WAIT``); the case's ``notes`` say so.

    Every call of every step is recorded (path, direction, idempotency key,
    attempt, start and end, outcome), and each case is checked against the
    saga rules from that record, independently of QWIT's own account: each
    completed forward undone at most once; no undo starting before its
    forward's attempts ended; when the flow rolls back, every completed
    forward undone exactly once (the failed step too under ROLLBACK, not
    under SKIPBACK); undos in reverse dependency order (if A's forward ended
    before B's started, B's undo ends before A's starts; branches of one
    block have no order); the reaction honoured (ABORT undoes nothing, SKIP
    goes on, a retried segment runs again, FALLBACK undoes the failed
    attempt and goes on); a failing undo ends the flow ``CompensationFailed``
    naming that step, the others still undone (with ``back_on_failure=ABORT``
    the rest are in ``not_compensated``); final steps never undone, run after
    the rollback; the outcome, ``compensated`` (and its order),
    ``failed_compensations``, ``not_compensated`` and the failed step as
    these rules predict.

    Args:
        flow: The Flow class.
        args: Its args, with which it completes without a fault.
        cases: Which cases to run (default: all): kinds (``"timeout"``),
            steps by name or path (``"payments.charge"``, ``"3.1"``), or
            ``(step, kind)`` pairs; the run without a fault always runs.
        oracle: Called (sync or async) after each case that ran (the run
            without a fault too) with its ``RollbackCase``, to check the
            state of your own systems (e.g. that every reservation was
            released: ``case.calls`` has each call's idempotency key); an
            exception it raises is a violation of that case.
        backend: The engine: ``qwit.local`` (default), or ``qwit.temporal``
            with ``client``, whose Temporal runs the cases (a worker of the
            harness serves the steps on a fresh task queue, in this process).
        client: A client: for Temporal, the one connected to it.

    Returns:
        The report: every case with its outcome, what was undone and its
        violations (none); ``report.table()`` prints them.

    Raises:
        RollbackCheckFailed: an ``AssertionError`` naming the first case that
            broke a rule and its violations; ``.report`` is the whole report.
        ValueError: the flow does not complete without a fault, ``cases``
            names no kind or step, or the engine can't run the cases.
    """
    engine_name = "local" if backend is None else backend.name
    if engine_name not in ("local", "temporal"):
        raise ValueError(
            f"check_rollbacks runs flows on qwit.local or qwit.temporal, not on {engine_name!r}"
        )
    if engine_name == "temporal" and client is None:
        raise ValueError(
            "check_rollbacks on qwit.temporal needs the client connected to it: "
            "check_rollbacks(flow, args, backend=qwit.temporal, client=client)"
        )
    from ._client import Client as QwitClient

    preparer = client if client is not None else QwitClient(backend=_local())
    plan = compile_flow(flow)
    wanted = _matcher(cases)
    case_plans = _case_plans(plan, wanted)
    if cases is not None and len(case_plans) == 1:
        raise ValueError(f"cases: {cases!r} names no step or kind of flow {plan.name!r}")
    probe = _Probe()
    report = RollbackReport(flow=plan.name, engine=engine_name)
    async with contextlib.AsyncExitStack() as stack:
        if engine_name == "temporal":
            assert client is not None
            engine = await stack.enter_async_context(_temporal_engine(client, flow, probe))
            poll = 0.1
        else:
            engine = _local_engine(probe)
            stack.push_async_callback(engine.close)
            poll = 0.01
        for number, case_plan in enumerate(case_plans):
            case = await _run_case(preparer, engine, flow, args, case_plan, probe, poll, number)
            report.cases.append(case)
            if case.kind == "none" and case.outcome != "completed":
                raise ValueError(
                    f"check_rollbacks: flow {plan.name!r} does not complete with these args "
                    f"without a fault ({case.outcome}: "
                    f"{case.error.reason if case.error else ''}); pass args with which it does"
                )
            if oracle is not None and case.outcome != "skipped":
                try:
                    checked = oracle(case)
                    if inspect.isawaitable(checked):
                        await checked
                except Exception as exc:
                    case.violations.append(f"oracle: {_describe(exc)}")
    if report.failed:
        raise RollbackCheckFailed(report, report.failed[0])
    return report


def _local() -> Backend:
    from . import local

    return local


async def _run_case(
    preparer: Client,
    engine: Engine,
    flow: type[Flow],
    args: Any,
    case_plan: _Plan,
    probe: _Probe,
    poll: float,
    number: int,
) -> RollbackCase:
    target = case_plan.target
    case = RollbackCase(
        step=target.node.name if target else "",
        path=target.path if target else "",
        kind=case_plan.kind,
        fails_at=case_plan.fails_at,
    )
    if case_plan.skip is not None:
        case.outcome = "skipped"
        case.notes.append(case_plan.skip)
        return case
    prepared = preparer.prepare(flow, args)
    input: FlowInput = prepared.model_copy(
        update={
            "flow": _rewrite(prepared.flow, "", case_plan.edit),
            "root_id": f"{prepared.root_id}-check{number}",
        }
    )
    case.flow_id = input.root_id
    probe.begin_case(case_plan.fault)
    started = time.monotonic()
    handle = await engine.start(flow, input)
    case.result, case.error = await _drive(handle, case, poll)
    case.seconds = time.monotonic() - started
    case.calls = sorted(probe.calls, key=lambda c: c.start)
    if case.error is not None:
        case.outcome = case.error.info.kind
    elif case.result is not None:
        case.outcome = "completed"
    else:
        case.outcome = "did not end"
    if case_plan.fails_at is not None and case_plan.fails_at != case.path:
        case.notes.append(f"the flow is made to fail at {case_plan.fails_at}")
    slack = REPORT_SLACK if engine.name != "local" else 0.0
    refused: set[str] = set()
    if case.outcome != "did not end":
        with contextlib.suppress(Exception):  # (only to excuse a step that ran no code)
            refused = _refused_paths((await handle.state()).steps)
    _judge(case, input.flow, case.calls, case_plan.fault, slack, refused)
    return case


def _refused_paths(steps: list[StepState]) -> set[str]:
    """The paths of the steps (sub-flows' included) whose call QWIT refused
    before it ran, as the flow's state says (``error.type``)."""
    found: set[str] = set()
    for step in steps:
        if step.error is not None and _is_refusal(step.error.type):
            found.add(step.path)
        found |= _refused_paths(step.steps)
    return found


__all__ = [
    "KINDS",
    "InjectedFault",
    "InjectedUndoFault",
    "RollbackCase",
    "RollbackCheckFailed",
    "RollbackReport",
    "StepCallRecord",
    "check_rollbacks",
]
