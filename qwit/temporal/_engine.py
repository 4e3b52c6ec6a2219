"""The Temporal engine, client side: start flows as workflows, and steer them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import temporalio.client
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import (
    ApplicationError,
    CancelledError,
    TerminatedError,
    TimeoutError,
    WorkflowAlreadyStartedError,
)
from temporalio.service import RPCError, RPCStatusCode

from .._engine import Engine, FlowHandle
from .._errors import (
    ArgumentsError,
    ErrorInfo,
    FailureInfo,
    FailureKind,
    FlowDefinitionError,
    FlowFailed,
    FlowNotFound,
    QwitError,
    ReactionError,
)
from .._jsonargs import json_size
from .._plan import PAYLOAD_MARGIN, FlowInput, FlowNode
from .._saga import Decision
from .._state import FlowState
from ._activities import DEFAULT_PAYLOAD_LIMIT
from ._connection import config_error, connection_error
from ._plugin import QwitPlugin
from ._replay import replay_state
from ._workflow import (
    QUERY_STATE,
    QWIT_FLOW,
    QWIT_STATUS,
    UPDATE_REACT,
    WORKFLOW_NAME,
    failure_info,
    search_attributes,
)

if TYPE_CHECKING:
    from .._client import Client
    from .._flow import Flow

DEFAULT_ADDRESS = "localhost:7233"


def connect_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``temporalio.client.Client.connect``.

    Read from Temporal's environment config (``TEMPORAL_ADDRESS``,
    ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``, TLS variables,
    ``TEMPORAL_PROFILE`` and the config file), with ``localhost:7233`` when no
    address is set, then updated with ``overrides``.

    Raises:
        TemporalConnectionError: The config can't be loaded (a TLS file named
            there is missing, say).
    """
    try:
        loaded = ClientConfig.load_client_connect_config()
    except (OSError, RuntimeError, ValueError) as err:
        raise config_error(err) from err
    config: dict[str, Any] = dict(loaded)
    config.setdefault("target_host", DEFAULT_ADDRESS)
    config.update(overrides)
    return config


async def connect_temporal(**overrides: Any) -> temporalio.client.Client:
    """A temporalio client set up for QWIT (see ``connect_config``).

    Raises:
        TemporalConnectionError: Temporal can't be reached; the message names
            the address and says what to check (e.g. that TLS verification
            failed), the SDK's error is its cause.
        EncryptionError: The encryption keys configured are bad.
    """
    config = connect_config(**overrides)
    plugins = list(config.pop("plugins", []))
    if not any(isinstance(p, QwitPlugin) for p in plugins):
        plugins.append(QwitPlugin())
    try:
        return await temporalio.client.Client.connect(plugins=plugins, **config)
    except QwitError:
        raise
    except (RuntimeError, RPCError) as err:
        raise connection_error(config, err) from err


def _flow_failed(flow_id: str, err: WorkflowFailureError) -> FlowFailed:
    info = failure_info(err.cause)
    if info is not None:
        return FlowFailed.from_info(info)
    cause = err.cause
    kind: FailureKind
    if isinstance(cause, TerminatedError):
        kind, reason = "aborted", f"terminated in Temporal ({cause.message}): nothing was undone"
    elif isinstance(cause, TimeoutError):
        kind, reason = "aborted", "the workflow timed out in Temporal: nothing was undone"
    elif isinstance(cause, CancelledError):
        kind, reason = "cancelled", "cancelled before it started"
    else:
        kind, reason = "aborted", f"the workflow failed: {cause}"
    return FlowFailed.from_info(FailureInfo(kind=kind, flow_id=flow_id, reason=reason))


async def _query_state(
    client: temporalio.client.Client, flow_id: str, run_id: str | None = None
) -> FlowState:
    """A flow's state: from its workflow's query while it runs, and from a
    replay of its history right here once it has ended (no worker needed)."""
    handle = client.get_workflow_handle(flow_id, run_id=run_id)
    with _rpc_errors(flow_id):
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            replayed = await replay_state(await handle.fetch_history())
            if replayed is not None:
                return replayed
        state: FlowState = await handle.query(QUERY_STATE, result_type=FlowState)
    return _with_attempts_in_flight(state, description)


def _with_attempts_in_flight(
    state: FlowState, description: temporalio.client.WorkflowExecutionDescription
) -> FlowState:
    """``state`` with what Temporal knows of the step in flight and the flow
    does not yet: its attempt and its last error, while it is being retried.

    A flow runs one step at a time, so the running (or compensating) step of
    a pending activity's name is that activity's step.
    """
    pending = {p.activity_type.name: p for p in description.raw_description.pending_activities}
    if not pending:
        return state
    steps = []
    for step in state.steps:
        forward = pending.get(f"{step.name}.step_forward") if step.status == "running" else None
        back = pending.get(f"{step.name}.step_back") if step.status == "compensating" else None
        if forward is not None and forward.attempt > 1:
            step = step.model_copy(
                update={
                    "attempts": step.attempts + forward.attempt - 1,
                    "error": _last_failure(forward) or step.error,
                }
            )
        elif back is not None and back.attempt > 1:
            step = step.model_copy(
                update={
                    "back_attempts": step.back_attempts + back.attempt - 1,
                    "back_error": _last_failure(back) or step.back_error,
                }
            )
        steps.append(step)
    return state.model_copy(update={"steps": steps})


def _last_failure(pending: Any) -> ErrorInfo | None:
    failure = pending.last_failure
    if not failure.message and not failure.HasField("application_failure_info"):
        return None
    kind = failure.application_failure_info.type or "Error"
    return ErrorInfo(type=kind, types=[kind], message=failure.message, attempt=pending.attempt - 1)


@contextlib.contextmanager
def _rpc_errors(flow_id: str) -> Iterator[None]:
    """Temporal's RPC errors about a flow, as QWIT errors."""
    try:
        yield
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise FlowNotFound(f"no flow with id {flow_id!r} ({err.message})") from None
        raise


class TemporalFlowHandle(FlowHandle):
    """A flow running as a Temporal workflow."""

    engine = "temporal"

    def __init__(self, engine: TemporalEngine, flow_id: str, run_id: str | None = None) -> None:
        self.id = flow_id
        self.run_id = run_id
        self._engine = engine

    async def workflow_handle(self) -> temporalio.client.WorkflowHandle[Any, Any]:
        """The temporalio handle of the flow's workflow."""
        client = await self._engine.temporal_client()
        return client.get_workflow_handle(self.id, run_id=self.run_id)

    async def result(self) -> dict[str, Any]:
        handle = await self.workflow_handle()
        try:
            with _rpc_errors(self.id):
                result: dict[str, Any] = await handle.result()
        except WorkflowFailureError as err:
            raise _flow_failed(self.id, err) from None
        return result

    async def cancel(self) -> None:
        handle = await self.workflow_handle()
        with _rpc_errors(self.id):
            await handle.cancel()

    async def flow_state(self, flow_id: str) -> FlowState:
        client = await self._engine.temporal_client()
        return await _query_state(client, flow_id, self.run_id if flow_id == self.id else None)

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        client = await self._engine.temporal_client()
        try:
            with _rpc_errors(flow_id):
                await client.get_workflow_handle(flow_id).execute_update(UPDATE_REACT, decision)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            message = cause.message if isinstance(cause, ApplicationError) else str(cause)
            raise ReactionError(message) from None


#: Steps of one flow (sub-flows count apart: each is a workflow of its own)
#: beyond which forward and undo could not fit in one history.
MAX_STEPS_PER_FLOW = 2000


@dataclass(frozen=True)
class _Namespace:
    search_attributes: bool
    payload_limit: int


def _check_plan_length(node: FlowNode) -> None:
    if len(node.steps) > MAX_STEPS_PER_FLOW:
        raise FlowDefinitionError(
            f"flow {node.name!r} has {len(node.steps)} steps; on Temporal a flow (or "
            f"sub-flow) takes at most {MAX_STEPS_PER_FLOW}, so that its steps and their "
            "undo fit in one history: group steps into sub-flows"
        )
    for step in node.steps:
        if isinstance(step, FlowNode):
            _check_plan_length(step)


class TemporalEngine(Engine):
    """Runs flows as ``qwit.Flow`` workflows on a Temporal cluster."""

    name = "temporal"

    def __init__(self, client: Client) -> None:
        self.client = client
        self._temporal: temporalio.client.Client | None = client.given_temporal_client
        self._lock = asyncio.Lock()
        self._namespace: _Namespace | None = None

    async def temporal_client(self) -> temporalio.client.Client:
        """The temporalio client, connected on first use."""
        if self._temporal is None:
            async with self._lock:
                if self._temporal is None:
                    self._temporal = await connect_temporal(**self.client.temporal_options)
        return self._temporal

    async def namespace(self) -> _Namespace:
        """What QWIT needs to know of the namespace (asked once)."""
        if self._namespace is None:
            client = await self.temporal_client()
            try:
                attributes = await client.operator_service.list_search_attributes(
                    ListSearchAttributesRequest(namespace=client.namespace)
                )
                names = set(attributes.custom_attributes)
            except RPCError:
                names = set()
            described = await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=client.namespace)
            )
            limit = described.namespace_info.limits.blob_size_limit_error
            self._namespace = _Namespace(
                search_attributes={QWIT_FLOW.name, QWIT_STATUS.name} <= names,
                payload_limit=limit or DEFAULT_PAYLOAD_LIMIT,
            )
        return self._namespace

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        del flow  # the workflow runs the plan alone; workers have the steps
        client = await self.temporal_client()
        namespace = await self.namespace()
        _check_plan_length(input.flow)
        input = input.model_copy(update={"payload_limit": namespace.payload_limit})
        size = json_size(input.model_dump(mode="json"))
        if size > namespace.payload_limit - PAYLOAD_MARGIN:
            raise ArgumentsError(
                f"flow {input.flow.name!r}: its args and plan take {size} bytes, over the "
                f"{namespace.payload_limit}-byte payload limit of the namespace; pass "
                "references (ids, URLs) instead of large values"
            )
        publish = namespace.search_attributes
        try:
            handle = await client.start_workflow(
                WORKFLOW_NAME,
                input,
                id=input.root_id,
                task_queue=self.client.task_queue,
                static_summary=input.flow.name,
                search_attributes=search_attributes(input.flow.name) if publish else None,
            )
        except WorkflowAlreadyStartedError:
            raise ArgumentsError(f"a flow with id {input.root_id!r} is already running") from None
        return TemporalFlowHandle(self, handle.id, handle.result_run_id)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return TemporalFlowHandle(self, flow_id)


__all__ = [
    "TemporalEngine",
    "TemporalFlowHandle",
    "connect_config",
    "connect_temporal",
]
