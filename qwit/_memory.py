"""The shared parts of engines that keep their flows in this process's memory.

``qwit.local`` and a custom engine (the thread-pool engine of the tests) need
the same run table, sub-flow plumbing, waiting and handle methods, and the
same retry rule; only how one attempt of a step runs is their own. They
subclass ``InMemoryRuntime`` (its ``run_attempt``) and ``InMemoryEngine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._engine import Engine, FlowHandle
from ._errors import (
    ArgumentsError,
    ErrorInfo,
    FailureInfo,
    FlowFailed,
    FlowIdInUse,
    FlowNotFound,
    PayloadTooLarge,
    ReactionError,
    StepFailure,
    StepNotRegistered,
    error_info,
)
from ._options import Retry
from ._plan import (
    DEFAULT_PAYLOAD_LIMIT,
    FlowInput,
    FlowNode,
    FlowRecords,
    StepCall,
    StepNode,
    StepReturn,
    check_input_fits,
    child_flow_id,
)
from ._runner import Registry
from ._saga import (
    Decision,
    FlowFailure,
    FlowRuntime,
    Interpreter,
    SubflowRun,
    stopped_by_cancel,
)
from ._state import AttemptsInFlight, FlowState, with_attempts_in_flight

#: How many turns of the event loop ``send_decision`` gives a flow to take a
#: decision in: one or a few do it, a turn per level of sub-flows.
MAX_TURNS_TO_TAKE_IN = 100

if TYPE_CHECKING:
    from ._flow import Flow


class Clock:
    """Time as an in-memory engine sees it: the real one."""

    def now(self) -> float:
        """Seconds, from some fixed point."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        await asyncio.sleep(seconds)


class SkippingClock(Clock):
    """Virtual time, for tests of flows that wait: every wait of the engine
    (a retry's backoff, a retried segment's) returns at once and moves this
    clock on by its length. A step's own timeout still runs in real time.

    Attributes:
        skipped: Seconds skipped so far.
        waits: Each wait skipped, in seconds, in order.
    """

    def __init__(self) -> None:
        self.skipped = 0.0
        self.waits: list[float] = []

    def now(self) -> float:
        return time.monotonic() + self.skipped

    async def sleep(self, seconds: float) -> None:
        self.skipped += seconds
        self.waits.append(seconds)
        await asyncio.sleep(0)


async def run_with_retries(
    attempt: Callable[[int], Awaitable[dict[str, Any]]],
    retry: Retry,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    on_retry: Callable[[int, ErrorInfo], None] | None = None,
) -> StepReturn:
    """Run ``attempt(1)``, ``attempt(2)``... until one returns a step's output,
    or ``retry`` is spent or the error is not retryable (then StepFailure).

    The retry rule, written once for every in-memory engine: back off by
    ``retry.delay(n)`` between attempts (waiting with ``sleep``).
    ``on_retry(n, error)`` is told of each attempt ``n`` that failed and is
    retried, as it fails (what ``state()`` shows of a step being retried).
    """
    number = 0
    while True:
        number += 1
        try:
            return StepReturn(output=await attempt(number), attempt=number)
        except StepFailure as failure:
            info = failure.info
        spent = retry.max_attempts is not None and number >= retry.max_attempts
        if spent or not info.retryable:
            raise StepFailure(info.model_copy(update={"attempt": number}))
        if on_retry is not None:
            on_retry(number, info.model_copy(update={"attempt": number}))
        await sleep(retry.delay(number))


class Heartbeats:
    """The details a step last gave ``qwit.heartbeat()``, kept across its attempts."""

    def __init__(self) -> None:
        self.last: Any = None

    def beat(self, details: Any) -> None:
        self.last = copy.deepcopy(details)


class InMemoryRun:
    """One flow (the root or a sub-flow) running as an asyncio task."""

    def __init__(self, engine: InMemoryEngine, registry: Registry, input: FlowInput, flow_id: str):
        self.engine = engine
        self.registry = registry
        self.flow_id = flow_id
        engine.started += 1
        self.run_id = f"{flow_id}@{engine.started}"
        self.changed = asyncio.Event()
        self.cancelling = False
        # Its steps' outputs once all have run, or how it aborted (keeping
        # its effects): either way it then waits for its parent's word.
        self.forward_done: asyncio.Future[dict[str, Any] | FailureInfo] = (
            asyncio.get_running_loop().create_future()
        )
        #: Steps being retried: what their flow learns once their attempts end.
        self.in_flight: dict[tuple[str, str], AttemptsInFlight] = {}
        self.interpreter = Interpreter(input, engine.runtime(self), flow_id)
        self.started = False
        self.task = asyncio.create_task(self._run(), name=f"qwit {flow_id}")
        # A failed flow's exception is read by result(); never warn about it.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self) -> dict[str, Any]:
        self.started = True
        return await self.interpreter.run()

    def poke(self) -> None:
        """Something a waiting predicate reads has changed."""
        self.changed.set()

    def cancel(self, rollback: bool = True) -> None:
        if not self.cancelling and not self.task.done():
            self.interpreter.request_cancel(rollback)
            self.cancelling = True
            # A task cancelled before it started would never run the flow's
            # cancel path: the flow sees the request at its first step.
            if self.started:
                self.task.cancel()
            self.poke()  # what waits shielded (an aborted sub-flow) sees it


class _Subflow(SubflowRun):
    def __init__(self, run: InMemoryRun) -> None:
        self.run = run
        self.flow_id = run.flow_id

    async def forward(self) -> dict[str, Any]:
        ends: set[asyncio.Future[Any]] = {self.run.forward_done, self.run.task}
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        if self.run.forward_done.done():
            done = self.run.forward_done.result()
            if isinstance(done, FailureInfo):
                self.held = True
                raise FlowFailure(done)
            return done
        await self.run.task  # it ended without running all its steps: raises FlowFailure
        raise AssertionError("a sub-flow ended without reporting its steps")  # pragma: no cover

    async def _outcome(self) -> FailureInfo | None:
        try:
            await asyncio.shield(self.run.task)
        except FlowFailure as failed:
            return failed.info
        return None

    async def settle(self, commit: bool) -> FailureInfo | None:
        self.run.interpreter.settle(commit)
        self.run.poke()
        return await self._outcome()

    async def grant_place(self) -> None:
        self.run.interpreter.grant_place()
        self.run.poke()

    async def cancel(self, rollback: bool = True) -> FailureInfo:
        self.run.cancel(rollback)
        info = await self._outcome()
        return info or FailureInfo(kind="cancelled", flow_id=self.flow_id, reason="cancelled")


class InMemoryRuntime(FlowRuntime):
    """A flow's runtime on an in-memory engine: all but how an attempt runs."""

    def __init__(self, run: InMemoryRun) -> None:
        self.run = run
        self.engine = run.engine.name
        self.tracing = run.engine.tracing

    def now(self) -> float:
        return self.run.engine.clock.now()

    async def sleep(self, seconds: float) -> None:
        await self.run.engine.clock.sleep(seconds)

    async def run_attempt(
        self, cls: type[Any], node: StepNode, call: StepCall, attempt: int, beats: Heartbeats
    ) -> Any:
        """Run attempt number ``attempt`` of ``call`` (``run_step_method``
        somewhere); return the step's output.

        ``beats`` keeps what the step passes to ``qwit.heartbeat()`` for the
        attempts after this one.

        Raises:
            StepFailure: the attempt failed.
        """
        raise NotImplementedError

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        cls = self.run.registry.get(call.step)
        if cls is None:  # pragma: no cover - the registry is built from the flow itself
            missing = StepNotRegistered(f"step {call.step!r} is not registered")
            raise StepFailure(error_info(missing, started=False))
        retry = node.back_retry if call.direction == "step_back" else node.retry
        beats = Heartbeats()

        async def attempt(number: int) -> dict[str, Any]:
            # Each attempt gets its own copy of the args, and the flow keeps
            # its own copy of the output, as if they had crossed a wire: a
            # step that mutates them changes nothing outside itself.
            own = call.model_copy(update={"args": copy.deepcopy(call.args)})
            output: dict[str, Any] = await self.run_attempt(cls, node, own, number, beats)
            return copy.deepcopy(output)

        def retried(number: int, error: ErrorInfo) -> None:
            if call.direction != "step_fallback":  # (counted as a step's attempts)
                self.run.in_flight[call.path, call.direction] = AttemptsInFlight(
                    call.step, call.direction, number, error, call.path
                )

        try:
            return await run_with_retries(attempt, retry, self.sleep, retried)
        finally:
            self.run.in_flight.pop((call.path, call.direction), None)

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        flow_id = child_flow_id(input, input.path, attempt)
        try:
            return _Subflow(self.run.engine.launch(self.run.registry, input, flow_id))
        except ArgumentsError as exc:
            raise StepFailure(error_info(exc, started=False)) from None

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while True:
            self.run.changed.clear()
            if predicate():
                return
            await self.run.changed.wait()

    def cancel_requested(self) -> bool:
        return self.run.cancelling

    def cancel_check(self) -> Callable[[], bool]:
        """What an attempt that starts now reads as ``context().cancelled``:
        whether the flow was cancelled since. A cancel reaches the attempt it
        came during, not an undo or a final step that runs after it (the
        flow's flag stays set meanwhile)."""
        before = self.cancel_requested()
        return lambda: not before and self.cancel_requested()

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:
        self.run.forward_done.set_result(outputs)

    async def report_aborted(self, info: FailureInfo) -> None:
        self.run.forward_done.set_result(info)

    gives_places = True

    async def report_place(self, wanted: bool) -> None:
        parent_id = self.run.interpreter.input.parent_id
        assert parent_id is not None
        parent = self.run.engine.find(parent_id)
        parent.interpreter.subflow_place(self.run.flow_id, wanted)
        parent.poke()


class InMemoryHandle(FlowHandle):
    """A flow kept in this process's memory."""

    def __init__(
        self, engine: InMemoryEngine, flow_id: str, run: InMemoryRun | None = None
    ) -> None:
        self.id = flow_id
        self.engine = engine.name
        self._engine = engine
        #: The run it was started as (None: the latest run of its id), as a
        #: Temporal handle keeps to its run when the id is used again.
        self._run = run

    def _find(self, flow_id: str) -> InMemoryRun:
        if flow_id == self.id and self._run is not None:
            return self._run
        return self._engine.find(flow_id)

    async def result(self) -> dict[str, Any]:
        try:
            return copy.deepcopy(await asyncio.shield(self._find(self.id).task))
        except FlowFailure as failed:
            raise FlowFailed.from_info(failed.info) from None

    async def cancel(self, rollback: bool = True) -> None:
        run = self._find(self.id)
        if run.task.done():
            raise ReactionError(
                f"flow {self.id!r} has already ended ({run.interpreter.status}): "
                "there is nothing to cancel"
            )
        run.cancel(rollback)

    async def flow_state(self, flow_id: str) -> FlowState:
        run = self._find(flow_id)
        state = with_attempts_in_flight(run.interpreter.state(), list(run.in_flight.values()))
        return state.model_copy(deep=True)

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        run = self._find(flow_id)
        if (self._find(self.id).cancelling or run.cancelling) and stopped_by_cancel(
            list(run.interpreter.saga.waits.values()), decision.path
        ):  # (a failed forward's wait goes as the cancel reaches it)
            raise ReactionError(f"flow {flow_id!r} is not waiting (it is being cancelled)")
        checked = run.interpreter.decide(decision.model_copy(deep=True))
        run.poke()
        # As on Temporal (an update), return once the flow has taken it in
        # and gone on to its next wait: what state() reads next shows it
        # decided. (The waiting step's task takes it in at its next turn.)
        for _ in range(MAX_TURNS_TO_TAKE_IN):
            if run.task.done() or run.interpreter.taken_in(checked):
                break
            await asyncio.sleep(0)


class InMemoryEngine(Engine):
    """An engine whose flows are asyncio tasks of this process (not durable).

    A subclass sets ``name`` and ``runtime_class`` (an ``InMemoryRuntime``
    with its own ``run_attempt``).
    """

    runtime_class: type[InMemoryRuntime] = InMemoryRuntime

    #: The largest payload its flows may carry, in bytes (None: no limit):
    #: Temporal's default, so that a flow too big to run on Temporal fails
    #: the same way here (``PayloadTooLarge``), where it is tested.
    payload_limit: int | None = DEFAULT_PAYLOAD_LIMIT

    def __init__(self) -> None:
        self.runs: dict[str, InMemoryRun] = {}
        self.started = 0
        self.tracing = False
        """Whether its flows emit OpenTelemetry spans."""
        self.clock: Clock = Clock()
        """How its flows wait (a ``SkippingClock`` makes tests of waits quick)."""

    def runtime(self, run: InMemoryRun) -> InMemoryRuntime:
        """The runtime of one flow of this engine."""
        return self.runtime_class(run)

    def find(self, flow_id: str) -> InMemoryRun:
        """The run of ``flow_id``.

        Raises:
            FlowNotFound: no flow of that id was started on this engine.
        """
        try:
            return self.runs[flow_id]
        except KeyError:
            raise FlowNotFound(
                f"no flow {flow_id!r} was started on the {self.name} engine"
            ) from None

    def launch(self, registry: Registry, input: FlowInput, flow_id: str) -> InMemoryRun:
        """Start running ``input`` under ``flow_id``.

        Raises:
            ArgumentsError: a flow of that id is running.
        """
        existing = self.runs.get(flow_id)
        if existing is not None and not existing.task.done():
            raise FlowIdInUse(f"a flow with id {flow_id!r} is already running")
        run = self.runs[flow_id] = InMemoryRun(self, registry, input, flow_id)
        return run

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        # The flow keeps its own copy of the caller's args.
        input = input.model_copy(
            update={"args": copy.deepcopy(input.args), "payload_limit": self.payload_limit}
        )
        check_input_fits(input, f"of the {self.name} engine")
        run = self.launch(Registry(flow), input, input.root_id)
        return InMemoryHandle(self, input.root_id, run)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return InMemoryHandle(self, flow_id)

    async def flow_records(self, flow_id: str) -> FlowRecords:
        run = self.find(flow_id)
        interpreter = run.interpreter
        return FlowRecords(
            flow_id=flow_id,
            run_id=run.run_id,
            input=interpreter.input,
            status=interpreter.status,
            failure=interpreter.saga.failure,
            steps=copy.deepcopy(interpreter.records()),
        )

    async def restart(self, input: FlowInput) -> FlowHandle:
        input = input.model_copy(update={"payload_limit": self.payload_limit})
        try:
            check_input_fits(input, f"of the {self.name} engine")
        except PayloadTooLarge as exc:
            raise ReactionError(f"flow {input.root_id!r}: what its redrive reuses: {exc}") from None
        earlier = self.find(input.root_id)
        run = self.launch(earlier.registry, input, input.root_id)
        return InMemoryHandle(self, input.root_id, run)

    async def close(self) -> None:
        """Cancel the flows still running (they roll back) and wait for them."""
        running = [
            run
            for run in self.runs.values()
            if not run.task.done() and run.interpreter.input.parent_id is None
        ]
        for run in running:
            run.cancel()
        for run in running:
            with contextlib.suppress(BaseException):
                await run.task
