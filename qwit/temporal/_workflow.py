"""The one generic workflow every QWIT flow runs as.

It interprets a plan with the shared saga rules (``qwit._saga``): each step is
an activity named ``<step>.step_forward`` / ``<step>.step_back``, each
sub-flow a child workflow of this same type. It imports no user code.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import (
    MetricCounter,
    MetricHistogramFloat,
    RetryPolicy,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    TimeoutError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

with workflow.unsafe.imports_passed_through():
    import asyncio

    from pydantic import BaseModel, ConfigDict, ValidationError

    from .._errors import (
        ArgumentsError,
        ErrorInfo,
        FailureInfo,
        FlowFailed,
        HistoryTooLarge,
        PayloadTooLarge,
        ReactionError,
        StepFailure,
        error_info,
        named_error_info,
    )
    from .._jsonargs import json_size
    from .._metrics import METRICS
    from .._options import Retry
    from .._plan import (
        PAYLOAD_MARGIN,
        PLAN_VERSION,
        FlowInput,
        FlowNode,
        PlanTooNew,
        StepCall,
        StepNode,
        StepReturn,
        WireCall,
        child_flow_id,
    )
    from .._runtime import SubflowStartCancelled
    from .._saga import (
        Decision,
        FlowFailure,
        FlowRuntime,
        Interpreter,
        SubflowRun,
        stopped_by_cancel,
    )
    from .._state import (
        FAILED_STATUSES,
        FlowState,
        FlowStatus,
        PreviewItem,
        StepState,
        WaitInfo,
    )


def _refused(exc: Exception) -> ApplicationError:
    """A decision the flow refuses, as its caller reads it (``ReactionError``)."""
    return ApplicationError(str(exc), type="qwit.ReactionError", non_retryable=True)


WORKFLOW_NAME = "qwit.Flow"
#: Search attributes (Keyword), set where the namespace has them registered.
#: QwitFlow, the flow's name, is set when it starts. QwitStatus is published
#: from a flow's first wait on (an operator must find waiting flows), and at
#: every status change after it; a flow that never waits publishes nothing,
#: so its history is as long as a hand-written saga's, and Temporal's own
#: status (with the failure type, e.g. qwit.FlowRolledBack) tells its end.
QWIT_FLOW = SearchAttributeKey.for_keyword("QwitFlow")
QWIT_STATUS = SearchAttributeKey.for_keyword("QwitStatus")
#: History events a step costs (activity scheduled, started, completed, and a
#: workflow task's scheduled, started, completed).
EVENTS_PER_STEP = 6
#: Temporal terminates a workflow at 51,200 events or 50 MiB of history, with no
#: compensation; QWIT stops starting steps well before, so a rollback fits.
HISTORY_EVENTS_BUDGET = 45_000
HISTORY_BYTES_BUDGET = 22 * 1024 * 1024
#: A step that the worker which took it does not serve is offered again after
#: this delay, doubled each time up to the max, for the plan's
#: ``unserved_step_timeout``.
UNSERVED_RETRY_FIRST = 0.2
UNSERVED_RETRY_MAX = 2.0
QUERY_STATE = "qwit.state"
UPDATE_REACT = "qwit.react"
SIGNAL_SETTLE = "qwit.settle"
SIGNAL_SUBFLOW_DONE = "qwit.subflow_done"
SIGNAL_SUBFLOW_ABORTED = "qwit.subflow_aborted"
SIGNAL_CANCEL = "qwit.cancel"
SIGNAL_SUBFLOW_PLACE = "qwit.subflow_place"
SIGNAL_PLACE = "qwit.place"
START_FINISHED = "qwit-start-finished"
"""Patch: a cancel that comes while a sub-flow starts waits for the start,
and stops the sub-flow if it started (flows before it lost it)."""
UNSERVED_SINCE_REFUSAL = "qwit-unserved-since-refusal"
"""Patch: a step's time unserved counts from its first refusal (the time a
serving worker spent on its earlier attempts is not unserved time), and a
step refused after such attempts may have done something: its rollback
undoes it (flows before it counted from the first offer, and undid nothing)."""
PLAN_WAITS = "qwit-plan-waits"
"""Patch: a flow whose plan is newer than the worker waits for a worker that
understands it (flows before it failed with ``qwit.PlanVersionError``)."""
FIRST_DECISION_STANDS = "qwit-first-decision-stands"
"""Patch: of two decisions for one step that pass the validator together
(before either handler runs), the first stands and the second fails with
``qwit.ReactionError`` (flows before it took the second in the first's
place)."""
SPLIT_BIG_TASKS = "qwit-split-big-tasks"
"""Patch: steps and sub-flows started side by side whose payloads would take
one workflow task past ``TASK_PAYLOAD_BUDGET`` start over several tasks
(flows before it sent them in one, which Temporal refused past 4 MB and
terminated the flow: nothing undone)."""
#: The payload bytes the commands of one workflow task may carry: the task's
#: completion reaches Temporal as one gRPC message, of 4 MiB at most.
TASK_PAYLOAD_BUDGET = 3 * 1024 * 1024


class SubflowDone(BaseModel):
    """A sub-flow's message to its parent: all my steps ran, here are their outputs."""

    model_config = ConfigDict(frozen=True)

    flow_id: str
    outputs: dict[str, Any]


class SubflowAborted(BaseModel):
    """A sub-flow's message to its parent: I aborted, keeping my effects, and
    wait for your word (``qwit.settle``)."""

    model_config = ConfigDict(frozen=True)

    flow_id: str
    info: FailureInfo


class SubflowPlace(BaseModel):
    """A sub-flow's message to its parent (``FlowInput.gives_place``): I give
    back my place under the block's ``max_concurrency`` (``wanted`` false: a
    step in me waits), or I want one again (true: answer ``qwit.place``)."""

    model_config = ConfigDict(frozen=True)

    flow_id: str
    wanted: bool


def search_attributes(flow: str) -> TypedSearchAttributes:
    """The search attributes a flow starts with."""
    return TypedSearchAttributes([SearchAttributePair(QWIT_FLOW, flow)])


def failure_type(info: FailureInfo) -> str:
    """The ApplicationError type a failed flow ends with, e.g. ``qwit.FlowRolledBack``."""
    return f"qwit.{type(FlowFailed.from_info(info)).__name__}"


#: Room a failure's details leave under the payload limit: the failure that
#: carries them holds its message (at most ``MAX_FAILURE_MESSAGE`` bytes),
#: type and stack trace too, and Temporal checks the size of the whole.
FAILURE_MARGIN = 4096


def fit_failure(info: FailureInfo, limit: int | None) -> FailureInfo:
    """``info``, made to fit the payload limit: a flow must always be able to end.

    Messages are bounded already; what can still grow is the list of undos
    with their errors. Their errors' messages are shortened first, then the
    details are dropped (the name lists stay), and only if the names alone
    can't fit are their lists cut, saying so (``_cut_name_lists``).
    """
    if not limit:
        return info

    def fits(info: FailureInfo) -> bool:
        return json_size(info.model_dump(mode="json")) <= limit - FAILURE_MARGIN

    if fits(info):
        return info
    short = [
        c.model_copy(
            update={
                "error": c.error.model_copy(
                    update={"message": c.error.message[:200], "traceback": ""}
                )
            }
        )
        if c.error
        else c
        for c in info.compensations
    ]
    info = info.model_copy(update={"compensations": short})
    if fits(info):
        return info
    info = info.model_copy(update={"compensations": [], "final_failures": []})
    if fits(info):
        return info
    return _cut_name_lists(info, limit)


#: Room kept for the note that says how many names were left out.
_NOTE_ROOM = 300


def _cut_name_lists(info: FailureInfo, limit: int) -> FailureInfo:
    """The last resort of ``fit_failure`` (a rollback of tens of thousands of
    map elements): the lists of names are cut to what fits, the failed undos
    kept first, and the reason says how many names were left out."""
    lists = ("failed_compensations", "not_compensated", "compensated")
    bare = info.model_copy(update={name: [] for name in lists})
    budget = limit - FAILURE_MARGIN - _NOTE_ROOM - json_size(bare.model_dump(mode="json"))
    kept: dict[str, list[str]] = {}
    left_out = 0
    for name in lists:
        names: list[str] = getattr(info, name)
        count = 0
        for entry in names:
            size = json_size(entry) + 1
            if size > budget:
                break
            budget -= size
            count += 1
        kept[name] = names[:count]
        left_out += len(names) - count
    note = (
        f" [{left_out} names of steps left out of the lists of undos to fit Temporal's "
        f"payload limit: {len(info.compensated)} undone, {len(info.failed_compensations)} "
        "failed to undo]"
    )
    return info.model_copy(update={**kept, "reason": info.reason[:1000] + note})


def fit_state(state: FlowState, limit: int | None) -> FlowState:
    """``state``, made to fit the payload limit (a query result is a payload):
    the args and the rollback preview's args are left out when too big; then,
    if it is still too big, the oldest of its events (a flow retried again
    and again by an operator gathers many; the newest are kept, with their
    numbers)."""
    if not limit or json_size(state.model_dump(mode="json")) <= limit - PAYLOAD_MARGIN:
        return state

    def bare_items(items: list[PreviewItem]) -> list[PreviewItem]:
        return [item.model_copy(update={"args": {}}) for item in items]

    def bare(wait: WaitInfo) -> WaitInfo:
        return wait.model_copy(update={"rollback_preview": bare_items(wait.rollback_preview)})

    def bare_steps(steps: list[StepState]) -> list[StepState]:
        return [
            step.model_copy(
                update={
                    "rollback_after": bare_items(step.rollback_after),
                    "steps": bare_steps(step.steps),
                }
            )
            if step.rollback_after or step.steps
            else step
            for step in steps
        ]

    waiting = bare(state.waiting) if state.waiting is not None else None
    waits = [bare(wait) for wait in state.waits]
    fitted = state.model_copy(
        update={"args": {}, "waiting": waiting, "waits": waits, "steps": bare_steps(state.steps)}
    )
    events, keep = state.events, len(state.events)
    while keep and json_size(fitted.model_dump(mode="json")) > limit - PAYLOAD_MARGIN:
        keep //= 2
        fitted = fitted.model_copy(update={"events": events[len(events) - keep :]})
    return fitted


#: Bytes of a failed flow's message, which Temporal's UI shows first (the
#: whole reason is in the failure's details): with its stack trace, within
#: ``FAILURE_MARGIN``.
MAX_FAILURE_MESSAGE = 1024


def failure_error(info: FailureInfo, flow: str | None = None) -> ApplicationError:
    """The error a workflow fails with, carrying ``info`` as its details; its
    message, which Temporal's UI shows first, starts with the flow's name."""
    message = FlowFailed.from_info(info).args[0]
    text = f"{flow}: {message}" if flow else message
    if len(text.encode()) > MAX_FAILURE_MESSAGE:  # the whole reason is in the details
        text = text.encode()[: MAX_FAILURE_MESSAGE - 3].decode(errors="ignore") + "..."
    return ApplicationError(
        text,
        info.model_dump(mode="json"),
        type=failure_type(info),
        non_retryable=True,
    )


def failure_info(err: BaseException) -> FailureInfo | None:
    """The FailureInfo a QWIT workflow failed with, if ``err`` carries one."""
    current: BaseException | None = err
    while current is not None:
        if (
            isinstance(current, ApplicationError)
            and (current.type or "").startswith("qwit.")
            and current.details
        ):
            try:
                return FailureInfo.model_validate(current.details[0])
            except ValidationError:
                return None
        current = getattr(current, "cause", None)
    return None


def _policy(retry: Retry, version: int) -> RetryPolicy:
    return RetryPolicy(
        initial_interval=timedelta(seconds=retry.initial_interval),
        backoff_coefficient=retry.backoff,
        maximum_interval=timedelta(seconds=retry.max_interval),
        maximum_attempts=retry.max_attempts or 0,
        # An output over the payload limit will be as big on every attempt:
        # the workers of plans from version 2 on refuse it themselves, as a
        # final qwit.PayloadTooLarge, before the SDK does.
        non_retryable_error_types=["PayloadsTooLarge"] if version < 2 else None,
    )


def _error_info(err: BaseException, retry: Retry, limit: float | None = None) -> ErrorInfo:
    cause = err.cause if isinstance(err, ActivityError) and err.cause else err
    if isinstance(cause, ApplicationError):
        if cause.details and isinstance(cause.details[0], dict):
            try:
                return ErrorInfo.model_validate(cause.details[0])
            except ValidationError:
                pass
        return named_error_info(
            cause.type or "ApplicationError", cause.message, retryable=not cause.non_retryable
        )
    if isinstance(cause, TimeoutError):
        kind = cause.type.name.lower() if cause.type else "timeout"
        # builtins.TimeoutError, as the worker's own deadline reports it (an
        # attempt that outlived its grace too: it timed out at its limit)
        said = f"after {limit:g}s" if kind == "start_to_close" and limit else f"({kind})"
        timed_out = builtins.TimeoutError(f"step timed out {said}")
        return error_info(timed_out, attempt=retry.max_attempts or 1, with_traceback=False)
    return error_info(cause, with_traceback=False)


def _refusal(exc: Exception) -> ErrorInfo:
    return error_info(exc, started=False, attempt=0, with_traceback=False)


class _Subflow(SubflowRun):
    def __init__(self, owner: QwitWorkflow, handle: workflow.ChildWorkflowHandle[Any, Any]) -> None:
        self.owner = owner
        self.handle = handle
        self.flow_id = handle.id

    async def forward(self) -> dict[str, Any]:
        done, aborted = self.owner.subflows_done, self.owner.subflows_aborted
        await workflow.wait_condition(
            lambda: self.flow_id in done or self.flow_id in aborted or self.handle.done()
        )
        if self.flow_id in done:
            return done.pop(self.flow_id)
        if self.flow_id in aborted:
            self.held = True
            raise FlowFailure(aborted.pop(self.flow_id))
        await self._end()
        raise AssertionError("a sub-flow ended without reporting its steps")  # pragma: no cover

    async def _end(self) -> FailureInfo | None:
        try:
            await self.handle
        except ChildWorkflowError as err:
            info = failure_info(err)
            if info is None:
                info = FailureInfo(
                    kind="aborted",
                    flow_id=self.flow_id,
                    step=None,
                    reason=f"sub-flow {self.flow_id!r} ended without a QWIT outcome: {err.cause}",
                )
            raise FlowFailure(info) from None
        return None

    async def settle(self, commit: bool) -> FailureInfo | None:
        await self.handle.signal(SIGNAL_SETTLE, commit)
        try:
            return await self._end()
        except FlowFailure as failed:
            return failed.info

    async def grant_place(self) -> None:
        await self.handle.signal(SIGNAL_PLACE)

    async def cancel(self, rollback: bool = True) -> FailureInfo:
        if rollback:
            self.handle.cancel()
        else:
            await self.handle.signal(SIGNAL_CANCEL, False)
        try:
            await self._end()
        except FlowFailure as failed:
            return failed.info
        return FailureInfo(kind="cancelled", flow_id=self.flow_id, reason="cancelled")


class _Runtime(FlowRuntime):
    engine = "temporal"

    def __init__(self, owner: QwitWorkflow) -> None:
        self.owner = owner
        #: The workflow task (its history length) whose commands ``_room``
        #: counts, and the payload bytes they carry so far.
        self.task = -1
        self.task_bytes = 0

    async def _room(self, size: int) -> None:
        """Wait, if need be, for a workflow task whose commands can carry
        ``size`` more payload bytes (see ``TASK_PAYLOAD_BUDGET``)."""
        while True:
            task = workflow.info().get_current_history_length()
            if task != self.task:
                self.task, self.task_bytes = task, 0
            if not self.task_bytes or self.task_bytes + size <= TASK_PAYLOAD_BUDGET:
                self.task_bytes += size
                return
            if not workflow.patched(SPLIT_BIG_TASKS):
                return  # (as flows before it did)
            await workflow.sleep(0.001)  # a timer: what follows is a task of its own

    async def run_step(self, node: StepNode, call: StepCall) -> StepReturn:
        limit = self.owner.input.unserved_step_timeout
        if limit is None:  # plans of older QWIT: an unserved step fails at once
            return await self._run_once(node, call)
        began = workflow.now()
        since: datetime | None = None  # the first refusal (flows of this version)
        ran = False  # a serving worker ran earlier attempts of it
        delay = UNSERVED_RETRY_FIRST
        offered_again = False
        while True:
            try:
                return await self._run_once(node, call, eager=not offered_again)
            except StepFailure as failure:
                if failure.info.type != "qwit.StepNotRegistered":
                    raise
                if since is None and workflow.patched(UNSERVED_SINCE_REFUSAL):
                    since = workflow.now()
                ran = ran or (since is not None and failure.info.attempt > 1)
                waited = (workflow.now() - (since or began)).total_seconds()
                if waited + delay > limit:
                    message = f"{failure.info.message} (no worker served it for {waited:.0f}s)"
                    update: dict[str, Any] = {"message": message}
                    if ran:
                        update["started"] = True  # its undo may have something to do
                    raise StepFailure(failure.info.model_copy(update=update)) from None
            # Another worker of the queue may serve it (a rolling deploy, workers
            # of different modules): offer it again.
            await workflow.sleep(delay)
            delay = min(delay * 2, UNSERVED_RETRY_MAX)
            # Not eagerly, on this flow's own worker, which lacks it: through
            # the task queue, where any worker may take it.
            offered_again = True

    async def _run_once(self, node: StepNode, call: StepCall, eager: bool = True) -> StepReturn:
        # Flows of plan version 2 on send calls without what the activity
        # knows (WireCall); older ones (and inputs made without an execution
        # id) send them whole, as their workers expect.
        compact = self.owner.input.version >= 2 and call.key is not None
        sent = WireCall.of(call, node.timeout_grace) if compact else call
        if not eager and not node.local:
            # Scheduled through the task queue, not handed to this worker at
            # once (see NoEagerInterceptor): another worker may serve it. (A
            # local step runs here whatever this says: nothing to mark.)
            sent = sent.model_copy()
            self.owner.not_eager.add(id(sent))
        retry = node.back_retry if call.direction == "step_back" else node.retry
        activity = f"{node.name}.{call.direction}"
        # The worker enforces the step's timeout itself (call.timeout); the
        # server's limit adds the grace, so the next attempt or the undo never
        # starts beside an attempt that is still stopping.
        timeout = timedelta(seconds=node.limit(call.direction) + (node.timeout_grace or 0.0))
        # What Temporal's UI shows for the activity: the step's path and name
        # (flows of this version; older ones keep the commands they had).
        summary = f"{call.path} {node.name}" if call.key is not None else None
        if not node.local and call.args:  # (a local step's call is no command)
            # (its JSON, as the payload converter writes it: the bytes of its
            # ``model_dump(mode="json")``, without the dump)
            await self._room(json_size(sent))
        try:
            if node.local:
                result: StepReturn = await workflow.execute_local_activity(
                    activity,
                    sent,
                    result_type=StepReturn,
                    start_to_close_timeout=timeout,
                    retry_policy=_policy(retry, self.owner.input.version),
                    summary=summary,
                )
                return result
            result = await workflow.execute_activity(
                activity,
                sent,
                result_type=StepReturn,
                start_to_close_timeout=timeout,
                heartbeat_timeout=(
                    timedelta(seconds=node.heartbeat_timeout) if node.heartbeat_timeout else None
                ),
                retry_policy=_policy(retry, self.owner.input.version),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                summary=summary,
            )
            return result
        except (ActivityError, ApplicationError, TimeoutError) as err:
            if is_cancelled_exception(err) and self.cancel_requested():
                raise asyncio.CancelledError from None
            raise StepFailure(_error_info(err, retry, node.limit(call.direction))) from None

    async def start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        if input.execution is None or not workflow.patched(START_FINISHED):
            return await self._start_subflow(node, input, attempt)
        # A cancel that comes while the child starts must not lose it: the
        # start goes on (the child may already run, and apply effects), and
        # the parent stops it once it is known to have started.
        start = asyncio.ensure_future(self._start_subflow(node, input, attempt))
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            try:
                sub: SubflowRun | None = await self.shield(start)
            except StepFailure:
                sub = None  # it did not start
            raise SubflowStartCancelled(sub) from None

    async def _start_subflow(self, node: FlowNode, input: FlowInput, attempt: int) -> SubflowRun:
        child_id = child_flow_id(input, input.path, attempt)
        await self._room(json_size(input.model_dump(mode="json")))
        try:
            handle = await workflow.start_child_workflow(
                WORKFLOW_NAME,
                input,
                id=child_id,
                cancellation_type=workflow.ChildWorkflowCancellationType.WAIT_CANCELLATION_COMPLETED,
                static_summary=node.name,
                search_attributes=(
                    search_attributes(node.name) if self.owner.can_publish else None
                ),
            )
        except WorkflowAlreadyStartedError:
            raise StepFailure(
                error_info(
                    ArgumentsError(
                        f"sub-flow {node.name!r} could not start: a workflow with its id "
                        f"{child_id!r} is already running"
                    ),
                    started=False,
                    with_traceback=False,
                )
            ) from None
        return _Subflow(self.owner, handle)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await workflow.wait_condition(predicate)

    @property
    def tracing(self) -> bool:  # type: ignore[override]
        return self.owner.tracing

    @property
    def metered(self) -> bool:  # type: ignore[override]
        return self.owner.metered

    def record(self, metric: str, value: float, **labels: str) -> None:
        # Temporal's own meter: the worker's runtime exports it (Prometheus,
        # OpenTelemetry), and nothing is recorded while a flow replays.
        instruments = self.owner.instruments
        instrument = instruments.get(metric)
        if instrument is None:
            kind, unit, description, _ = METRICS[metric]
            meter = workflow.metric_meter()
            create = meter.create_counter if kind == "counter" else meter.create_histogram_float
            instrument = instruments[metric] = create(metric, description, unit or None)
        if isinstance(instrument, MetricCounter):
            instrument.add(int(value), labels)
        else:
            instrument.record(value, labels)

    def now(self) -> float:
        return workflow.time()

    def cancel_requested(self) -> bool:
        if workflow.cancellation_reason() is not None:
            return True
        return self.owner.interpreter.saga.cancel_rollback is not None

    def refuse_forward(self, call: StepCall | FlowInput, pending_undos: int) -> ErrorInfo | None:
        what = (
            f"step {call.step!r}" if isinstance(call, StepCall) else f"sub-flow {call.flow.name!r}"
        )
        limit = self.owner.input.payload_limit
        if limit:
            # (the bytes of its ``model_dump(mode="json")``, without the dump)
            size = json_size(call)
            if size > limit - PAYLOAD_MARGIN:
                return _refusal(
                    PayloadTooLarge(
                        f"{what} would be sent {size} bytes of args, over the {limit}-byte "
                        "payload limit of the namespace: pass references (ids, URLs) instead "
                        "of large values, or give the steps typed args"
                    )
                )
        info = workflow.info()
        # A rollback costs about what the forward steps cost; stop going forward
        # while the history still has room to undo everything.
        length = info.get_current_history_length() + EVENTS_PER_STEP * (pending_undos + 1)
        if length > HISTORY_EVENTS_BUDGET or info.get_current_history_size() > HISTORY_BYTES_BUDGET:
            return _refusal(
                HistoryTooLarge(
                    f"{what} can't start: the flow's history "
                    f"({info.get_current_history_length()} events, "
                    f"{info.get_current_history_size()} bytes) is near Temporal's limit, "
                    "which must leave room for a rollback"
                )
            )
        return None

    def status_changed(self, status: FlowStatus) -> None:
        owner = self.owner
        if workflow.info().run_id != owner.run_id:
            # This flow's coroutine is being closed by the garbage collector
            # while another flow runs (after its worker dropped it): a command
            # now would land in that other flow.
            return
        owner.describe_wait(status)
        if not owner.can_publish:
            return
        # Published from a flow's first wait on (an operator must find waiting
        # flows), and, in flows of this version, when a flow ends without
        # completing (one event on those paths; none on the completed one), so
        # that QwitStatus finds every flow by its QWIT outcome.
        ends_failed = status in FAILED_STATUSES and owner.input.execution is not None
        if status == "waiting" or owner.published is not None or ends_failed:
            workflow.upsert_search_attributes([QWIT_STATUS.value_set(status)])
            owner.published = status

    async def report_forward_done(self, outputs: dict[str, Any]) -> None:
        parent = self.owner.input.parent_id
        assert parent is not None
        await workflow.get_external_workflow_handle(parent).signal(
            SIGNAL_SUBFLOW_DONE, SubflowDone(flow_id=workflow.info().workflow_id, outputs=outputs)
        )

    async def report_aborted(self, info: FailureInfo) -> None:
        parent = self.owner.input.parent_id
        assert parent is not None
        info = fit_failure(info, self.owner.input.payload_limit)
        await workflow.get_external_workflow_handle(parent).signal(
            SIGNAL_SUBFLOW_ABORTED, SubflowAborted(flow_id=workflow.info().workflow_id, info=info)
        )

    gives_places = True

    async def report_place(self, wanted: bool) -> None:
        parent = self.owner.input.parent_id
        assert parent is not None
        await workflow.get_external_workflow_handle(parent).signal(
            SIGNAL_SUBFLOW_PLACE,
            SubflowPlace(flow_id=workflow.info().workflow_id, wanted=wanted),
        )

    def patched(self, change: str) -> bool:
        return workflow.patched(change)


#: Outside temporalio's sandbox (``sandboxed=False``). The sandbox guards
#: workflow code that users write against nondeterminism; no user code runs
#: here (a flow is a plan: data), QWIT's modules already pass through it, and
#: tests/test_workflow_determinism.py and the recorded histories replaying in
#: the tests guard this code's determinism. Inside, every activation and every
#: payload of every command paid for it: a map's element about 0.5 ms of
#: worker CPU.
@workflow.defn(name=WORKFLOW_NAME, sandboxed=False)
class QwitWorkflow:
    """Runs one QWIT flow (or sub-flow) from its plan."""

    @workflow.init
    def __init__(self, input: FlowInput) -> None:
        self.input = input
        self.interpreter = Interpreter(input, _Runtime(self), workflow.info().workflow_id)
        self.subflows_done: dict[str, dict[str, Any]] = {}
        self.subflows_aborted: dict[str, FailureInfo] = {}
        self.main: asyncio.Task[Any] | None = None
        self.tracing = False
        """Set by ``TracedInterceptor`` on a worker that traces."""
        self.instruments: dict[str, MetricCounter | MetricHistogramFloat] = {}
        self.metered = True
        """False on a worker whose runtime exports no metrics (the
        ``NoEagerInterceptor`` of ``QwitPlugin`` says so): nothing to record."""
        self.run_id = workflow.info().run_id
        # The client sets QwitFlow at start only where the attributes exist.
        self.can_publish = workflow.info().typed_search_attributes.get(QWIT_FLOW) is not None
        self.published: str | None = None
        #: Step calls (by id) to schedule through the task queue, not eagerly.
        self.not_eager: set[int] = set()

    def describe_wait(self, status: FlowStatus) -> None:
        """Say in the flow's current details (Temporal's UI shows them) what it
        waits for and how to decide; nothing once it no longer waits. Details
        are metadata: they add nothing to the history."""
        waiting = self.interpreter.waiting
        if status != "waiting" or waiting is None:
            workflow.set_current_details("")
            return
        flow_id = workflow.info().workflow_id
        choices = "|".join(waiting.allowed)
        workflow.set_current_details(
            f"**Waiting for an operator.** Step `{waiting.step}` (path {waiting.path}, "
            f"{waiting.direction}) failed: {waiting.error.describe()}\n\n"
            f"Decide with `qwit react {self.input.root_id} {choices} [--args JSON]`, or "
            f"`temporal workflow update execute --workflow-id {flow_id} --name "
            f'{UPDATE_REACT} --input \'{{"reaction": "{waiting.allowed[0]}", '
            f'"args": {{}}}}\'`.'
        )

    @workflow.run
    async def run(self, input: FlowInput) -> dict[str, Any]:
        """Interpret the plan; fail with a ``qwit.*`` ApplicationError on failure."""
        if input.version > PLAN_VERSION:
            if workflow.patched(PLAN_WAITS):
                # Raised as it is (not an ApplicationError), it fails this
                # workflow task, not the flow: Temporal offers the task again
                # until a worker that reads the plan (an upgraded one) takes it.
                raise PlanTooNew(input.version)
            raise ApplicationError(
                f"plan version {input.version} is newer than this worker understands "
                f"({PLAN_VERSION}); upgrade qwit on the workers",
                type="qwit.PlanVersionError",
                non_retryable=True,
            )
        self.main = asyncio.current_task()
        try:
            return await self.interpreter.run()
        except FlowFailure as failed:
            info = failed.info
            if input.execution is not None:  # flows of older QWIT end as they did
                info = fit_failure(info, input.payload_limit)
            raise failure_error(info, input.flow.name) from None

    @workflow.query(
        name=QUERY_STATE,
        description="QWIT's view of the flow: its status, each step's status and "
        "attempts, what it waits for.",
    )
    def state(self) -> FlowState:
        """The flow's progress: status, each step's status and attempts, what
        it waits for (a query adds nothing to the history)."""
        return fit_state(self.interpreter.state(), self.input.payload_limit)

    @workflow.update(
        name=UPDATE_REACT,
        description="Decide for a flow waiting for an operator: "
        '{"reaction": "retry|skip|skipback|rollback|abort", "args": {...}, "path": "..."} (args '
        "only with retry; path, the waiting step's, needed only when several wait).",
    )
    async def react(self, decision: Decision) -> None:
        """An operator's decision for a waiting flow."""
        if not workflow.patched(FIRST_DECISION_STANDS):
            # (over_pending: what a flow of older QWIT accepted, it replays)
            self.interpreter.decide(decision, over_pending=True)
            return
        try:
            self.interpreter.decide(decision)
        except ReactionError as exc:  # decided already, since it was validated
            raise _refused(exc) from None

    @react.validator
    def validate_react(self, decision: Decision) -> None:
        """Refuse a decision the flow can't take, before it is recorded."""
        try:
            if self.interpreter.runtime.cancel_requested() and stopped_by_cancel(
                list(self.interpreter.saga.waits.values()), decision.path
            ):  # (its forward waits go as its cancel reaches them)
                raise ReactionError(
                    f"flow {workflow.info().workflow_id!r} is not waiting (it is being cancelled)"
                )
            self.interpreter.check_decision(decision.reaction, decision.args, decision.path)
        except Exception as exc:
            raise _refused(exc) from None

    @workflow.signal(
        name=SIGNAL_SETTLE,
        description="QWIT internal: a parent flow keeps (true) or undoes (false) this sub-flow.",
    )
    def settle(self, commit: bool) -> None:
        """The parent's word on a sub-flow whose steps have run."""
        self.interpreter.settle(commit)

    @workflow.signal(
        name=SIGNAL_CANCEL,
        description="Cancel the flow: true rolls it back (as Temporal's own cancel "
        "does), false stops it where it is, undoing nothing.",
    )
    def cancel(self, rollback: bool) -> None:
        """A cancel asked through QWIT, with its mode."""
        if self.interpreter.runtime.cancel_requested():
            return  # the first cancel decides
        self.interpreter.request_cancel(rollback)
        if self.main is not None:
            self.main.cancel()

    @workflow.signal(
        name=SIGNAL_SUBFLOW_DONE,
        description="QWIT internal: a sub-flow tells its parent that its steps have run.",
    )
    def subflow_done(self, done: SubflowDone) -> None:
        """A sub-flow's steps have all run."""
        self.subflows_done[done.flow_id] = done.outputs

    @workflow.signal(
        name=SIGNAL_SUBFLOW_ABORTED,
        description="QWIT internal: a sub-flow tells its parent that it aborted and "
        "waits for its word.",
    )
    def subflow_aborted(self, aborted: SubflowAborted) -> None:
        """A sub-flow aborted, keeping its effects."""
        self.subflows_aborted[aborted.flow_id] = aborted.info

    @workflow.signal(
        name=SIGNAL_SUBFLOW_PLACE,
        description="QWIT internal: a sub-flow gives back its place under its block's "
        "max_concurrency while a step in it waits (false), or wants one again (true).",
    )
    def subflow_place(self, place: SubflowPlace) -> None:
        """A sub-flow member gives back its place, or wants one."""
        self.interpreter.subflow_place(place.flow_id, place.wanted)

    @workflow.signal(
        name=SIGNAL_PLACE,
        description="QWIT internal: the parent gave this sub-flow a place again: it goes on.",
    )
    def place(self) -> None:
        """The parent gave this sub-flow its place again."""
        self.interpreter.grant_place()


class _NoEagerOutbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        owner = workflow.instance()
        if isinstance(owner, QwitWorkflow) and input.args and id(input.args[0]) in owner.not_eager:
            owner.not_eager.discard(id(input.args[0]))
            input.disable_eager_execution = True
        return super().start_activity(input)


class _NoEagerInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_NoEagerOutbound(outbound))


class _UnmeteredNoEagerInbound(_NoEagerInbound):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        owner = workflow.instance()
        if isinstance(owner, QwitWorkflow):
            owner.metered = False
        return await super().execute_workflow(input)


class _TracedInbound(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        owner = workflow.instance()
        if isinstance(owner, QwitWorkflow):
            owner.tracing = True
        return await super().execute_workflow(input)


class TracedInterceptor(Interceptor):
    """Marks the flows of a worker that traces (``QwitPlugin(tracing=True)``):
    their interpreter opens its spans (``qwit._tracing``), which temporalio's
    OpenTelemetry interceptor, installed beside it, keeps replay-safe."""

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _TracedInbound


class NoEagerInterceptor(Interceptor):
    """Lets the flow schedule a step through its task queue instead of eagerly.

    Temporal hands an activity straight to the worker that scheduled it
    (eager execution) when it can: quicker, but a step that worker does not
    serve would come back to it every time. A step offered again after
    ``StepNotRegistered`` goes through the task queue, where any worker that
    serves it may take it.

    Args:
        metered: False on a worker whose runtime exports no metrics: its
            flows then skip recording QWIT's metrics (``qwit._metrics``), a
            cost on every step with nothing to show for it.
    """

    def __init__(self, metered: bool = True) -> None:
        self.metered = metered

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _NoEagerInbound if self.metered else _UnmeteredNoEagerInbound
