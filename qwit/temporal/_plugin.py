"""``QwitPlugin``: QWIT's integration with a Temporal client, worker and replayer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import ModuleType
from typing import Any, Literal

from temporalio.activity import _Definition as _ActivityDefinition
from temporalio.common import MetricMeter
from temporalio.converter import DataConverter
from temporalio.plugin import SimplePlugin
from temporalio.runtime import Runtime
from temporalio.worker import Interceptor, ReplayerConfig, WorkerConfig, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from .._flow import Flow
from .._runner import Registry
from .._step import Step
from .._tracing import tracer_provider, tracing_from_env
from ._activities import step_activities, unregistered_step
from ._converter import QwitPayloadConverter
from ._encryption import EncryptionCodec, encrypted_converter
from ._workflow import NoEagerInterceptor, QwitWorkflow, TracedInterceptor

#: Modules the workflow sandbox shares with the worker instead of re-importing
#: them for every run: QWIT's own (pure, deterministic) and pydantic's.
PASSTHROUGH_MODULES = ("qwit", "pydantic", "pydantic_core", "annotated_types")
#: Longest a step's heartbeat waits to be sent. Temporal tells a running
#: activity of a cancel only in a heartbeat's response, and the SDK holds
#: heartbeats back for up to 30 s (60 s at most) by default: QWIT's steps
#: heartbeat every second while they run, sent at most this often.
HEARTBEAT_THROTTLE = timedelta(seconds=2)


def _data_converter(
    encryption: EncryptionCodec | None,
) -> Callable[[DataConverter | None], DataConverter]:
    def convert(existing: DataConverter | None) -> DataConverter:
        base = existing or DataConverter.default
        if base.payload_converter_class is not QwitPayloadConverter:
            # Keep the user's codec and failure converter; only JSON handling changes.
            base = dataclasses.replace(base, payload_converter_class=QwitPayloadConverter)
        return encrypted_converter(base, encryption)

    return convert


def _workflow_runner(tracing: bool) -> Callable[[WorkflowRunner | None], WorkflowRunner]:
    modules = (*PASSTHROUGH_MODULES, "opentelemetry") if tracing else PASSTHROUGH_MODULES

    def runner(existing: WorkflowRunner | None) -> WorkflowRunner:
        if existing is None:
            return SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*modules)
            )
        if isinstance(existing, SandboxedWorkflowRunner):
            return dataclasses.replace(
                existing, restrictions=existing.restrictions.with_passthrough_modules(*modules)
            )
        return existing

    return runner


def _tracing_interceptors() -> list[Any]:
    """temporalio's OpenTelemetry interceptor (spans of client calls and
    activities, the caller's context carried into flows, replay-safe spans in
    workflows), and the mark that makes flows open QWIT's own spans. A
    replay-safe global tracer provider is installed if none is."""
    tracer_provider()
    from temporalio.contrib.opentelemetry import OpenTelemetryInterceptor

    return [OpenTelemetryInterceptor(), TracedInterceptor()]


def _add_workflow(existing: Sequence[type] | None) -> Sequence[type]:
    workflows = list(existing or [])
    if QwitWorkflow not in workflows:
        workflows.append(QwitWorkflow)
    return workflows


def _activity_key(fn: Callable[..., Any]) -> str | None:
    defn = _ActivityDefinition.from_callable(fn)
    return defn.name if defn else None


def _add_activities(
    registry: Registry,
) -> Callable[[Sequence[Callable[..., Any]] | None], Sequence[Callable[..., Any]]]:
    def add(existing: Sequence[Callable[..., Any]] | None) -> Sequence[Callable[..., Any]]:
        activities = list(existing or [])
        present = {_activity_key(fn) for fn in activities}
        for fn in [*step_activities(registry), unregistered_step]:
            key = _activity_key(fn)
            if key not in present:
                activities.append(fn)
                present.add(key)
        return activities

    return add


def _metered(config: WorkerConfig) -> bool:
    """Whether the worker's runtime exports metrics (else it has temporalio's
    no-op meter, and recording QWIT's would be wasted work). The runtime is
    found as the worker finds it: the one its client connected with; when in
    doubt, it does."""
    client = config.get("client")
    if client is None:
        return True
    service = client.service_client
    bridge = getattr(service, "worker_service_client", service)
    runtime = getattr(bridge, "_runtime", None) or getattr(bridge.config, "runtime", None)
    if runtime is None:
        try:
            runtime = Runtime.default()
        except Exception:  # (no default runtime allowed: the worker says so itself)
            return True
    return bool(runtime.metric_meter is not MetricMeter.noop)


def _unmetered(interceptors: Sequence[Interceptor] | None) -> list[Interceptor]:
    # (a subclass of a user's own is left as it is: it records)
    return [
        NoEagerInterceptor(metered=False) if type(i) is NoEagerInterceptor else i
        for i in interceptors or ()
    ]


class QwitPlugin(SimplePlugin):
    """Sets a Temporal client, worker or replayer up for QWIT.

    It installs the pydantic data converter (keeping any payload codec), the
    generic flow workflow, one activity per direction of every registered step
    (plus one that fails unknown steps at once), and passes QWIT's modules
    through the workflow sandbox. Applying it twice is harmless.

    With encryption (``QWIT_ENCRYPTION_KEYS`` or ``QWIT_ENCRYPTION_KEY_FILE``
    set, or ``encryption=`` given), every payload is encrypted after any
    codec already set, and failure messages and stack traces travel
    encrypted too.

    Args:
        *members: Step classes, Flow classes (their steps are registered) or
            modules (every Step and Flow they define) this worker will run.
        encryption: The payload encryption codec. By default it comes from the
            environment (none if neither variable is set); ``False`` turns it
            off whatever the environment says.
        tracing: OpenTelemetry tracing (default: ``QWIT_TRACING``): a span
            per flow, per step direction, per parallel block or map and per
            rollback, with ``qwit.*`` attributes, built on temporalio's own
            OpenTelemetry integration (replays emit nothing twice); on a
            client, a flow started inside a span continues its trace. A
            worker's global tracer provider must be replay-safe
            (``qwit.temporal.tracer_provider()`` or temporalio's
            ``create_tracer_provider``). Needs ``qwit[tracing]``.

    Raises:
        EncryptionError: The environment's keys are bad, or encryption is
            configured and ``cryptography`` is not installed.

    Example:
        >>> worker = temporalio.worker.Worker(
        ...     client, task_queue="qwit", plugins=[QwitPlugin(my_app.flows)]
        ... )
    """

    def __init__(
        self,
        *members: type[Step] | type[Flow] | ModuleType,
        encryption: EncryptionCodec | Literal[False] | None = None,
        tracing: bool | None = None,
    ) -> None:
        self.registry = Registry(*members)
        self.tracing = tracing_from_env() if tracing is None else tracing
        # Read once, here, so bad keys fail when a client or worker is set up.
        self.encryption = EncryptionCodec.from_env() if encryption is None else encryption or None
        super().__init__(
            "qwit",
            data_converter=_data_converter(self.encryption),
            activities=_add_activities(self.registry),
            workflows=_add_workflow,
            workflow_runner=_workflow_runner(self.tracing),
            interceptors=[NoEagerInterceptor(), *(_tracing_interceptors() if self.tracing else [])],
        )

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        """Set the worker up for QWIT (see the class), and cap its heartbeat
        throttle at ``HEARTBEAT_THROTTLE`` so that a cancel reaches a step
        within seconds."""
        config = super().configure_worker(config)
        if not _metered(config):
            config["interceptors"] = _unmetered(config.get("interceptors"))
        current = config.get("default_heartbeat_throttle_interval")
        if current is None or current > HEARTBEAT_THROTTLE:
            config["default_heartbeat_throttle_interval"] = HEARTBEAT_THROTTLE
        current = config.get("max_heartbeat_throttle_interval")
        if current is None or current > HEARTBEAT_THROTTLE:
            config["max_heartbeat_throttle_interval"] = HEARTBEAT_THROTTLE
        return config

    def configure_replayer(self, config: ReplayerConfig) -> ReplayerConfig:
        """Set the replayer up for QWIT (see the class); a replay records no
        metrics, so its flows skip recording them."""
        config = super().configure_replayer(config)
        config["interceptors"] = _unmetered(config.get("interceptors"))
        return config
