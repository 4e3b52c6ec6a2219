"""OpenTelemetry spans of flows, on a real Temporal server and on qwit.local:
the span tree of a rolled-back flow with a sub-flow, asserted whole, under the
caller's own span; on Temporal with a worker that replays every workflow task
(no cache), so that a span emitted again by a replay would show."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import qwit
from qwit.temporal import DevServer, QwitPlugin, connect_temporal, create_worker, tracer_provider
from tests.test_conformance import new_ledger
from tests.test_temporal_subflows import Outer

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    tracer_provider(SimpleSpanProcessor(EXPORTER))
    return EXPORTER


#: What a rolled-back Outer (its sub-flow's second step failing after its
#: effect) shows: (span name, qwit.path, qwit.outcome), children indented.
ROLLED_BACK = """\
request
  flow Outer . rolled_back
    step_forward O1 1 done
    flow Inner 2 rolled_back
      step_forward I1 2.1 done
      step_forward I2 2.2 failed
      rollback 2 .
        step_back I2 2.2 done
        step_back I1 2.1 done
    rollback . .
      step_back O1 1 done"""


def tree(spans: list[ReadableSpan], root: ReadableSpan) -> str:
    """The spans under ``root`` (in the order they started), one per line."""
    children: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        if span.parent is not None:
            children.setdefault(span.parent.span_id, []).append(span)

    def qwit_of(span: ReadableSpan) -> list[ReadableSpan]:
        """Children, looking through spans that are not QWIT's (temporalio's)."""
        found = []
        for child in sorted(
            children.get(span.context.span_id, []), key=lambda s: s.start_time or 0
        ):
            if child.name.split(" ")[0] in ("flow", "rollback", "step_forward", "step_back"):
                found.append(child)
            else:
                found += qwit_of(child)
        return found

    def line(span: ReadableSpan, depth: int) -> list[str]:
        attrs = span.attributes or {}
        text = span.name
        if span is not root:
            text += f" {attrs.get('qwit.path', '.')} {attrs.get('qwit.outcome', '.')}"
        return ["  " * depth + text] + [
            row for child in qwit_of(span) for row in line(child, depth + 1)
        ]

    return "\n".join(line(root, 0))


async def run_rolled_back(client: qwit.Client) -> int:
    """Start a rolled-back Outer inside a caller's span; return that span's id."""
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request") as request:
        handle = await client.start(
            Outer, {"ledger": new_ledger(), "fail": "I2", "fail_after": True}
        )
    with pytest.raises(qwit.FlowRolledBack):
        await handle.result()
    span_id: int = request.get_span_context().span_id
    return span_id


def of_trace(
    exporter: InMemorySpanExporter, request: int
) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The caller's span, and every span of its trace."""
    finished = exporter.get_finished_spans()
    root = next(s for s in finished if s.context.span_id == request)
    return root, [s for s in finished if s.context.trace_id == root.context.trace_id]


async def test_temporal_spans_of_a_rolled_back_flow(
    spans: InMemorySpanExporter, dev_server: DevServer
):
    temporal = await connect_temporal(
        target_host=dev_server.address, plugins=[QwitPlugin(tracing=True)]
    )
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal, task_queue=queue)
    # no workflow cache: every workflow task replays the flow from its start
    async with create_worker(temporal, Outer, task_queue=queue, max_cached_workflows=0):
        request = await run_rolled_back(client)
    root, got = of_trace(spans, request)
    print("\n" + tree(got, root))
    assert tree(got, root) == ROLLED_BACK
    step = next(s for s in got if s.name == "step_forward I2")
    expected = {
        "qwit.flow": "Inner",
        "qwit.step": "I2",
        "qwit.path": "2.2",
        "qwit.direction": "step_forward",
        "qwit.attempt": 1,
        "qwit.outcome": "failed",
    }
    assert {k: (step.attributes or {}).get(k) for k in expected} == expected
    assert step.status.status_code == trace.StatusCode.ERROR
    assert [e.name for e in step.events] == ["exception"]
    flow = next(s for s in got if s.name == "flow Outer")
    assert (step.attributes or {})["qwit.flow_id"] == (flow.attributes or {})["qwit.flow_id"]


async def test_local_spans_are_the_same(spans: InMemorySpanExporter):
    client = await qwit.connect(backend=qwit.local, tracing=True)
    request = await run_rolled_back(client)
    root, got = of_trace(spans, request)
    assert tree(got, root) == ROLLED_BACK


async def test_no_spans_unless_asked(spans: InMemorySpanExporter):
    client = await qwit.connect(backend=qwit.local, tracing=False)
    request = await run_rolled_back(client)
    assert [s.name for s in of_trace(spans, request)[1]] == ["request"]


def test_a_provider_that_is_not_replay_safe_is_refused(monkeypatch: pytest.MonkeyPatch):
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setattr(trace, "get_tracer_provider", lambda: TracerProvider())
    with pytest.raises(qwit.QwitError, match="not replay-safe"):
        tracer_provider()


async def test_postgres_spans_are_the_same(spans: InMemorySpanExporter, postgres_dsn: str):
    from qwit.postgres import PostgresSettings, PostgresWorker, prepare

    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)], tracing=True
    )
    async with PostgresWorker(postgres_dsn, Outer, tracing=True, poll_interval=0.2):
        request = await run_rolled_back(client)
    await client.close()
    root, got = of_trace(spans, request)
    print("\n" + tree(got, root))
    assert tree(got, root) == ROLLED_BACK


async def test_a_postgres_flow_replayed_by_a_new_worker_emits_no_span_again(
    spans: InMemorySpanExporter, postgres_dsn: str
):
    """The worker driving a flow stops mid-flow; the next one replays its
    journal: the spans of what ran before are not emitted again."""
    import asyncio

    from qwit.postgres import PostgresSettings, PostgresWorker, prepare
    from tests import ledger
    from tests.test_postgres import GATES, PgOrder

    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)], tracing=True
    )
    run = new_ledger()
    GATES[run] = asyncio.Event()
    tracer = trace.get_tracer("tests")
    # (a worker stopped at once: the step cut off as by a crash)
    options: dict[str, Any] = {
        "tracing": True,
        "poll_interval": 0.2,
        "graceful_shutdown_timeout": 0,
    }
    with tracer.start_as_current_span("request") as request:
        handle = await client.start(PgOrder, {"ledger": run})
    async with PostgresWorker(postgres_dsn, PgOrder, **options):
        await ledger.wait_for_mark(run, "started", "pg.Gate")
    GATES[run].set()
    async with PostgresWorker(postgres_dsn, PgOrder, **options):
        await asyncio.wait_for(handle.result(), 60)
    await client.close()
    _, got = of_trace(spans, request.get_span_context().span_id)
    names = sorted(s.name for s in got)
    print(names)
    assert names.count("step_forward pg.A") == 1
    assert names.count("flow pg.order") == 1
    assert names.count("step_forward pg.B") == 1


class Traced(qwit.Step, name="traced.inside"):
    """Opens a span of its own, as an instrumented HTTP client would."""

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        with trace.get_tracer("tests").start_as_current_span("inside"):
            return {"traced": True}


class TracedFlow(qwit.Flow, name="traced.flow"):
    def build_flow(self) -> None:
        self.step(Traced)


@pytest.mark.parametrize("inline", [True, False], ids=["taken", "queued"])
async def test_a_postgres_steps_own_spans_nest_in_its_span(
    spans: InMemorySpanExporter, postgres_dsn: str, inline: bool
):
    from qwit.postgres import PostgresSettings, PostgresWorker, prepare

    await prepare(postgres_dsn)
    client = await qwit.connect(
        backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)], tracing=True
    )
    tracer = trace.get_tracer("tests")
    async with PostgresWorker(
        postgres_dsn, TracedFlow, tracing=True, inline=inline, poll_interval=0.2
    ):
        with tracer.start_as_current_span("request") as request:
            handle = await client.start(TracedFlow, {})
        await handle.result()
    await client.close()
    _, got = of_trace(spans, request.get_span_context().span_id)
    by_name = {s.name: s for s in got}
    inside, step = by_name["inside"], by_name["step_forward traced.inside"]
    assert inside.parent is not None and inside.parent.span_id == step.context.span_id


@pytest.mark.parametrize("backend", ["local", "postgres"])
def test_tracing_asked_for_without_opentelemetry_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, backend: str, tmp_path: Any
):
    # QWIT_TRACING=1 without qwit[tracing]: one line that says what to
    # install, exit 1, as for the other extras (it was a traceback).
    import sys

    from click.testing import CliRunner

    from qwit._cli import cli

    ARGS = '{"order_id": "1", "sku": "A-1", "card": "4242", "cents": 2599}'
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # (not installed)
    monkeypatch.setenv("QWIT_TRACING", "1")
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("QWIT_POSTGRES_DSN", raising=False)
    result = CliRunner().invoke(
        cli,
        ["run", "samples.order.flows:PlaceOrder", "--args", ARGS, "--backend", backend],
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert lines[-1] == (
        "qwit: tracing needs OpenTelemetry: pip install 'qwit[tracing]' (or unset QWIT_TRACING)"
    ), result.output
    assert "Traceback" not in result.output
