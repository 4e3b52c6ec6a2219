"""QWIT's metrics on a real Temporal worker: scraped from its Prometheus
endpoint (``qwit-worker --metrics-address``) after a rolled-back flow, a
completed one and one waiting for an operator."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from click.testing import CliRunner

import qwit
from qwit.temporal import (
    DevServer,
    connect_temporal,
    count_waiting,
    create_worker,
    metrics_runtime,
)
from qwit.testing import wait_for_status
from tests.test_conformance import new_ledger
from tests.test_temporal_reactions import failing_flow
from tests.test_temporal_subflows import Outer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


LINE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def value(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = LINE.match(line)
        if match is None or match["name"] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


async def three_flows(
    client: qwit.Client, waits: type[qwit.Flow], scrape_text: Callable[[], Awaitable[str]]
) -> tuple[str, qwit.FlowHandle]:
    """Run a rolled-back Outer and a completed one, start a flow that waits
    for an operator, and scrape once the waiting gauge counts it: the text,
    and the waiting flow (to cancel)."""
    handle = await client.start(Outer, {"ledger": new_ledger(), "fail": "I2", "fail_after": True})
    with pytest.raises(qwit.FlowRolledBack):
        await handle.result()
    await client.run(Outer, {"ledger": new_ledger()})
    waiting = await client.start(
        waits, {"ledger": new_ledger(), "fail": "react.F", "fail_after": True}
    )
    await wait_for_status(waiting, "waiting", timeout=30)
    for _ in range(150):
        text = await scrape_text()
        if value(text, "qwit_flows_waiting") >= 1:
            return text, waiting
        await asyncio.sleep(0.2)
    raise AssertionError("the waiting flow was never counted")


def check_three_flows(text: str) -> None:
    """What ``three_flows`` shows, on every engine that records metrics."""
    assert value(text, "qwit_flows_started", flow="Outer") == 2
    assert value(text, "qwit_flows_ended", flow="Outer", outcome="rolled_back") == 1
    assert value(text, "qwit_flows_ended", flow="Outer", outcome="completed") == 1
    assert value(text, "qwit_flows_ended", flow="Inner", outcome="rolled_back") == 1
    # the rolled-back one: O1, I1 done, I2 failed; then I2, I1, O1 undone
    assert value(text, "qwit_steps", step="I2", direction="step_forward", outcome="failed") == 1
    assert value(text, "qwit_steps", step="O1", direction="step_forward", outcome="done") == 2
    assert value(text, "qwit_steps", direction="step_back", outcome="done") == 3
    assert value(text, "qwit_compensations", outcome="compensated") == 3
    assert value(text, "qwit_compensations", step="O1", outcome="compensated") == 1
    assert value(text, "qwit_step_seconds_count", step="O1", direction="step_forward") == 2
    # buckets in seconds: a step of this test takes well under 10 s
    assert (
        value(text, "qwit_step_seconds_bucket", step="O1", direction="step_forward", le="10") == 2
    )
    assert value(text, "qwit_flows_waiting") == 1


async def test_the_metrics_of_flows_on_a_worker(dev_server: DevServer):
    address = f"127.0.0.1:{free_port()}"
    temporal = await connect_temporal(
        target_host=dev_server.address, runtime=metrics_runtime(address)
    )
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal, task_queue=queue)
    waits = failing_flow(qwit.WAIT)
    # a flow waiting on another task queue of the namespace is not this worker's
    elsewhere = f"{queue}-elsewhere"
    other = await qwit.connect(temporal_client=temporal, task_queue=elsewhere)
    async with (
        create_worker(temporal, Outer, waits, task_queue=queue),
        create_worker(temporal, waits, task_queue=elsewhere),
    ):
        not_ours = await other.start(
            waits, {"ledger": new_ledger(), "fail": "react.F", "fail_after": True}
        )
        await wait_for_status(not_ours, "waiting", timeout=30)
        counting = asyncio.ensure_future(count_waiting(temporal, every=0.3, task_queue=queue))
        try:
            text, waiting = await three_flows(
                client, waits, lambda: asyncio.to_thread(scrape, address)
            )
        finally:
            counting.cancel()
        await waiting.cancel()
        await not_ours.cancel()
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith("qwit_")))
    check_three_flows(text)  # the other queue's waiting flow is not counted
    assert value(text, "qwit_waits", step="react.F", task_queue=queue) == 1
    assert value(text, "qwit_flows_waiting", task_queue=queue) == 1
    # Temporal's own metrics are still there, with QWIT's
    assert value(text, "temporal_workflow_completed") >= 1
    # every sample carries the namespace and task queue (Temporal adds them)
    assert value(text, "qwit_flows_started", task_queue=queue, namespace="default") >= 2


def test_the_worker_refuses_a_bad_metrics_address():
    from qwit._cli import cli

    result = CliRunner().invoke(
        cli, ["worker", "samples.order.flows", "--metrics-address", "nowhere"]
    )
    assert result.exit_code == 2, result.output
    assert "a metrics address is HOST:PORT" in result.output


async def test_the_metrics_of_flows_on_a_postgres_worker(postgres_dsn: str):
    """The same flows on ``qwit.postgres``, scraped from the worker's own
    endpoint (``qwit._metrics.serve_metrics``, as ``qwit-worker --backend
    postgres --metrics-address`` serves it): the same figures."""
    from qwit.postgres import Metrics, PostgresSettings, PostgresWorker, prepare, serve_metrics

    await prepare(postgres_dsn)
    address = f"127.0.0.1:{free_port()}"
    metrics = Metrics()
    server = await serve_metrics(address, metrics)
    client = await qwit.connect(backend=qwit.postgres, settings=[PostgresSettings(postgres_dsn)])
    waits = failing_flow(qwit.WAIT)
    worker = PostgresWorker(
        postgres_dsn, Outer, waits, metrics=metrics, waiting_every=0.3, poll_interval=0.2
    )
    try:
        async with worker:
            text, waiting = await three_flows(
                client, waits, lambda: asyncio.to_thread(scrape, address)
            )
            await waiting.cancel()
            with pytest.raises(qwit.FlowCancelled):
                await waiting.result()
    finally:
        server.close()
        await client.close()
    print("\n" + text)
    check_three_flows(text)
    assert value(text, "qwit_waits", step="react.F") == 1
    # the same in the table itself
    assert metrics.value("qwit_flows_started", flow="Outer") == 2


async def resumed_by_another_worker(dsn: str, flow: type[qwit.Flow]) -> tuple[Any, Any]:
    """Run ``flow`` (whose steps include PgGate): its worker stops while the
    gate holds it, the next one finishes it. The two workers' metrics."""
    from qwit.postgres import Metrics, PostgresSettings, PostgresWorker, prepare
    from tests import ledger
    from tests.test_postgres import GATES

    await prepare(dsn)
    client = await qwit.connect(backend=qwit.postgres, settings=[PostgresSettings(dsn)])
    run = new_ledger()
    GATES[run] = asyncio.Event()
    first, second = Metrics(), Metrics()
    handle = await client.start(flow, {"ledger": run})
    # (stopped at once, the step cut off as by a crash)
    async with PostgresWorker(
        dsn, flow, metrics=first, poll_interval=0.2, graceful_shutdown_timeout=0
    ):
        await ledger.wait_for_mark(run, "started", "pg.Gate")
    GATES[run].set()
    async with PostgresWorker(dsn, flow, metrics=second, poll_interval=0.2):
        await asyncio.wait_for(handle.result(), 60)
    await client.close()
    return first, second


async def test_a_postgres_flow_replayed_by_a_new_worker_is_counted_once(postgres_dsn: str):
    """The worker driving a flow stops mid-flow; the next one replays its
    journal and finishes it: across the two workers' metrics, the flow and
    each step are counted once."""
    from tests.test_postgres import PgOrder

    first, second = await resumed_by_another_worker(postgres_dsn, PgOrder)

    def both(metric: str, **labels: str) -> float:
        return float(first.value(metric, **labels) + second.value(metric, **labels))

    assert first.value("qwit_steps", step="pg.A", outcome="done") == 1
    assert both("qwit_flows_started", flow="pg.order") == 1
    assert both("qwit_flows_ended", flow="pg.order", outcome="completed") == 1
    for step in ("pg.A", "pg.Gate", "pg.B"):
        assert both("qwit_steps", step=step, direction="step_forward", outcome="done") == 1, step


class GateOnly(qwit.Flow, name="metrics.gate_only", backend=qwit.postgres):
    def build_flow(self) -> None:
        from tests.test_postgres import PgGate

        self.step(PgGate)


async def test_a_postgres_flow_resumed_before_its_first_result_is_counted_once(
    postgres_dsn: str,
):
    """The worker driving a flow stops while its first step runs (nothing is
    journaled yet, but the flow had begun): the next worker does not count
    its start again."""
    first, second = await resumed_by_another_worker(postgres_dsn, GateOnly)
    assert first.value("qwit_flows_started", flow="metrics.gate_only") == 1
    assert second.value("qwit_flows_started", flow="metrics.gate_only") == 0
    assert second.value("qwit_flows_ended", flow="metrics.gate_only") == 1


async def test_a_worker_whose_runtime_exports_no_metrics_skips_recording(
    dev_server: DevServer,
) -> None:
    # Recording into temporalio's no-op meter is work on every step for
    # nothing: such a worker's flows skip it. A runtime with metrics keeps it.
    from temporalio.common import MetricMeter
    from temporalio.runtime import Runtime
    from temporalio.worker import Replayer

    from qwit.temporal import QwitPlugin
    from qwit.temporal._workflow import NoEagerInterceptor

    def metered(interceptors: Any) -> list[bool]:
        return [i.metered for i in interceptors if isinstance(i, NoEagerInterceptor)]

    plain = await connect_temporal(target_host=dev_server.address)
    assert (plain.service_client.config.runtime or Runtime.default()).metric_meter is (
        MetricMeter.noop
    )
    async with create_worker(plain, Outer, task_queue=f"plain-{uuid.uuid4().hex[:8]}") as w:
        assert metered(w.config(active_config=True)["interceptors"]) == [False]
    exported = await connect_temporal(
        target_host=dev_server.address, runtime=metrics_runtime(f"127.0.0.1:{free_port()}")
    )
    async with create_worker(exported, Outer, task_queue=f"metered-{uuid.uuid4().hex[:8]}") as w:
        assert metered(w.config(active_config=True)["interceptors"]) == [True]
    # a replay records nothing: its flows skip it too
    replayer = Replayer(workflows=[], plugins=[QwitPlugin(Outer)])
    assert metered(replayer.config(active_config=True)["interceptors"]) == [False]


def test_the_metered_check_finds_the_runtime_as_the_worker_does() -> None:
    # The runtime a worker exports through is the one its client's bridge
    # connected with, reached through a wrapped service's worker_service_client.
    from types import SimpleNamespace

    from qwit.temporal._plugin import _metered

    def client(service: Any) -> Any:
        return {"client": SimpleNamespace(service_client=service)}

    exported = metrics_runtime(f"127.0.0.1:{free_port()}")
    bridge = SimpleNamespace(_runtime=exported, config=SimpleNamespace(runtime=None))
    wrapped = SimpleNamespace(worker_service_client=bridge, config=SimpleNamespace(runtime=None))
    assert _metered(client(wrapped))
    assert _metered(client(bridge))
    # none given: the default runtime, whose meter is a no-op one
    plain = SimpleNamespace(_runtime=None, config=SimpleNamespace(runtime=None))
    assert not _metered(client(plain))
