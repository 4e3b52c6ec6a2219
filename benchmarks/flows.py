"""The QWIT side: steps that do ``benchmarks.work``, and a Flow per shape."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

import qwit
from benchmarks import work
from benchmarks.shapes import ALL_SHAPES, Shape


def _index() -> int:
    # Root steps have paths "1".."N": the step's position is its index, so the
    # step needs no extra arg to know it (the hand-written side passes it).
    return int(qwit.context().path)


class Work(qwit.Step, name="work"):
    """Untyped: sent every arg accumulated so far."""

    async def step_forward(self, args: dict[str, Any]) -> dict[str, str]:
        return work.forward(_index(), args.get("size", 0))

    async def step_back(self, args: dict[str, Any]) -> None:
        work.back(_index())


class Sized(BaseModel):
    size: int = 0


class TypedWork(qwit.Step, name="typed_work"):
    """Typed both ways: sent only the fields of ``Sized``."""

    async def step_forward(self, args: Sized) -> dict[str, str]:
        return work.forward(_index(), args.size)

    async def step_back(self, args: Sized) -> None:
        work.back(_index())


class ForwardTypedWork(qwit.Step, name="forward_typed_work"):
    """Typed forward only, like the order sample's ReserveInventory."""

    async def step_forward(self, args: Sized) -> dict[str, str]:
        return work.forward(_index(), args.size)

    async def step_back(self, args: dict[str, Any]) -> None:
        work.back(_index())


class Fail(qwit.Step, name="fail"):
    """Fails for good at once. No step_back: nothing of it to undo."""

    async def step_forward(self, args: dict[str, Any]) -> None:
        try:
            work.fail(_index())
        except work.Declined as exc:
            raise qwit.StepError(str(exc), retry=False) from exc


def flow_for(shape: Shape) -> type[qwit.Flow]:
    """The Flow class that runs ``shape``."""
    return FLOWS[shape.key]


def _make_flow(shape: Shape) -> type[qwit.Flow]:
    step = {"untyped": Work, "typed_forward": ForwardTypedWork, "typed": TypedWork}[shape.typing]

    class Chain(qwit.Flow, name=f"bench.{shape.key}"):
        def build_flow(self) -> None:
            for i in range(1, shape.steps + 1):
                last = i == shape.steps
                self.step(Fail if shape.fail_last and last else step, local=shape.local)

    return Chain


FLOWS: dict[str, type[qwit.Flow]] = {shape.key: _make_flow(shape) for shape in ALL_SHAPES}
STEPS: tuple[type[qwit.Step], ...] = (Work, TypedWork, ForwardTypedWork, Fail)


def flow_args(shape: Shape) -> dict[str, Any]:
    """A flow's input: the size its steps return, when they return a payload."""
    return {"size": shape.size} if shape.size else {}
