"""The two sides compared: QWIT, and the hand-written saga. Each starts a flow
of a given shape and checks that it ended as that shape should."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import temporalio.client
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

import qwit
from benchmarks.flows import flow_args, flow_for
from benchmarks.hand_workflow import WORKFLOW_NAME, SagaInput
from benchmarks.shapes import Shape


class WrongOutcome(AssertionError):
    """A flow did not do the work it was meant to: its timings mean nothing."""


@dataclass
class Run:
    """A started flow: its workflow id, and a wait for its (checked) end."""

    id: str
    result: Callable[[], Awaitable[None]]


def new_id(side: str, shape: Shape) -> str:
    # The same length on both sides: QWIT sends the flow id with every step.
    return f"{side}.{shape.key}-{uuid.uuid4().hex}"


def _check_outputs(side: str, shape: Shape, result: dict[str, Any]) -> None:
    outputs = [key for key in result if key.startswith("r")]
    if len(outputs) != shape.steps:
        raise WrongOutcome(f"{side} {shape.key}: {len(outputs)} outputs, not {shape.steps}")


class QwitSide:
    name = "qwit"

    def __init__(self, client: qwit.Client) -> None:
        self.client = client

    async def start(self, shape: Shape) -> Run:
        handle = await self.client.start(
            flow_for(shape), flow_args(shape), id=new_id(self.name, shape)
        )

        async def result() -> None:
            if not shape.fail_last:
                _check_outputs(self.name, shape, await handle.result())
                return
            try:
                await handle.result()
            except qwit.FlowRolledBack as failed:
                # The failing step is listed too, though it has nothing to run.
                if failed.compensated.count("work") != shape.undos:
                    raise WrongOutcome(f"qwit {shape.key}: undid {failed.compensated}") from None
                return
            raise WrongOutcome(f"qwit {shape.key}: completed, but its last step fails")

        return Run(handle.id, result)


class HandSide:
    name = "hand"

    def __init__(self, client: temporalio.client.Client, task_queue: str) -> None:
        self.client = client
        self.task_queue = task_queue

    async def start(self, shape: Shape) -> Run:
        handle = await self.client.start_workflow(
            WORKFLOW_NAME,
            SagaInput(
                steps=shape.steps, size=shape.size, fail_last=shape.fail_last, local=shape.local
            ),
            id=new_id(self.name, shape),
            task_queue=self.task_queue,
            result_type=dict,
        )

        async def result() -> None:
            if not shape.fail_last:
                _check_outputs(self.name, shape, await handle.result())
                return
            try:
                await handle.result()
            except WorkflowFailureError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == "SagaRolledBack":
                    return
                raise
            raise WrongOutcome(f"hand {shape.key}: completed, but its last step fails")

        return Run(handle.id, result)


Side = QwitSide | HandSide
