"""The Temporal engine, client side: start flows as workflows, and steer them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import temporalio.client
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import HistoryEventFilterType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import (
    DescribeNamespaceRequest,
    GetWorkflowExecutionHistoryRequest,
)
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.converter import WorkflowSerializationContext
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import (
    ApplicationError,
    CancelledError,
    TerminatedError,
    TimeoutError,
    WorkflowAlreadyStartedError,
)
from temporalio.service import RPCError, RPCStatusCode

from .._engine import Engine, EngineHost, FlowHandle
from .._errors import (
    ErrorInfo,
    FailureInfo,
    FailureKind,
    FlowDefinitionError,
    FlowFailed,
    FlowIdInUse,
    FlowNotAnswering,
    FlowNotFound,
    QwitError,
    ReactionError,
    named_error_info,
)
from .._jsonargs import json_size
from .._plan import (
    DEFAULT_PAYLOAD_LIMIT,
    PAYLOAD_MARGIN,
    FlowInput,
    FlowNode,
    FlowRecords,
    check_input_fits,
    walk,
)
from .._saga import Decision
from .._state import AttemptsInFlight, FlowState, with_attempts_in_flight
from ._config import TemporalSettings
from ._connection import (
    TemporalConnectionError,
    config_error,
    connection_error,
    is_transient,
    is_unavailable,
    unavailable_error,
)
from ._plugin import QwitPlugin
from ._replay import replay_records, replay_state
from ._workflow import (
    QUERY_STATE,
    QWIT_FLOW,
    QWIT_STATUS,
    SIGNAL_CANCEL,
    UPDATE_REACT,
    WORKFLOW_NAME,
    failure_info,
    search_attributes,
)

if TYPE_CHECKING:
    from .._flow import Flow

DEFAULT_ADDRESS = "localhost:7233"

#: Environment variable: how many long polls for flows' ends one client holds
#: at once (``TemporalEngine.result_polls``).
RESULT_POLLS_ENV = "QWIT_RESULT_POLLS"
DEFAULT_RESULT_POLLS = 100
#: Environment variable: seconds ``result()`` keeps asking a Temporal that
#: does not answer before it gives up (``TemporalEngine.unavailable_timeout``).
UNAVAILABLE_TIMEOUT_ENV = "QWIT_UNAVAILABLE_TIMEOUT"
DEFAULT_UNAVAILABLE_TIMEOUT = 300.0
#: Seconds one long poll for a flow's end may last: the server answers a
#: second before. Shorter while other waits queue for a poll, so each gets its turn.
LONG_POLL_DEADLINE = 60.0
SHARED_POLL_DEADLINE = 5.0
#: Pause after a failed call while waiting for a result: the first, and the
#: longest (each pause doubles, less a random part of up to a half).
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0

log = logging.getLogger("qwit.temporal")


def _setting(value: float | None, env: str, default: float, what: str, *, whole: bool) -> float:
    if value is None:
        raw = os.environ.get(env)
        try:
            value = float(raw) if raw else default
        except ValueError:
            raise ValueError(f"${env} must be a number, not {raw!r}") from None
    if not value > 0 or value == float("inf") or (whole and value != int(value)):
        kind = "a whole number" if whole else "seconds"
        raise ValueError(f"{what} must be {kind} > 0, not {value!r}")
    return float(value)


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


async def _outcome(
    client: temporalio.client.Client, flow_id: str, event: HistoryEvent
) -> dict[str, Any] | FlowFailed | None:
    """The result of a flow's close event when it completed, the error when
    it failed; None for any other end (or a run that went on in another)."""
    converter = client.data_converter.with_context(
        WorkflowSerializationContext(namespace=client.namespace, workflow_id=flow_id)
    )
    if event.HasField("workflow_execution_completed_event_attributes"):
        completed = event.workflow_execution_completed_event_attributes
        if completed.new_execution_run_id:
            return None
        results = await converter.decode_wrapper(completed.result)
        return cast("dict[str, Any]", results[0]) if results else {}
    if event.HasField("workflow_execution_failed_event_attributes"):
        failed = event.workflow_execution_failed_event_attributes
        if failed.new_execution_run_id:
            return None
        cause = await converter.decode_failure(failed.failure)
        return _flow_failed(flow_id, WorkflowFailureError(cause=cause))
    return None


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


async def _ended_outside(
    handle: temporalio.client.WorkflowHandle[Any, Any], flow_id: str, state: FlowState
) -> FlowState:
    """``state`` of an ended flow, with how it ended when Temporal ended it
    (terminated, timed out): no flow code ran at that end, so its state
    (replayed, or queried) stops where the flow was."""
    if state.done:
        return state
    try:
        await handle.result()
    except WorkflowFailureError as err:
        info = _flow_failed(flow_id, err).info
        return state.model_copy(update={"status": info.kind, "failure": info})
    return state


async def _query_state(
    client: temporalio.client.Client, flow_id: str, run_id: str | None = None
) -> FlowState:
    """A flow's state: from its workflow's query while it runs, and from a
    replay of its history right here once it has ended (no worker needed)."""
    handle = client.get_workflow_handle(flow_id, run_id=run_id)
    with _rpc_errors(client, flow_id, f"for the state of flow {flow_id!r}"):
        description = await handle.describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            # (that run: a redrive may start another meanwhile)
            handle = client.get_workflow_handle(flow_id, run_id=description.run_id)
            replayed = await replay_state(await handle.fetch_history())
            if replayed is not None:
                return await _ended_outside(handle, flow_id, replayed)
        try:
            state: FlowState = await handle.query(QUERY_STATE, result_type=FlowState)
            if description.status != WorkflowExecutionStatus.RUNNING:
                return await _ended_outside(handle, flow_id, state)
        except RPCError as err:
            # (FAILED_PRECONDITION: "no poller seen for task queue recently")
            if err.status not in (
                RPCStatusCode.CANCELLED,
                RPCStatusCode.DEADLINE_EXCEEDED,
                RPCStatusCode.FAILED_PRECONDITION,
            ):
                raise
            # Temporal answered (the description): the flow's worker did not
            raise FlowNotAnswering(
                f"flow {flow_id!r} did not answer its state query: is a worker serving its "
                f"task queue {description.task_queue!r}? ({err.message})"
            ) from err
    return with_attempts_in_flight(state, await _attempts_in_flight(client, description))


async def _attempts_in_flight(
    client: temporalio.client.Client, description: temporalio.client.WorkflowExecutionDescription
) -> list[AttemptsInFlight]:
    """What Temporal knows of the steps it retries and the flow does not yet:
    their attempts and their last errors. A failed attempt's error names its
    step's path (see ``qwit.temporal._activities``); a step's attempts that
    ended otherwise (timed out) are matched by its name."""
    flights = []
    for pending in description.raw_description.pending_activities:
        step, _, direction = pending.activity_type.name.rpartition(".")
        if pending.attempt <= 1 or direction not in ("step_forward", "step_back"):
            continue
        path = None
        last = _last_failure(pending)
        details = pending.last_failure.application_failure_info.details.payloads
        if details:
            # The step's ErrorInfo, whole (its types and traceback, as the
            # flow gets it once the attempts end), then its path.
            with contextlib.suppress(Exception):  # (a failure of older workers)
                decoded = await client.data_converter.decode(list(details))
                if len(decoded) > 1 and isinstance(decoded[1], dict):
                    path = decoded[1].get("path")
                last = ErrorInfo.model_validate(decoded[0]).model_copy(
                    update={"attempt": pending.attempt - 1}
                )
        flights.append(
            AttemptsInFlight(
                step,
                "step_forward" if direction == "step_forward" else "step_back",
                pending.attempt - 1,
                last,
                path if isinstance(path, str) else None,
            )
        )
    return flights


def _last_failure(pending: Any) -> ErrorInfo | None:
    failure = pending.last_failure
    if not failure.message and not failure.HasField("application_failure_info"):
        return None
    kind = failure.application_failure_info.type or "Error"
    return named_error_info(kind, failure.message, attempt=pending.attempt - 1)


def unreachable(
    client: temporalio.client.Client, err: RPCError, doing: str, after: str = ""
) -> TemporalConnectionError:
    """The ``EngineUnavailable`` to raise (``from err``) for a call that
    Temporal did not answer: it names the address and what to check.

    Args:
        client: The client that made the call.
        err: What the call raised (see ``is_unavailable``).
        doing: What QWIT was doing, e.g. ``"to cancel flow 'order-7'"``.
        after: More to say, at the end of the message.
    """
    config = client.service_client.config
    settings = {"target_host": config.target_host, "tls": config.tls, "api_key": config.api_key}
    return unavailable_error(settings, client.namespace, err, doing, after)


async def _how_it_ended(handle: temporalio.client.WorkflowHandle[Any, Any]) -> str | None:
    """How the flow of ``handle`` ended, if it exists and has ended (Temporal
    answers a signal or an update to it as to an unknown workflow)."""
    try:
        description = await handle.describe()
    except RPCError:
        return None  # no such flow: the caller's NOT_FOUND says so
    if description.status == WorkflowExecutionStatus.RUNNING:
        return None
    # QwitStatus says how a flow that did not complete ended.
    return description.typed_search_attributes.get(QWIT_STATUS) or (
        description.status.name.lower() if description.status else "closed"
    )


async def _refuse_if_ended(handle: temporalio.client.WorkflowHandle[Any, Any]) -> None:
    """Raise ReactionError if the flow of ``handle`` exists and has ended."""
    ended = await _how_it_ended(handle)
    if ended is not None:
        raise ReactionError(
            f"flow {handle.id!r} has already ended ({ended}): there is nothing to cancel"
        )


def _mapped(client: temporalio.client.Client, err: RPCError, flow_id: str, doing: str) -> Exception:
    """The QWIT error for an RPC error about a flow, or ``err`` itself."""
    if err.status == RPCStatusCode.NOT_FOUND or (
        # an id no flow can have (empty, too long)
        err.status == RPCStatusCode.INVALID_ARGUMENT and "WorkflowId" in err.message
    ):
        return FlowNotFound(f"no flow with id {flow_id!r} ({err.message})")
    if is_unavailable(err):
        return unreachable(client, err, doing)
    return err


@contextlib.contextmanager
def _rpc_errors(client: temporalio.client.Client, flow_id: str, doing: str) -> Iterator[None]:
    """Temporal's RPC errors about a flow, as QWIT errors.

    An unknown id raises ``FlowNotFound``; a server that can't be reached,
    is restarting, is too busy or refuses the credentials raises
    ``EngineUnavailable`` (a ``TemporalConnectionError``) that names the
    address and what to check, the SDK's error as its cause.
    """
    try:
        yield
    except RPCError as err:
        mapped = _mapped(client, err, flow_id, doing)
        if mapped is err:
            raise
        if isinstance(mapped, FlowNotFound):
            raise mapped from None
        raise mapped from err


class _Patience:
    """How ``result()`` rides out a Temporal that does not answer for a while.

    Each transient failure (server down or restarting, unreachable, too
    busy) is followed by a pause, with backoff and jitter; a call that
    succeeds starts the count afresh. Only when no call has succeeded for
    ``unavailable_timeout`` seconds does the wait end, with ``EngineUnavailable``.
    """

    def __init__(
        self, engine: TemporalEngine, client: temporalio.client.Client, flow_id: str
    ) -> None:
        self.engine = engine
        self.client = client
        self.flow_id = flow_id
        self.failing_since: float | None = None
        self.failures = 0

    def succeeded(self) -> None:
        self.failing_since = None
        self.failures = 0

    async def after(self, err: RPCError) -> None:
        """Pause before the next try; raise if ``err`` is not worth another one."""
        doing = f"while waiting for flow {self.flow_id!r} to end"
        if not is_transient(err):
            mapped = _mapped(self.client, err, self.flow_id, doing)
            if mapped is err:
                raise err
            if isinstance(mapped, FlowNotFound):
                raise mapped from None
            raise mapped from err
        self.engine.result_retries[err.status.name] += 1
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= self.engine.unavailable_timeout:
            gave_up = (
                f". Gave up after {self.engine.unavailable_timeout:g} s without an answer "
                f"(${UNAVAILABLE_TIMEOUT_ENV}); the flow may still be running: ask for its "
                "result again later"
            )
            raise unreachable(self.client, err, doing, gave_up) from err
        self.engine.note_trouble(self.client, err)
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** min(self.failures, 10))
        self.failures += 1
        await asyncio.sleep(random.uniform(delay / 2, delay))


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
        """Wait for the flow to end (see ``FlowHandle.result``).

        It waits through a Temporal that restarts or can't be reached for a
        while, and through a server too busy to take one more long poll:
        failed calls are made again, with backoff and jitter, for up to the
        engine's ``unavailable_timeout`` without an answer. One client holds
        at most ``result_polls`` long polls at once; other waits take turns.

        Raises:
            FlowFailed: The flow failed (one of its subclasses).
            FlowNotFound: No flow has this id.
            EngineUnavailable: Temporal can't be reached at all, or did not
                answer for ``unavailable_timeout`` seconds.
        """
        engine = self._engine
        client = await engine.temporal_client()
        patience = _Patience(engine, client, self.id)
        request = GetWorkflowExecutionHistoryRequest(
            namespace=client.namespace,
            execution=WorkflowExecution(workflow_id=self.id, run_id=self.run_id or ""),
            wait_new_event=True,
            history_event_filter_type=HistoryEventFilterType.HISTORY_EVENT_FILTER_TYPE_CLOSE_EVENT,
            skip_archival=True,
        )
        # Long polls until the close event comes; each holds one of the
        # client's slots, and keeps it while it backs off after a failure, so
        # that a refusal does not let the next wait in to be refused at once.
        while True:
            async with engine.result_poll() as deadline:
                try:
                    response = await client.workflow_service.get_workflow_execution_history(
                        request, retry=False, timeout=timedelta(seconds=deadline)
                    )
                except RPCError as err:
                    await patience.after(err)
                    continue
            patience.succeeded()
            if response.history.events or not response.next_page_token:
                break
            request.next_page_token = response.next_page_token
        # It has ended. A flow completes or fails (QWIT's outcomes): decoded
        # from the close event at hand, as the SDK would after reading it again.
        for event in response.history.events:
            ended = await _outcome(client, self.id, event)
            if ended is not None:
                if isinstance(ended, FlowFailed):
                    raise ended
                return ended
        # Terminated, timed out, cancelled, continued: the SDK's own reading.
        handle = client.get_workflow_handle(self.id, run_id=self.run_id)
        while True:
            async with engine.result_poll() as deadline:
                try:
                    result: dict[str, Any] = await handle.result(
                        rpc_timeout=timedelta(seconds=deadline)
                    )
                except WorkflowFailureError as err:
                    raise _flow_failed(self.id, err) from None
                except RPCError as err:
                    await patience.after(err)
                    continue
            return result

    async def cancel(self, rollback: bool = True) -> None:
        client = await self._engine.temporal_client()
        handle = client.get_workflow_handle(self.id, run_id=self.run_id)
        with _rpc_errors(client, self.id, f"to cancel flow {self.id!r}"):
            # The signal says how; a workflow takes the signals of one task
            # before a cancel that comes with them, so a rollback=False that
            # came first is not overtaken. Temporal's own cancel (which rolls
            # back) also reaches workers that know no such signal.
            try:
                await handle.signal(SIGNAL_CANCEL, rollback)
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    await _refuse_if_ended(handle)
                raise
            if rollback:
                try:
                    await handle.cancel()
                except RPCError as err:
                    # It ended since it took the signal (which may have ended it).
                    if err.status != RPCStatusCode.NOT_FOUND:
                        raise

    async def flow_state(self, flow_id: str) -> FlowState:
        client = await self._engine.temporal_client()
        return await _query_state(client, flow_id, self.run_id if flow_id == self.id else None)

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        client = await self._engine.temporal_client()
        # Args over the payload limit on their own would fail the flow's
        # workflow task, not the update: refused here, as the flow refuses
        # those that take its args over it.
        limit = (await self._engine.namespace()).payload_limit
        size = json_size(decision.model_dump(mode="json"))
        if size > limit - PAYLOAD_MARGIN:
            raise ReactionError(
                f"flow {flow_id!r}: the decision's args take {size} bytes, over the "
                f"{limit}-byte payload limit of the namespace"
            )
        workflow = client.get_workflow_handle(flow_id)
        try:
            with _rpc_errors(client, flow_id, f"to decide flow {flow_id!r}"):
                try:
                    await workflow.execute_update(UPDATE_REACT, decision)
                except RPCError as err:
                    if err.status != RPCStatusCode.NOT_FOUND:
                        raise
                    if "aborted" in err.message:
                        # (another decision, or a cancel, ended it first)
                        raise ReactionError(
                            f"flow {flow_id!r} ended before it took the decision in"
                        ) from None
                    # It ended after the caller found it waiting (another
                    # decision, a cancel): not an unknown flow.
                    ended = await _how_it_ended(workflow)
                    if ended is not None:
                        raise ReactionError(
                            f"flow {flow_id!r} is not waiting (it is {ended})"
                        ) from None
                    raise
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


def _check_plan_length(plan: FlowNode) -> None:
    flows = [plan, *(node for _, node, _ in walk(plan) if isinstance(node, FlowNode))]
    for node in flows:
        if len(node.steps) > MAX_STEPS_PER_FLOW:
            raise FlowDefinitionError(
                f"flow {node.name!r} has {len(node.steps)} steps; on Temporal a flow (or "
                f"sub-flow) takes at most {MAX_STEPS_PER_FLOW}, so that its steps and their "
                "undo fit in one history: group steps into sub-flows"
            )


class TemporalEngine(Engine):
    """Runs flows as ``qwit.Flow`` workflows on a Temporal cluster.

    Waiting for flows' ends (``FlowHandle.result``) scales to thousands of
    flows awaited at once from one process: each wait is a long poll, which
    Temporal caps per namespace (``frontend.namespaceCount``, 1,200 by
    default), so a client holds at most ``result_polls`` of them and the
    other waits take turns; a refusal (``RESOURCE_EXHAUSTED``) or a server
    restarting is waited out.

    Args:
        client: The QWIT client this engine serves.
        result_polls: Long polls for flows' ends this client holds at once
            (default ``$QWIT_RESULT_POLLS`` or 100). Keep it well under the
            namespace's limit, shared with every other client.
        unavailable_timeout: Seconds ``result()`` keeps asking a Temporal
            that does not answer (down, restarting, unreachable, too busy)
            before it raises ``EngineUnavailable`` (default
            ``$QWIT_UNAVAILABLE_TIMEOUT`` or 300).

    Attributes:
        result_retries: Failed calls that ``result()`` made again, by gRPC
            status name (``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``...).
    """

    name = "temporal"

    def __init__(
        self,
        client: EngineHost,
        *,
        result_polls: int | None = None,
        unavailable_timeout: float | None = None,
    ) -> None:
        self.client = client
        settings = client.settings(self.name)
        self.settings: TemporalSettings = (
            settings if isinstance(settings, TemporalSettings) else TemporalSettings()
        )
        result_polls = self.settings.result_polls if result_polls is None else result_polls
        if unavailable_timeout is None:
            unavailable_timeout = self.settings.unavailable_timeout
        self._temporal: temporalio.client.Client | None = self.settings.temporal_client
        self._lock = asyncio.Lock()
        self._namespace: _Namespace | None = None
        self.result_polls = int(
            _setting(
                result_polls, RESULT_POLLS_ENV, DEFAULT_RESULT_POLLS, "result_polls", whole=True
            )
        )
        self.unavailable_timeout = _setting(
            unavailable_timeout,
            UNAVAILABLE_TIMEOUT_ENV,
            DEFAULT_UNAVAILABLE_TIMEOUT,
            "unavailable_timeout",
            whole=False,
        )
        self.result_retries: Counter[str] = Counter()
        self._polls: asyncio.Semaphore | None = None
        self._queued = 0
        self._warned_at = -float("inf")

    @contextlib.asynccontextmanager
    async def result_poll(self) -> AsyncIterator[float]:
        """Hold one of the client's ``result_polls`` slots for one long poll.

        Yields:
            The seconds the poll may last: shorter while other waits queue
            for a slot, so that each gets its turn.
        """
        if self._polls is None:
            self._polls = asyncio.Semaphore(self.result_polls)
        self._queued += 1
        try:
            await self._polls.acquire()
        finally:
            self._queued -= 1
        try:
            yield SHARED_POLL_DEADLINE if self._queued else LONG_POLL_DEADLINE
        finally:
            self._polls.release()

    def note_trouble(self, client: temporalio.client.Client, err: RPCError) -> None:
        """Log, at most once a minute, that results wait for Temporal."""
        now = time.monotonic()
        if err.status == RPCStatusCode.RESOURCE_EXHAUSTED or now - self._warned_at < 60:
            return
        self._warned_at = now
        log.warning(
            "Temporal at %s does not answer (%s: %s): waiting for flows' results goes on "
            "for up to %g s",
            client.service_client.config.target_host,
            err.status.name,
            err.message,
            self.unavailable_timeout,
        )

    async def temporal_client(self) -> temporalio.client.Client:
        """The temporalio client, connected on first use."""
        if self._temporal is None:
            async with self._lock:
                if self._temporal is None:
                    options = dict(self.settings.connect_options)
                    if self.client.tracing:
                        options.setdefault("plugins", [QwitPlugin(tracing=True)])
                    self._temporal = await connect_temporal(**options)
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
            except RPCError as err:
                if is_transient(err):
                    raise unreachable(client, err, "to start a flow") from err
                names = set()
            try:
                described = await client.workflow_service.describe_namespace(
                    DescribeNamespaceRequest(namespace=client.namespace)
                )
            except RPCError as err:
                if is_unavailable(err):
                    raise unreachable(client, err, "to start a flow") from err
                raise
            limit = described.namespace_info.limits.blob_size_limit_error
            self._namespace = _Namespace(
                search_attributes={QWIT_FLOW.name, QWIT_STATUS.name} <= names,
                payload_limit=limit or DEFAULT_PAYLOAD_LIMIT,
            )
        return self._namespace

    async def start(self, flow: type[Flow], input: FlowInput) -> FlowHandle:
        del flow  # the workflow runs the plan alone; workers have the steps
        _check_plan_length(input.flow)
        input, _, _ = await self._sized(input)
        check_input_fits(input, "of the namespace")
        return await self._start_workflow(
            input,
            task_queue=self.settings.task_queue,
            details=None,
            running=FlowIdInUse(f"a flow with id {input.root_id!r} is already running"),
            doing=f"to start flow {input.root_id!r}",
        )

    async def _sized(self, input: FlowInput) -> tuple[FlowInput, int, int]:
        """``input`` with the namespace's payload limit, its size, and that limit."""
        limit = (await self.namespace()).payload_limit
        input = input.model_copy(update={"payload_limit": limit})
        return input, json_size(input.model_dump(mode="json")), limit

    async def _start_workflow(
        self,
        input: FlowInput,
        *,
        task_queue: str,
        details: str | None,
        running: QwitError,
        doing: str,
    ) -> FlowHandle:
        """Start the workflow of ``input`` (``running``: raised if its id runs)."""
        client = await self.temporal_client()
        publish = (await self.namespace()).search_attributes
        try:
            handle = await client.start_workflow(
                WORKFLOW_NAME,
                input,
                id=input.root_id,
                task_queue=task_queue,
                static_summary=input.flow.name,
                static_details=details,
                search_attributes=search_attributes(input.flow.name) if publish else None,
            )
        except WorkflowAlreadyStartedError:
            raise running from None
        except RPCError as err:
            if is_unavailable(err):
                raise unreachable(client, err, doing) from err
            raise
        return TemporalFlowHandle(self, handle.id, handle.result_run_id)

    def get_handle(self, flow_id: str) -> FlowHandle:
        return TemporalFlowHandle(self, flow_id)

    async def flow_records(self, flow_id: str) -> FlowRecords:
        client = await self.temporal_client()
        handle = client.get_workflow_handle(flow_id)
        with _rpc_errors(client, flow_id, f"to read flow {flow_id!r}"):
            description = await handle.describe()
            if description.status == WorkflowExecutionStatus.RUNNING:
                try:
                    status = (await _query_state(client, flow_id)).status
                except FlowNotAnswering:
                    status = "running"
                raise ReactionError(
                    f"flow {flow_id!r} is {status}: only a flow that has ended can be redriven"
                )
            records = await replay_records(await handle.fetch_history())
        if records is None:
            raise ReactionError(
                f"flow {flow_id!r} did not end as a QWIT flow (Temporal status: "
                f"{description.status.name.lower() if description.status else 'unknown'}); "
                "it can't be redriven"
            )
        return records

    async def restart(self, input: FlowInput) -> FlowHandle:
        client = await self.temporal_client()
        input, size, limit = await self._sized(input)
        if size > limit - PAYLOAD_MARGIN:
            raise ReactionError(
                f"flow {input.root_id!r}: what its redrive reuses takes {size} bytes, over the "
                f"{limit}-byte payload limit of the namespace"
            )
        of_run = input.redrive.of_run if input.redrive is not None else None
        doing = f"to redrive flow {input.root_id!r}"
        # On the task queue the flow ran on, whose workers serve its steps.
        with _rpc_errors(client, input.root_id, doing):
            earlier = await client.get_workflow_handle(input.root_id).describe()
        return await self._start_workflow(
            input,
            task_queue=earlier.task_queue or self.settings.task_queue,
            details=f"Redrive of run {of_run}." if of_run else None,
            running=ReactionError(f"flow {input.root_id!r} is running again already"),
            doing=doing,
        )


__all__ = [
    "DEFAULT_RESULT_POLLS",
    "DEFAULT_UNAVAILABLE_TIMEOUT",
    "RESULT_POLLS_ENV",
    "UNAVAILABLE_TIMEOUT_ENV",
    "TemporalEngine",
    "TemporalFlowHandle",
    "connect_config",
    "connect_temporal",
    "unreachable",
]
