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


class Aborts(qwit.Step, name="unit.aborts"):
    on_failure = qwit.ABORT

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None


class Slow(qwit.Step, name="unit.slow"):
    async def step_forward(self, args: dict[str, Any]) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class AbortingBlock(qwit.Flow):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(Aborts)
            self.step(Slow)


class LateCancel(FlowRuntime):
    """``unit.aborts`` fails at once; ``unit.slow`` takes a while to stop
    when cancelled (as a Temporal activity does), and the flow's own cancel
    comes meanwhile."""

    def __init__(self) -> None:
        self.requested = False
        self.stopping = asyncio.Event()
        self.calls: list[str] = []

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        self.calls.append(f"{node.name}.{call.direction}")
        if node.name == "unit.aborts":
            await asyncio.sleep(0.01)  # its sibling has started
            raise StepFailure(ErrorInfo(type="builtins.ValueError", message="no"))
        if call.direction == "step_back":
            return StepReturn(output={})
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.stopping.set()
            await asyncio.shield(asyncio.sleep(0.05))
            raise
        raise AssertionError("unreachable")

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        raise NotImplementedError

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        raise NotImplementedError

    def cancel_requested(self) -> bool:
        return self.requested


async def test_a_cancel_that_comes_while_an_abort_stops_a_block_leaves_the_abort():
    """A branch ABORTs; while its sibling is being stopped, the flow is
    cancelled. The abort was decided first: the flow ends aborted and undoes
    nothing (as a cancel during a sequence's abort or rollback changes
    nothing), rather than "cancelled" with only part of its work undone."""
    runtime = LateCancel()
    input = FlowInput(flow=compile_flow(AbortingBlock), args={}, root_id="unit-2")
    task = asyncio.ensure_future(Interpreter(input, runtime, "unit-2").run())
    await asyncio.wait_for(runtime.stopping.wait(), 5)
    runtime.requested = True
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    with pytest.raises(qwit.engine.FlowFailure) as failed:
        task.result()
    assert failed.value.info.kind == "aborted"
    assert sorted(runtime.calls) == ["unit.aborts.step_forward", "unit.slow.step_forward"]


class AbortsAfterQuick(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Quick)
        self.step(Aborts)


class HeldChild(FlowRuntime):
    """A sub-flow's runtime: ``unit.aborts`` fails, the rest completes; the
    abort is reported to a parent the test plays."""

    def __init__(self) -> None:
        self.requested = False
        self.reported = asyncio.Event()
        self.changed = asyncio.Event()
        self.calls: list[str] = []

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        self.calls.append(f"{node.name}.{call.direction}")
        if node.name == "unit.aborts":
            raise StepFailure(ErrorInfo(type="builtins.ValueError", message="no"))
        return StepReturn(output={"quick": True})

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        raise NotImplementedError

    async def report_aborted(self, info: Any) -> None:
        self.reported.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    def cancel_requested(self) -> bool:
        return self.requested


@pytest.mark.parametrize("word", ["keep", "undo", "cancel"])
async def test_an_aborted_sub_flow_keeps_its_effects_until_its_parent_decides(word: str):
    """A sub-flow that aborts reports it and waits: its parent keeps its
    effects (the parent aborts too) or has them undone (the parent rolls back
    or is cancelled meanwhile; without this, a parent cancelled as its
    sub-flow aborted ended cancelled with the sub-flow's work still applied)."""
    runtime = HeldChild()
    child = FlowInput(
        flow=compile_flow(AbortsAfterQuick), root_id="r", path="2", parent_id="r", abort_held=True
    )
    interp = Interpreter(child, runtime, "r/~2")
    task = asyncio.ensure_future(interp.run())
    await asyncio.wait_for(runtime.reported.wait(), 5)
    assert not task.done(), "an aborted sub-flow ended before its parent's word"
    if word == "cancel":
        runtime.requested = True
        task.cancel()
    else:
        interp.settle(word == "keep")
    runtime.changed.set()
    await asyncio.wait({task}, timeout=5)
    with pytest.raises(qwit.engine.FlowFailure) as failed:
        task.result()
    kind = {"keep": "aborted", "undo": "rolled_back", "cancel": "cancelled"}[word]
    assert failed.value.info.kind == kind
    undone = ["unit.quick.step_back"] if word != "keep" else []
    assert runtime.calls == ["unit.quick.step_forward", "unit.aborts.step_forward", *undone]


class SubFlowStep(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Quick)
        self.step(AbortsAfterQuick)


class HeldSub(SubflowRun):
    def __init__(self, parent: HeldParent) -> None:
        self.parent = parent
        self.flow_id = "r/~2"

    async def forward(self) -> dict[str, Any]:
        self.held = True
        if self.parent.cancel_as_it_aborts:
            self.parent.requested = True  # the parent's cancel came meanwhile
        from qwit._errors import FailureInfo

        raise qwit.engine.FlowFailure(FailureInfo(kind="aborted", flow_id="r", reason="no"))

    async def settle(self, commit: bool) -> Any:
        self.parent.calls.append(f"settle({commit})")
        return None

    async def cancel(self) -> Any:
        raise AssertionError("an aborted sub-flow is settled, not cancelled")


class HeldParent(HeldChild):
    def __init__(self, cancel_as_it_aborts: bool) -> None:
        super().__init__()
        self.cancel_as_it_aborts = cancel_as_it_aborts

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        assert input.abort_held
        return HeldSub(self)


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_parent_settles_the_sub_flow_that_aborted_it(cancel: bool):
    """The parent aborts in turn, and tells its held sub-flow to keep its
    effects (or it would wait for ever); cancelled as the sub-flow aborted, it
    tells it to undo them, and undoes its own."""
    runtime = HeldParent(cancel_as_it_aborts=cancel)
    root = FlowInput(flow=compile_flow(SubFlowStep), root_id="r", execution="e" * 22)
    task = asyncio.ensure_future(Interpreter(root, runtime, "r").run())
    await asyncio.wait({task}, timeout=5)
    with pytest.raises(qwit.engine.FlowFailure) as failed:
        task.result()
    if cancel:
        assert failed.value.info.kind == "cancelled"
        assert runtime.calls == ["unit.quick.step_forward", "settle(False)", "unit.quick.step_back"]
    else:
        assert failed.value.info.kind == "aborted"
        assert runtime.calls == ["unit.quick.step_forward", "settle(True)"]


class Timed(qwit.Step, name="unit.timed"):
    timeout = 9
    back_timeout = 2

    async def step_forward(self, args: dict[str, Any]) -> None:
        return None

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


class TimedThenAborts(qwit.Flow):
    def build_flow(self) -> None:
        self.step(Timed)
        self.step(Aborts, on_failure=qwit.ROLLBACK)


async def test_each_direction_is_sent_its_own_time_limit():
    calls: list[tuple[str, float | None]] = []

    class Limits(HeldChild):
        async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
            calls.append((f"{node.name}.{call.direction}", call.timeout))
            return await super().run_step(node, call)

    input = FlowInput(flow=compile_flow(TimedThenAborts), root_id="r", execution="e" * 22)
    with pytest.raises(qwit.engine.FlowFailure):
        await Interpreter(input, Limits(), "r").run()
    assert calls[0] == ("unit.timed.step_forward", 9)
    assert calls[-1] == ("unit.timed.step_back", 2)


class _Waits(qwit.Step, name="unit.waits"):
    retry = qwit.Retry(max_attempts=1)
    on_failure = qwit.WAIT

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise RuntimeError("needs an operator")


class _TwoWaiting(qwit.Flow, backend=qwit.local):
    def build_flow(self) -> None:
        with self.parallel():
            self.step(_Waits)
            self.step(_Waits)


class _ManyWaiting(qwit.Flow, backend=qwit.local):
    def build_flow(self) -> None:
        self.map(_Waits, over="items", item="item", into="outs", max_concurrency=100)


async def _waiting(flow: type[qwit.Flow], args: dict[str, Any], count: int) -> Any:
    client = await qwit.connect(backend=qwit.local)
    handle = await client.start(flow, args)
    for _ in range(500):
        state = await handle.state()
        if len(state.waits) == count:
            return client, handle, state
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} steps never waited")


async def test_an_update_accepted_beside_another_is_taken_as_it_was_validated():
    # Temporal validates two updates of one workflow task before either
    # handler runs: the second, for "the step that waits" with no path, was
    # validated without the step the first decided; its handler must resolve
    # it the same way (it failed the workflow task instead).
    from qwit._saga import Decision

    client, handle, _ = await _waiting(_TwoWaiting, {}, 2)
    run = handle._find(handle.id)
    interpreter = run.interpreter
    interpreter.check_decision("skip", None, "1.1")
    interpreter.decide(Decision(reaction=qwit.SKIP, path="1.1"), over_pending=True)
    validated = interpreter.check_decision("skip", None, None)
    interpreter.decide(Decision(reaction=qwit.SKIP), over_pending=True)
    assert validated.path == "1.2"
    assert set(interpreter.saga.decisions) == {"1.1", "1.2"}
    run.poke()
    assert (await asyncio.wait_for(handle.result(), 10)) == {}
    await client.close()


async def test_the_waits_of_a_large_map_preview_what_ran_before_it_not_each_other():
    # Each of 60 waiting elements previewing all 60 made state() quadratic
    # (a map of 1,000: 136 MB, 30 s); past PREVIEW_MEMBERS a waiting element
    # previews itself and what ran before the map.
    from qwit._saga import PREVIEW_MEMBERS

    count = PREVIEW_MEMBERS + 10
    client, handle, state = await _waiting(_ManyWaiting, {"items": list(range(count))}, count)
    assert all(len(w.rollback_preview) == 1 for w in state.waits)
    await handle.cancel()
    with pytest.raises(qwit.FlowCancelled):
        await handle.result()
    await client.close()
