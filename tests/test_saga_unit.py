"""The shared saga interpreter with a minimal runtime of the test's own."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest

import qwit
from qwit._flow import compile_flow
from qwit.engine import (
    ErrorInfo,
    FlowInput,
    FlowNode,
    FlowRuntime,
    Interpreter,
    StepCall,
    StepFailure,
    StepNode,
    StepReturn,
    SubflowRun,
)


class Needs(qwit.Step, name="unit.needs"):
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class WaitingFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Needs)


class Recording(FlowRuntime):
    """Every step fails; waits never end; status changes are recorded."""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        raise StepFailure(ErrorInfo(type="builtins.ValueError", message="no"))

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        raise NotImplementedError

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await asyncio.Event().wait()

    def cancel_requested(self) -> bool:
        return False

    def status_changed(self, status: Any) -> None:
        self.statuses.append(status)


def interpreter() -> tuple[Interpreter, Recording]:
    runtime = Recording()
    input = FlowInput(flow=compile_flow(WaitingFlow), args={}, root_id="unit-1")
    return Interpreter(input, runtime, "unit-1"), runtime


async def test_a_dropped_waiting_flow_changes_no_status():
    """A waiting flow whose engine drops it (cancelling its task, or closing
    its coroutine when it is garbage-collected) must not publish a status: on
    Temporal that would be a command in whatever flow runs at that moment."""
    interp, runtime = interpreter()
    task = asyncio.ensure_future(interp.run())
    while interp.status != "waiting":
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert runtime.statuses == ["waiting"]

    interp, runtime = interpreter()
    coro = interp.run()
    coro.send(None)  # runs until it waits
    assert interp.status == "waiting"
    del coro
    gc.collect()
    assert runtime.statuses == ["waiting"]


def test_every_sub_flow_execution_has_an_id_of_its_own():
    from qwit._plan import FlowInput, FlowNode, StepNode, child_execution, child_flow_id

    plan = FlowNode(name="f", steps=(StepNode(name="s"),))

    def sub(execution: str, path: str, attempt: int) -> str:
        child = FlowInput(flow=plan, root_id="order-7", path=path, execution=execution)
        return child_flow_id(child, path, attempt)

    root = "e" * 32
    mid2 = child_execution(root, "2", 2)
    assert sub(root, "2", 1) == "order-7/~2"
    assert sub(mid2, "2", 2) == "order-7/~2#2"
    assert sub(root, "2.1", 1) == "order-7/~2.1"  # inside the first run of 2
    assert sub(mid2, "2.1", 1) == "order-7/~2#2/2.1"  # inside its second run
    inner2 = child_execution(mid2, "2.1", 2)
    assert sub(inner2, "2.1", 2) == "order-7/~2#2/2.1#2"
    # flows of older QWIT keep the ids they had
    old = FlowInput(flow=plan, root_id="order-7", path="2")
    assert child_flow_id(old, "2", 1) == "order-7/2"


class Quick(qwit.Step, name="unit.quick"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"quick": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class QuickFlow(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Quick)


class SwallowedCancel(FlowRuntime):
    """A sub-flow whose cancel arrives as its last step completes, and is
    spent on that step (as Temporal does): the step returns, no
    ``CancelledError`` comes, only the request stays."""

    def __init__(self) -> None:
        self.requested = False
        self.changed = asyncio.Event()
        self.calls: list[str] = []

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        self.calls.append(call.direction)
        if call.direction == "step_forward":
            self.requested = True  # the cancel came while the step ran
        return StepReturn(output={"quick": True})

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        raise NotImplementedError

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    def cancel_requested(self) -> bool:
        return self.requested


async def test_a_sub_flow_whose_cancel_was_spent_on_its_last_step_still_rolls_back():
    runtime = SwallowedCancel()
    child = FlowInput(flow=compile_flow(QuickFlow), root_id="r", path="2", parent_id="r")
    interp = Interpreter(child, runtime, "r/~2")
    task = asyncio.ensure_future(interp.run())
    await asyncio.wait({task}, timeout=5)
    assert task.done(), "the sub-flow waits for its parent though it was cancelled"
    with pytest.raises(qwit.engine.FlowFailure) as failed:
        task.result()
    assert failed.value.info.kind == "cancelled"
    assert runtime.calls == ["step_forward", "step_back"]
