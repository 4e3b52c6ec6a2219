"""``qwit.local``: run flows in this process, on asyncio. No server.

The in-process engine has the same semantics as the Temporal engine (args,
every reaction, sub-flows, cancel, retries with backoff, WAIT and ``react``,
``state``) because both drive the same saga rules (``qwit.engine.Interpreter``).
It is what unit tests of your own flows use, and the worked example of an
engine: it is the whole of this file.

It is **not durable**: a flow lives in the memory of the process that started
it, and is lost with it. Use it for tests, scripts and development; use
``qwit.temporal`` for anything that must survive a crash.

    client = await qwit.connect(backend=qwit.local)   # every flow runs here
    result = await client.run(Order, {"order_id": 7})

or, per flow, ``class Order(qwit.Flow, backend=qwit.local)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import ArgumentsError, FlowFailed, FlowNotFound, StepNotRegistered, error_info
from ._options import DEFAULT_TIMEOUT_GRACE
from ._plan import child_flow_id
from .engine import (
    Decision,
    Engine,
    FailureInfo,
    FlowFailure,
    FlowHandle,
    FlowInput,
    FlowNode,
    FlowRuntime,
    FlowState,
    Interpreter,
    Registry,
    StepCall,
    StepFailure,
    StepNode,
    StepReturn,
    SubflowRun,
    run_step_method,
)

if TYPE_CHECKING:
    from ._client import Client
    from ._flow import Flow

#: The backend's name, as plans record it.
name = "local"


def create_engine(client: Client | None = None) -> LocalEngine:
    """A new in-process engine (the backend protocol)."""
    return LocalEngine()


class _Run:
    """One flow (the root or a sub-flow) running as an asyncio task."""

    def __init__(self, engine: LocalEngine, registry: Registry, input: FlowInput, flow_id: str):
        self.engine = engine
        self.registry = registry
        self.flow_id = flow_id
        self.changed = asyncio.Event()
        self.cancelling = False
        self.forward_done: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self.interpreter = Interpreter(input, _Runtime(self), flow_id)
        self.task = asyncio.create_task(self.interpreter.run(), name=f"qwit.local {flow_id}")
        # A failed flow's exception is read by result(); never warn about it.
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def poke(self) -> None:
        """Something a waiting predicate reads has changed."""
        self.changed.set()

    def cancel(self) -> None:
        if not self.cancelling and not self.task.done():
            self.cancelling = True
            self.task.cancel()


class _Subflow(SubflowRun):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.flow_id = run.flow_id

    async def forward(self) -> dict[str, Any]:
        await asyncio.wait(
            {self.run.forward_done, self.run.task}, return_when=asyncio.FIRST_COMPLETED
        )
        if self.run.forward_done.done():
            return self.run.forward_done.result()
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

    async def cancel(self) -> FailureInfo:
        self.run.cancel()
        info = await self._outcome()
        return info or FailureInfo(kind="cancelled", flow_id=self.flow_id, reason="cancelled")


class _Runtime(FlowRuntime):
    engine = name

    def __init__(self, run: _Run) -> None:
        self.run = run

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        cls = self.run.registry.get(call.step)
        if cls is None:  # pragma: no cover - the registry is built from the flow itself
            raise StepFailure(
                error_info(StepNotRegistered(f"step {call.step!r} is not registered"))
            )
        retry = node.retry if call.direction == "step_forward" else node.back_retry
        details: list[Any] = [None]
        attempt = 0
        while True:
            attempt += 1
            try:
                # Each attempt gets its own copy of the args, and the flow keeps
                # its own copy of the output, as if they had crossed a wire: a
                # step that mutates them changes nothing outside itself.
                output = await run_step_method(
                    cls,
                    call.model_copy(update={"args": copy.deepcopy(call.args)}),
                    attempt=attempt,
                    engine=name,
                    heartbeat=lambda d: details.__setitem__(0, copy.deepcopy(d)),
                    heartbeat_details=copy.deepcopy(details[0]),
                    is_cancelled=lambda: self.run.cancelling,
                    timeout=node.timeout,
                    grace=(
                        DEFAULT_TIMEOUT_GRACE if node.timeout_grace is None else node.timeout_grace
                    ),
                )
                return StepReturn(output=copy.deepcopy(output), attempt=attempt)
            except StepFailure as failure:
                info = failure.info
            spent = retry.max_attempts is not None and attempt >= retry.max_attempts
            if spent or not info.retryable:
                raise StepFailure(info.model_copy(update={"attempt": attempt}))
            await asyncio.sleep(retry.delay(attempt))

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        flow_id = child_flow_id(input, input.path, attempt)
        try:
            return _Subflow(self.run.engine._launch(self.run.registry, input, flow_id))
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

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:
        self.run.forward_done.set_result(outputs)


class LocalFlowHandle(FlowHandle):
    """A flow running in this process."""

    engine = name

    def __init__(self, engine: LocalEngine, flow_id: str) -> None:
        self.id = flow_id
        self._engine = engine

    async def result(self) -> dict[str, Any]:
        try:
            return copy.deepcopy(await asyncio.shield(self._engine.find(self.id).task))
        except FlowFailure as failed:
            raise FlowFailed.from_info(failed.info) from None

    async def cancel(self) -> None:
        self._engine.find(self.id).cancel()

    async def flow_state(self, flow_id: str) -> FlowState:
        return self._engine.find(flow_id).interpreter.state().model_copy(deep=True)

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        run = self._engine.find(flow_id)
        run.interpreter.decide(decision)
        run.poke()


class LocalEngine(Engine):
    """Runs flows as asyncio tasks of this process (not durable)."""

    name = name

    def __init__(self) -> None:
        self.runs: dict[str, _Run] = {}

    def find(self, flow_id: str) -> _Run:
        """The run of ``flow_id``.

        Raises:
            FlowNotFound: no flow of that id was started on this engine.
        """
        try:
            return self.runs[flow_id]
        except KeyError:
            raise FlowNotFound(f"no flow {flow_id!r} was started on this local engine") from None

    def _launch(self, registry: Registry, input: FlowInput, flow_id: str) -> _Run:
        existing = self.runs.get(flow_id)
        if existing is not None and not existing.task.done():
            raise ArgumentsError(f"a flow with id {flow_id!r} is already running")
        run = self.runs[flow_id] = _Run(self, registry, input, flow_id)
        return run

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        # The flow keeps its own copy of the caller's args.
        input = input.model_copy(update={"args": copy.deepcopy(input.args)})
        self._launch(Registry(flow), input, input.root_id)
        return LocalFlowHandle(self, input.root_id)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return LocalFlowHandle(self, flow_id)

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
