"""``qwit.connect()`` and the client that starts flows on their engines."""

from __future__ import annotations

import os
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import temporal
from ._engine import Backend, Engine, FlowHandle
from ._errors import ArgumentsError, FlowDefinitionError, FlowNotFound
from ._flow import Flow, compile_flow
from ._jsonargs import NotJSON, as_args, unkeepable_char
from ._plan import SUBFLOW_MARK, FlowInput, FlowNode, StepNode, walk
from ._redrive import redrive_input
from ._runtime import Decision
from ._state import FlowState
from ._tracing import require_opentelemetry, tracing_from_env
from .temporal._config import (
    DEFAULT_TASK_QUEUE,
    TASK_QUEUE_ENV,
    TemporalSettings,
    default_task_queue,
)

if TYPE_CHECKING:
    import temporalio.client

#: Environment variable: seconds a step that no worker serves is offered again
#: before it fails (see ``Client``).
UNSERVED_STEP_TIMEOUT_ENV = "QWIT_UNSERVED_STEP_TIMEOUT"
DEFAULT_UNSERVED_STEP_TIMEOUT = 60.0


def _unserved_step_timeout(value: float | None) -> float:
    if value is None:
        raw = os.environ.get(UNSERVED_STEP_TIMEOUT_ENV)
        value = float(raw) if raw else DEFAULT_UNSERVED_STEP_TIMEOUT
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"unserved_step_timeout must be seconds >= 0, not {value!r}")
    return float(value)


def _default_backend() -> Backend:
    return temporal


def _check_backends(plan: FlowNode, engine: str) -> None:
    for path, node, _ in walk(plan):
        if not isinstance(node, StepNode | FlowNode):
            continue  # a parallel block or a map: its steps say
        if node.backend is not None and node.backend != engine:
            raise FlowDefinitionError(
                f"flow {plan.name!r}, path {path}: {node.kind} {node.name!r} names backend "
                f"{node.backend!r}, but its flow runs on {engine!r}; an engine runs a flow's "
                "steps itself"
            )


#: The longest id a flow may be given, in UTF-8 bytes (the ids of its
#: sub-flows, ``<id>/~<path>``, must still fit Temporal's 1,000).
MAX_ID_BYTES = 500
#: How many of the flows it started a client remembers the engine of.
STARTED_KEPT = 10_000


def can_be_an_id(flow_id: object) -> bool:
    """Whether some flow (or sub-flow) may have the id ``flow_id``: a
    non-empty string without a control character or a lone surrogate."""
    return isinstance(flow_id, str) and bool(flow_id) and unkeepable_char(flow_id) is None


class _NoFlow(FlowHandle):
    """The handle of an id no flow can have: every call raises FlowNotFound."""

    def __init__(self, flow_id: object, engine: str) -> None:
        self.id = str(flow_id)
        self.engine = engine

    def _missing(self) -> FlowNotFound:
        return FlowNotFound(f"no flow has the id {self.id!r} (no flow can)")

    async def result(self) -> dict[str, Any]:
        raise self._missing()

    async def cancel(self, rollback: bool = True) -> None:
        raise self._missing()

    async def flow_state(self, flow_id: str) -> FlowState:
        raise self._missing()

    async def send_decision(self, flow_id: str, decision: Decision) -> None:
        raise self._missing()


class Client:
    """Starts flows and finds them again, each on its Flow's engine.

    Create it with ``await qwit.connect()``. One client serves every engine:
    ``start`` routes a flow by its ``backend=`` (default ``qwit.temporal``),
    and connects to an engine only when a flow first needs it.

    Attributes:
        backend: When set, the engine of every flow this client starts,
            whatever its Flow names (tests run production flows on
            ``qwit.local`` this way).
        unserved_step_timeout: Seconds a step that the worker which took it
            does not serve is offered to the task queue again, so that another
            worker may run it (during a rolling deploy, or with workers that
            serve different modules), before the step fails with
            ``StepNotRegistered``. Default ``$QWIT_UNSERVED_STEP_TIMEOUT`` or
            60. Fixed in each flow's plan when it starts.

    Each engine's own settings (for Temporal: the task queue, the connection)
    are an object of that engine's, passed in ``settings`` and handed to the
    engine alone; ``task_queue``, ``temporal_client`` and ``temporal_options``
    are a shorthand for ``qwit.temporal.TemporalSettings``.
    """

    def __init__(
        self,
        *,
        backend: Backend | None = None,
        unserved_step_timeout: float | None = None,
        settings: Iterable[Any] = (),
        task_queue: str | None = None,
        temporal_client: temporalio.client.Client | None = None,
        temporal_options: dict[str, Any] | None = None,
        tracing: bool | None = None,
    ) -> None:
        self.unserved_step_timeout = _unserved_step_timeout(unserved_step_timeout)
        self.tracing = tracing_from_env() if tracing is None else tracing
        """Whether flows this client starts are traced (and, on Temporal, the
        caller's span continues into them); see ``connect``."""
        if self.tracing:
            require_opentelemetry()
        self.backend = backend
        self._settings: dict[str, Any] = {
            "temporal": TemporalSettings(
                task_queue=task_queue or default_task_queue(),
                temporal_client=temporal_client,
                connect_options=dict(temporal_options or {}),
            )
        }
        for each in settings:
            self._settings[each.backend] = each
        self._engines: dict[str, Engine] = {}
        #: The engine of each flow this client started (or redrove), newest
        #: last, so that ``get_handle`` and ``redrive`` find it by its id alone.
        self._started: OrderedDict[str, Backend] = OrderedDict()

    def settings(self, backend: str) -> Any:
        """The settings this client holds for the engine named ``backend``
        (None if it holds none): what that engine is created with."""
        return self._settings.get(backend)

    @property
    def task_queue(self) -> str:
        """The Temporal task queue flows are started on (``TemporalSettings``)."""
        task_queue: str = self._settings["temporal"].task_queue
        return task_queue

    def engine(self, backend: Backend | None = None) -> Engine:
        """The engine for ``backend`` (default: Temporal), created on first use."""
        backend = backend or _default_backend()
        engine = self._engines.get(backend.name)
        if engine is None:
            engine = self._engines[backend.name] = backend.create_engine(self)
        return engine

    def _backend_of(self, flow: type[Flow]) -> Backend:
        """The engine ``start`` runs ``flow`` on."""
        return self.backend or flow.backend or _default_backend()

    def prepare(self, flow: type[Flow], args: Any = None, *, id: str | None = None) -> FlowInput:
        """Compile ``flow`` and check ``args``, as ``start`` does, without starting.

        Raises:
            FlowDefinitionError: the flow is defined wrongly, or a Step (or
                sub-flow) of it names an engine other than the one it will
                run on (this client's ``backend``, else the flow's own).
            ArgumentsError: the args are not a JSON object or are too big.
        """
        plan = compile_flow(flow)
        # Checked against the engine ``start`` runs it on: this client's, if it
        # has one, else the flow's own.
        _check_backends(plan, self._backend_of(flow).name)
        try:
            clean = as_args(args, "a flow's args")
        except NotJSON as exc:
            field = f" field {exc.field!r}:" if exc.field else ""
            raise ArgumentsError(f"flow {plan.name!r}, args:{field} {exc.problem}") from None
        if id is not None and (not isinstance(id, str) or not id.strip()):
            raise ArgumentsError(f"flow {plan.name!r}: id must be a non-empty string, not {id!r}")
        if id is not None and len(id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise ArgumentsError(
                f"flow {plan.name!r}: id {id[:40]!r}... is longer than {MAX_ID_BYTES} bytes "
                "(UTF-8): Temporal holds ids up to 1,000, and a sub-flow's adds its path"
            )
        if id is not None and unkeepable_char(id) is not None:
            raise ArgumentsError(
                f"flow {plan.name!r}: id {id!r} holds a control character or a lone "
                "surrogate, which not every engine can keep"
            )
        if id is not None and SUBFLOW_MARK in id:
            raise ArgumentsError(
                f"flow {plan.name!r}: id {id!r} contains {SUBFLOW_MARK!r}, which QWIT keeps "
                "for the ids of sub-flows (so that no flow's id can collide with one)"
            )
        flow_id = id or f"{plan.name}-{uuid.uuid4().hex}"
        # Fixed here, once: every idempotency key of this execution derives from
        # it, so a later flow that reuses the id gets keys of its own.
        return FlowInput(
            flow=plan,
            args=clean,
            root_id=flow_id,
            unserved_step_timeout=self.unserved_step_timeout,
            execution=secrets.token_urlsafe(16),
        )

    async def start(
        self, flow: type[Flow], args: Any = None, *, id: str | None = None
    ) -> FlowHandle:
        """Start a flow and return its handle at once.

        Args:
            flow: The Flow class to run.
            args: The flow's input: a dict (or pydantic model) of JSON values.
            id: The flow's id (default: ``<FlowName>-<uuid>``). Starting a
                flow with the id of a running (or waiting) one fails; the id
                of an ended one starts a new execution, with fresh
                idempotency keys.

        Raises:
            FlowDefinitionError: the flow is defined wrongly.
            ArgumentsError: the args can't be sent, or a flow with this id
                is running.
        """
        input = self.prepare(flow, args, id=id)
        backend = self._backend_of(flow)
        handle = await self.engine(backend).start(flow, input)
        self._remember(handle.id, backend)
        return handle

    def _remember(self, flow_id: str, backend: Backend) -> None:
        """Note the engine a flow runs on (the ``STARTED_KEPT`` newest)."""
        self._started.pop(flow_id, None)
        self._started[flow_id] = backend
        if len(self._started) > STARTED_KEPT:
            self._started.popitem(last=False)

    def _backend_for(self, flow_id: str, backend: Backend | None) -> Backend:
        """The engine of the flow ``flow_id``: ``backend`` if given, else this
        client's, else the one this client started it on (a sub-flow's:
        that of its root, ``<root id>/~<path>``), else Temporal."""
        root = flow_id.split(SUBFLOW_MARK, 1)[0]
        return backend or self.backend or self._started.get(root) or _default_backend()

    async def run(
        self, flow: type[Flow], args: Any = None, *, id: str | None = None
    ) -> dict[str, Any]:
        """Start a flow and wait for its result (see ``FlowHandle.result``)."""
        handle = await self.start(flow, args, id=id)
        return await handle.result()

    async def redrive(
        self,
        flow_id: str,
        from_step: str | None = None,
        args: Any = None,
        *,
        backend: Backend | None = None,
    ) -> FlowHandle:
        """Run an ended flow again, as a new run of the same flow id linked to
        the one it redrives (whose history stays as it is).

        - An aborted flow (or one cancelled with ``rollback=False``) resumes
          from the step it stopped at, or from ``from_step``, reusing the
          outputs of the steps before it (they don't run again); what the
          earlier run did at and after that step is undone first, newest
          first, so nothing is applied twice. A later rollback undoes the
          earlier run's steps too, each once.
        - A flow whose rollback failed (``compensation_failed``) finishes it:
          the undos that failed, then what was left; it ends
          ``FlowRolledBack`` once all are undone.
        - A rolled-back (or cancelled) flow starts again from its start.

        Every new execution gets fresh idempotency keys; an undo keeps the key
        of the forward it undoes.

        Args:
            flow_id: The flow's id.
            from_step: The path (``state()``'s ``steps[i].path``) to resume
                from, at or before the step the flow stopped at; a step of a
                parallel block or a map resumes the block as a whole. Without
                it, a flow that stopped in a block or a map keeps the
                branches or elements that completed there, and runs the
                others again.
            args: Merged into the flow's args (over the reused outputs).

        Returns:
            The handle of the new run.

        Raises:
            ReactionError: the flow is running or waiting (or completed),
                ``from_step`` does not exist, was undone or lies after the
                step the flow stopped at, or the engine can't redrive.
            FlowNotFound: no flow has this id.
        """
        if not can_be_an_id(flow_id):
            raise FlowNotFound(f"no flow has the id {flow_id!r} (no flow can)")
        backend = self._backend_for(flow_id, backend)
        engine = self.engine(backend)
        handle = await engine.restart(await redrive_input(engine, flow_id, from_step, args))
        self._remember(handle.id, backend)
        return handle

    def get_handle(self, flow_id: str, *, backend: Backend | None = None) -> FlowHandle:
        """A handle for a flow started earlier.

        Its engine is ``backend`` if given, else the client's ``backend``,
        else the engine this client started (or redrove) that flow on, else
        Temporal. For an id no flow can have, a handle whose every call
        raises ``FlowNotFound``.
        """
        if not can_be_an_id(flow_id):
            engine = self.engine(backend or self.backend)
            return _NoFlow(flow_id, engine.name)
        return self.engine(self._backend_for(flow_id, backend)).get_handle(flow_id)

    async def close(self) -> None:
        """Close every engine this client opened."""
        for engine in list(self._engines.values()):
            await engine.close()
        self._engines.clear()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    *,
    task_queue: str | None = None,
    temporal_client: temporalio.client.Client | None = None,
    backend: Backend | None = None,
    unserved_step_timeout: float | None = None,
    result_polls: int | None = None,
    unavailable_timeout: float | None = None,
    tracing: bool | None = None,
    settings: Iterable[Any] = (),
    **temporal_options: Any,
) -> Client:
    """A client for starting and steering flows.

    Temporal settings come from Temporal's own environment config
    (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``, ``TEMPORAL_API_KEY``, the TLS
    variables, ``TEMPORAL_PROFILE`` and its config file), with
    ``localhost:7233`` when no address is set. The connection is made when a
    Temporal flow is first started or looked up.

    Args:
        task_queue: Task queue of the workers (default ``$QWIT_TASK_QUEUE`` or
            ``qwit``).
        temporal_client: An existing ``temporalio`` client to use as is (it
            should have ``qwit.temporal.QwitPlugin()`` among its plugins).
        backend: Run every flow on this engine, whatever its Flow names
            (e.g. ``qwit.local`` in unit tests).
        unserved_step_timeout: Seconds a step no worker serves is offered
            again before it fails (default ``$QWIT_UNSERVED_STEP_TIMEOUT`` or 60).
        result_polls: Long polls for flows' ends this client holds at once
            on Temporal (default ``$QWIT_RESULT_POLLS`` or 100).
        unavailable_timeout: Seconds ``result()`` waits for a Temporal that
            does not answer (default ``$QWIT_UNAVAILABLE_TIMEOUT`` or 300).
        tracing: OpenTelemetry tracing (default ``$QWIT_TRACING``): on
            Temporal, a flow started inside a span continues its trace (the
            workers trace with ``QwitPlugin(tracing=True)``), and so on
            ``qwit.postgres`` (its workers trace with
            ``PostgresWorker(tracing=True)``); on ``qwit.local``, its flows
            emit their spans. Needs ``qwit[tracing]``.
        settings: Other engines' settings, each handed to its engine alone
            (e.g. ``qwit.postgres.PostgresSettings(dsn)``; without it that
            engine reads ``$QWIT_POSTGRES_DSN``).
        **temporal_options: Overrides for ``temporalio.client.Client.connect``,
            e.g. ``target_host="temporal:7233"``, ``namespace="orders"``.
    """
    temporal_settings = TemporalSettings(
        task_queue=task_queue or default_task_queue(),
        temporal_client=temporal_client,
        connect_options=temporal_options,
        result_polls=result_polls,
        unavailable_timeout=unavailable_timeout,
    )
    return Client(
        backend=backend,
        unserved_step_timeout=unserved_step_timeout,
        settings=[temporal_settings, *settings],
        tracing=tracing,
    )


__all__ = [
    "DEFAULT_TASK_QUEUE",
    "TASK_QUEUE_ENV",
    "Client",
    "connect",
    "default_task_queue",
]
