"""A custom engine, written from qwit.engine alone: steps run on a thread pool,
each in an event loop of its own thread. It passes the conformance suite,
which is the proof that the engine interface is enough to write an engine."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import qwit
from qwit.engine import (
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

name = "threads"


def create_engine(client: Any = None) -> ThreadEngine:
    return ThreadEngine()


class _Job:
    """A coroutine run to completion in a pool thread, cancellable from outside."""

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.started = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[Any] | None = None

    def __call__(self) -> Any:
        async def main() -> Any:
            self.loop = asyncio.get_running_loop()
            self.task = asyncio.current_task()
            self.started.set()
            return await self.coro

        return asyncio.run(main())

    def cancel(self) -> None:
        self.started.wait()
        assert self.loop is not None and self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)


class _Flow:
    def __init__(self, engine: ThreadEngine, registry: Registry, input: FlowInput, flow_id: str):
        self.engine = engine
        self.registry = registry
        self.flow_id = flow_id
        self.signal = asyncio.Event()
        self.cancelled = False
        self.done_outputs: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self.interpreter = Interpreter(input, _Runtime(self), flow_id)
        self.task = asyncio.ensure_future(self.interpreter.run())
        self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def cancel(self) -> None:
        if not self.cancelled and not self.task.done():
            self.cancelled = True
            self.task.cancel()


class _Sub(SubflowRun):
    def __init__(self, flow: _Flow) -> None:
        self.flow = flow
        self.flow_id = flow.flow_id

    async def forward(self) -> dict[str, Any]:
        await asyncio.wait({self.flow.done_outputs, self.flow.task}, return_when="FIRST_COMPLETED")
        if self.flow.done_outputs.done():
            return self.flow.done_outputs.result()
        return await self.flow.task  # raises FlowFailure

    async def _end(self) -> FailureInfo | None:
        try:
            await asyncio.shield(self.flow.task)
        except FlowFailure as failed:
            return failed.info
        return None

    async def settle(self, commit: bool) -> FailureInfo | None:
        self.flow.interpreter.settle(commit)
        self.flow.signal.set()
        return await self._end()

    async def cancel(self) -> FailureInfo:
        self.flow.cancel()
        return await self._end() or FailureInfo(kind="cancelled", flow_id=self.flow_id)


class _Runtime(FlowRuntime):
    engine = name

    def __init__(self, flow: _Flow) -> None:
        self.flow = flow

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        step = self.flow.registry.get(call.step)
        assert step is not None
        retry = node.retry if call.direction == "step_forward" else node.back_retry
        attempt = 0
        while True:
            attempt += 1
            job = _Job(
                run_step_method(
                    step,
                    call,
                    attempt=attempt,
                    engine=name,
                    is_cancelled=lambda: self.flow.cancelled,
                )
            )
            future = asyncio.wrap_future(self.flow.engine.pool.submit(job))
            try:
                return StepReturn(output=await asyncio.shield(future), attempt=attempt)
            except StepFailure as failure:
                info = failure.info
            except asyncio.CancelledError:
                job.cancel()
                with contextlib.suppress(BaseException):
                    await future
                raise
            if not info.retryable or (retry.max_attempts and attempt >= retry.max_attempts):
                raise StepFailure(info.model_copy(update={"attempt": attempt}))
            await asyncio.sleep(retry.delay(attempt))

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        flow_id = f"{input.root_id}/{input.path}#{attempt}"
        return _Sub(self.flow.engine.launch(self.flow.registry, input, flow_id))

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while True:
            self.flow.signal.clear()
            if predicate():
                return
            await self.flow.signal.wait()

    def cancel_requested(self) -> bool:
        return self.flow.cancelled

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:
        self.flow.done_outputs.set_result(outputs)


class ThreadHandle(FlowHandle):
    engine = name

    def __init__(self, engine: ThreadEngine, flow_id: str) -> None:
        self.id = flow_id
        self._engine = engine

    async def result(self) -> dict[str, Any]:
        try:
            return await asyncio.shield(self._engine.flows[self.id].task)
        except FlowFailure as failed:
            raise qwit.FlowFailed.from_info(failed.info) from None

    async def cancel(self) -> None:
        self._engine.flows[self.id].cancel()

    async def flow_state(self, flow_id: str) -> FlowState:
        return self._engine.flows[flow_id].interpreter.state()

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        flow = self._engine.flows[flow_id]
        flow.interpreter.decide(decision)
        flow.signal.set()


class ThreadEngine(Engine):
    name = name

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="qwit-step")
        self.flows: dict[str, _Flow] = {}

    def launch(self, registry: Registry, input: FlowInput, flow_id: str) -> _Flow:
        flow = self.flows[flow_id] = _Flow(self, registry, input, flow_id)
        return flow

    async def start(self, flow: type[qwit.Flow], input: FlowInput) -> FlowHandle:
        self.launch(Registry(flow), input, input.root_id)
        return ThreadHandle(self, input.root_id)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return ThreadHandle(self, flow_id)

    async def close(self) -> None:
        self.pool.shutdown(wait=True)
