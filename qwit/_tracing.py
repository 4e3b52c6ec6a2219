"""OpenTelemetry spans of flows and steps, for engines that trace.

The saga interpreter opens the spans (so every engine emits the same ones):
one per flow (a sub-flow's nests in its parent's), one per step direction
(``step_forward``, ``step_back``, ``step_fallback``, a final step's
``final``), one per parallel block or map around its members, and one per
rollback around its undos. Attributes: ``qwit.flow``, ``qwit.flow_id``,
``qwit.step``, ``qwit.path``, ``qwit.direction``, ``qwit.attempt``,
``qwit.outcome``; a failure sets the span's status to error and records the
error as an ``exception`` event.

Nothing here runs, nor is OpenTelemetry imported, unless the flow's runtime
says it traces: on Temporal, a worker set up with ``QwitPlugin(tracing=True)``
(or ``QWIT_TRACING=1``), whose spans temporalio's own OpenTelemetry
integration keeps replay-safe; on ``qwit.local``, a client connected with
``tracing=True`` (or ``QWIT_TRACING=1``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ._errors import ErrorInfo, QwitError

#: Environment variable: "1" (or "true") turns tracing on for ``qwit-worker``,
#: ``qwit run``, ``qwit.connect()`` and ``QwitPlugin``.
TRACING_ENV = "QWIT_TRACING"


def tracing_from_env() -> bool:
    """Whether ``QWIT_TRACING`` asks for tracing."""
    return os.environ.get(TRACING_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class TracingUnavailable(QwitError):
    """Tracing is asked for and OpenTelemetry is not installed."""


def require_opentelemetry() -> None:
    """Raises:
    TracingUnavailable: tracing is asked for and OpenTelemetry is not installed.
    """
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise TracingUnavailable(
            f"tracing needs OpenTelemetry: pip install 'qwit[tracing]' (or unset {TRACING_ENV})"
        ) from None


class Span:
    """One span, or nothing when tracing is off."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def set(self, **attributes: Any) -> None:
        """Set ``qwit.<name>`` attributes (None values are left out)."""
        if self._span is not None:
            self._span.set_attributes(_attributes(attributes))

    def fail(self, error: ErrorInfo | None, outcome: str = "failed") -> None:
        """Mark the span failed, with the error as an ``exception`` event."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("qwit.outcome", outcome)
        description = error.describe() if error is not None else outcome
        self._span.set_status(Status(StatusCode.ERROR, description))
        if error is not None:
            self._span.add_event(
                "exception",
                {"exception.type": error.type, "exception.message": error.message},
            )


_OFF = Span()


class _Off(contextlib.AbstractContextManager[Span]):
    """The block of a span when tracing is off: one object for every block
    (a flow's steps each open one, on every worker)."""

    def __enter__(self) -> Span:
        return _OFF

    def __exit__(self, *exc: object) -> None:
        return None


OFF = _Off()


def span(on: bool, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Span]:
    """A span named ``name`` around the block (the current one inside it),
    with ``qwit.<name>`` attributes; a do-nothing one unless ``on``."""
    return _span(name, attributes) if on else OFF


@contextlib.contextmanager
def _span(name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    from opentelemetry import trace

    tracer = trace.get_tracer("qwit")
    with tracer.start_as_current_span(
        name,
        attributes=_attributes(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield Span(current)


def _attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    return {f"qwit.{k}": v for k, v in attributes.items() if v is not None}


def tracer_provider(*processors: Any) -> Any:
    """Install a replay-safe global OpenTelemetry tracer provider (temporalio's
    ``create_tracer_provider``), or reuse the one installed, adding
    ``processors`` (span processors) to it; returns it.

    With no processor given and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, spans are exported in batches
    over OTLP/HTTP there. The service name is ``OTEL_SERVICE_NAME`` (default
    ``qwit``). ``qwit-worker`` and ``qwit run`` call it when tracing is on.

    Raises:
        QwitError: OpenTelemetry is not installed, or another (not
            replay-safe) global provider is installed already.
    """
    require_opentelemetry()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from temporalio.contrib.opentelemetry import ReplaySafeTracerProvider, create_tracer_provider

    current = trace.get_tracer_provider()
    if isinstance(current, ReplaySafeTracerProvider):
        provider = current
    elif isinstance(current, TracerProvider):
        raise QwitError(
            "a global OpenTelemetry tracer provider is installed already, and is not "
            "replay-safe: create it with temporalio.contrib.opentelemetry."
            "create_tracer_provider() (workflows replay; their spans must not repeat)"
        )
    else:
        name = os.environ.get("OTEL_SERVICE_NAME") or "qwit"
        provider = create_tracer_provider(resource=Resource.create({"service.name": name}))
        trace.set_tracer_provider(provider)
    if not processors and (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise QwitError(
                "exporting spans over OTLP needs its exporter: pip install 'qwit[tracing]'"
            ) from None
        processors = (BatchSpanProcessor(OTLPSpanExporter()),)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def current_context() -> dict[str, str] | None:
    """The current span's context as W3C trace-context headers (None: no
    span is current), for a flow started elsewhere to continue."""
    from opentelemetry import propagate, trace

    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def continued(carrier: dict[str, str] | None) -> Iterator[None]:
    """Make the context of ``carrier`` (``current_context``) current in the
    block: the spans opened there are its children."""
    if not carrier:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)
