"""A closed flow's state, rebuilt from its history without any worker."""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    Replayer,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from .._plan import FlowRecords
from .._state import FINAL_STATUSES, FlowState
from ._plugin import QwitPlugin


class _Capture(Interceptor):
    """Keeps the state (and what each step did) the replayed workflow ends with."""

    def __init__(self) -> None:
        self.states: list[FlowState] = []
        self.records: list[FlowRecords] = []

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        states, records = self.states, self.records

        class Inbound(WorkflowInboundInterceptor):
            async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
                try:
                    return await super().execute_workflow(input)
                finally:
                    flow = workflow.instance()
                    states.append(flow.state())
                    interpreter = flow.interpreter
                    records.append(
                        FlowRecords(
                            flow_id=workflow.info().workflow_id,
                            run_id=workflow.info().run_id,
                            input=interpreter.input,
                            status=interpreter.status,
                            failure=interpreter.saga.failure,
                            steps=interpreter.records(),
                        )
                    )

        return Inbound


async def _replay(history: WorkflowHistory) -> _Capture | None:
    capture = _Capture()
    replayer = Replayer(workflows=[], plugins=[QwitPlugin(tracing=False)], interceptors=[capture])
    try:
        await replayer.replay_workflow(history, raise_on_replay_failure=False)
    except Exception:
        return None
    if not capture.states or capture.states[-1].status not in FINAL_STATUSES:
        return None
    return capture


async def replay_records(history: WorkflowHistory) -> FlowRecords | None:
    """What each step of the ended flow whose history this is did (for a
    redrive); None for a flow that has not ended, or not a QWIT flow."""
    capture = await _replay(history)
    return capture.records[-1] if capture is not None else None


async def replay_state(history: WorkflowHistory) -> FlowState | None:
    """The final state of the flow whose (complete) history this is.

    The plan travels in the history, so replaying it needs no user code: only
    QWIT's workflow, which this process has. Returns None for a flow that has
    not ended (its history stops mid-way) or that is not a QWIT flow.
    """
    capture = await _replay(history)
    return capture.states[-1] if capture is not None else None
