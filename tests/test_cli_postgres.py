"""The command line on the PostgreSQL engine: ``--backend postgres`` (and
``QWIT_BACKEND``) for run, status, list, react, cancel and redrive, with
``$QWIT_POSTGRES_DSN`` or, without it, an embedded PostgreSQL kept in
``$QWIT_DATA_DIR/postgres``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import qwit as qwit_lib
from qwit.postgres import PostgresSettings, PostgresWorker, prepare
from qwit.testing import wait_for_status
from tests.clirun import qwit
from tests.test_cli_postgres_flows import (
    PgCliAborting,
    PgCliDeploy,
    PgCliPlainLongFlow,
    PgCliWaiting,
    PgCliWaitingInside,
)

FLOW = "tests.test_cli_postgres_flows:PgCliOrder"


async def test_run_status_list_on_postgres(postgres_dsn: str, tmp_path: Path):
    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_DATA_DIR": str(tmp_path)}
    done = await qwit(
        "run", FLOW, "--args", '{"n": 3}', "--id", "pg-o1", "--backend", "postgres", **env
    )
    assert done.code == 0, done.err
    assert json.loads(done.out) == {"n": 3, "reserved": 3, "charged": True}
    env_backend = {**env, "QWIT_BACKEND": "postgres"}
    failed = await qwit(
        "run",
        FLOW,
        "--args",
        '{"n": 4, "fail": true}',
        "--id",
        "pg-o2",
        QWIT_BACKEND="postgres",
        **env,
    )
    assert failed.code == 1
    assert "rolled back" in failed.err and "card declined" in failed.err
    status = await qwit("status", "pg-o2", "--json", "--backend", "postgres", **env)
    assert status.code == 0, status.err
    state = json.loads(status.out)
    assert state["status"] == "rolled_back"
    assert [s["status"] for s in state["steps"]] == ["compensated", "compensated"]
    listed = await qwit("list", "--json", "--backend", "postgres", **env)
    assert [(r["flow_id"], r["status"]) for r in json.loads(listed.out)] == [
        ("pg-o2", "rolled_back"),
        ("pg-o1", "completed"),
    ]
    only = await qwit("list", "--json", "--status", "completed", **env_backend)
    assert [r["flow_id"] for r in json.loads(only.out)] == ["pg-o1"]
    # "failed" is any failed end, as on Temporal
    failed_only = await qwit("list", "--json", "--status", "failed", **env_backend)
    assert [(r["flow_id"], r["status"]) for r in json.loads(failed_only.out)] == [
        ("pg-o2", "rolled_back")
    ]
    # an ended flow's id: a new execution of it, as on Temporal
    again = await qwit("run", FLOW, "--args", '{"n": 3}', "--id", "pg-o1", **env_backend)
    assert again.code == 0, again.err
    # the id of a flow that runs (it waits): the request failed, in one line
    waiting = "tests.test_cli_postgres_flows:PgCliWaiting"
    client = await qwit_lib.connect(
        backend=qwit_lib.postgres, settings=[PostgresSettings(postgres_dsn)]
    )
    async with PostgresWorker(postgres_dsn, PgCliWaiting, poll_interval=0.2):
        await wait_for_status(await client.start(PgCliWaiting, {"n": 9}, id="pg-o9"), "waiting")
    await client.close()
    taken = await qwit("run", waiting, "--args", '{"n": 3}', "--id", "pg-o9", **env_backend)
    assert taken.code == 1, taken.err
    assert taken.err.strip() == "qwit: a flow with id 'pg-o9' is already running"
    missing = await qwit("status", "no-such-flow", "--backend", "postgres", **env)
    assert missing.code == 1 and "no-such-flow" in missing.err


async def test_react_cancel_and_redrive_on_postgres(postgres_dsn: str, tmp_path: Path):
    env = {
        "QWIT_POSTGRES_DSN": postgres_dsn,
        "QWIT_DATA_DIR": str(tmp_path),
        "QWIT_BACKEND": "postgres",
    }
    ended = await qwit("run", FLOW, "--args", '{"n": 1}', "--id", "pg-o3", **env)
    assert ended.code == 0, ended.err
    refused = await qwit("cancel", "pg-o3", **env)
    assert refused.code == 1 and "has ended" in refused.err
    not_waiting = await qwit("react", "pg-o3", "skip", **env)
    assert not_waiting.code == 1 and "not waiting" in not_waiting.err
    aborting = "tests.test_cli_postgres_flows:PgCliAborting"
    aborted = await qwit(
        "run", aborting, "--args", '{"n": 2, "fail": true}', "--id", "pg-o4", **env
    )
    assert aborted.code == 1 and "aborted" in aborted.err
    # no worker of its own: the redriven run is served by the next qwit run's worker
    again = await qwit("redrive", "pg-o4", "--args", '{"fail": false}', **env)
    assert again.code == 0, again.err
    # as on Temporal: the new run, and the one it redrives
    assert re.search(r"flow pg-o4: redriven as run \S+ \(redrive of run \S+\)", again.err)
    query = await qwit("cancel", "--query", "x", **env)
    assert query.code == 2 and "qwit list" in query.err
    local = await qwit("status", "pg-o3", "--backend", "local", **env)
    assert local.code == 2 and "process that ran them" in local.err


async def test_without_a_dsn_an_embedded_postgres_keeps_the_flows(tmp_path: Path):
    env = {"QWIT_DATA_DIR": str(tmp_path), "QWIT_BACKEND": "postgres"}
    done = await qwit("run", FLOW, "--args", '{"n": 5}', "--id", "pg-e1", timeout=120, **env)
    assert done.code == 0, done.err
    status = await qwit("status", "pg-e1", "--json", timeout=120, **env)
    assert status.code == 0, status.err
    assert json.loads(status.out)["status"] == "completed"
    assert (tmp_path / "postgres" / "PG_VERSION").exists()


async def test_dev_serves_a_module_on_an_embedded_postgres(tmp_path: Path):
    """``qwit dev --backend postgres MODULE``: an embedded PostgreSQL and a
    worker; it prints the DSN; a flow run against it with --no-worker ends;
    SIGTERM stops it."""
    import signal

    from tests.clirun import read_until, start

    proc = await start(
        "dev", "--backend", "postgres", "tests.test_cli_postgres_flows", QWIT_DATA_DIR=str(tmp_path)
    )
    try:
        assert proc.stdout is not None
        seen = await read_until(proc.stdout, "QWIT_POSTGRES_DSN=", timeout=120)
        dsn = seen.split("QWIT_POSTGRES_DSN=", 1)[1].split()[0]
        done = await qwit(
            "run",
            FLOW,
            "--args",
            '{"n": 6}',
            "--no-worker",
            QWIT_BACKEND="postgres",
            QWIT_POSTGRES_DSN=dsn,
        )
        assert done.code == 0, done.err
        assert json.loads(done.out)["reserved"] == 6
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert "stopped" in out.decode()


async def test_a_postgres_worker_serves_its_metrics(postgres_dsn: str):
    """``qwit worker --backend postgres --metrics-address``: Prometheus text
    of a flow it ran."""
    import asyncio
    import signal
    import urllib.request

    from tests.clirun import read_until, start
    from tests.test_metrics import free_port, value

    address = f"127.0.0.1:{free_port()}"
    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_BACKEND": "postgres"}
    proc = await start(
        "worker", "tests.test_cli_postgres_flows", "--metrics-address", address, **env
    )
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, "serving", timeout=60)
        done = await qwit("run", FLOW, "--args", '{"n": 2}', "--no-worker", **env)
        assert done.code == 0, done.err

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
                assert answer.headers["Content-Type"].startswith("text/plain")
                text: str = answer.read().decode()
                return text

        text = await asyncio.to_thread(scrape)
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    assert value(text, "qwit_flows_ended", flow="pgcli.order", outcome="completed") == 1
    assert "# TYPE qwit_flows_waiting gauge" in text


async def test_a_postgres_worker_stopped_by_sigterm_lets_its_step_in_flight_finish(
    postgres_dsn: str, tmp_path: Path
):
    """SIGTERM to ``qwit worker --backend postgres`` while a step runs (a
    deploy): the step finishes there before the worker exits 0, and a new
    worker drives the flow on; the step ran once. Before, the step was cut
    off and its one attempt spent: the flow failed."""
    import asyncio
    import signal

    from tests.clirun import read_until, start

    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_BACKEND": "postgres"}
    await prepare(postgres_dsn)
    client = await qwit_lib.connect(
        backend=qwit_lib.postgres, settings=[PostgresSettings(postgres_dsn)]
    )
    proc = await start("worker", "tests.test_cli_postgres_flows", **env)
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, "serving", timeout=60)
        handle = await client.start(PgCliDeploy, {"dir": str(tmp_path)})
        for _ in range(600):
            if (tmp_path / "started").exists():
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "worker stopped" in err.decode()
    assert (tmp_path / "done").exists()
    async with PostgresWorker(postgres_dsn, PgCliDeploy, poll_interval=0.2):
        result = await asyncio.wait_for(handle.result(), 60)
        state = await handle.state()
    await client.close()
    assert result["slow"] == "done" and result["reserved"] == 1
    assert [s.attempts for s in state.steps] == [1, 1]


async def test_a_second_sigterm_stops_a_postgres_worker_at_once(postgres_dsn: str, tmp_path: Path):
    """A second signal while the worker waits for a plain step (a thread it
    can't stop): it exits 0 at once, the step left to other workers, as on
    a worker that died. Before, it waited for the thread (up to 30 s)."""
    import asyncio
    import signal
    import time

    from tests.clirun import read_until, start

    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_BACKEND": "postgres"}
    await prepare(postgres_dsn)
    client = await qwit_lib.connect(
        backend=qwit_lib.postgres, settings=[PostgresSettings(postgres_dsn)]
    )
    proc = await start("worker", "tests.test_cli_postgres_flows", **env)
    try:
        assert proc.stderr is not None
        await read_until(proc.stderr, "serving", timeout=60)
        await client.start(PgCliPlainLongFlow, {"dir": str(tmp_path)})
        for _ in range(600):
            if (tmp_path / "started").exists():
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.5)
        assert proc.returncode is None  # (it waits for the step)
        proc.send_signal(signal.SIGTERM)
        forced = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        took = time.monotonic() - forced
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await client.close()
    assert proc.returncode == 0, err.decode()
    assert took < 10, err.decode()  # (not the 28 s left of the step)
    assert "stopped at once" in err.decode()


def story(err: str) -> list[str]:
    """The progress lines of ``err`` (a step's event each), runs of spaces made one."""
    return [" ".join(line.split()) for line in err.splitlines() if line[:1] in "▶✓✗↩↺↻"]


async def test_run_shows_live_progress_on_postgres_and_local(postgres_dsn: str, tmp_path: Path):
    """On every engine, qwit run tells each step as it starts, ends or is undone."""
    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_DATA_DIR": str(tmp_path)}
    for backend in ("postgres", "local"):
        done = await qwit("run", FLOW, "--args", '{"n": 7}', "--backend", backend, **env)
        assert done.code == 0, done.err
        assert json.loads(done.out) == {"n": 7, "reserved": 7, "charged": True}
        assert "flow 'pgcli.order', id pgcli.order-" in done.err
        assert story(done.err) == [
            "▶ 1 pgcli.reserve started",
            "✓ 1 pgcli.reserve done",
            "▶ 2 pgcli.charge started",
            "✓ 2 pgcli.charge done",
        ], done.err
        failed = await qwit(
            "run", FLOW, "--args", '{"n": 8, "fail": true}', "--backend", backend, **env
        )
        assert failed.code == 1, failed.err
        assert story(failed.err) == [
            "▶ 1 pgcli.reserve started",
            "✓ 1 pgcli.reserve done",
            "▶ 2 pgcli.charge started",
            "✗ 2 pgcli.charge failed: StepError: card declined",
            "↺ 2 pgcli.charge compensated (no step_back: nothing to undo)",
            "↩ 1 pgcli.reserve compensating",
            "↺ 1 pgcli.reserve compensated",
        ], failed.err


async def test_run_checks_steps_against_the_engine_the_flow_runs_on(
    postgres_dsn: str, tmp_path: Path
):
    """A flow without backend= runs on --backend: a Step naming that engine
    runs, one naming another is a definition error (exit 2), before anything
    starts."""
    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_DATA_DIR": str(tmp_path)}
    ok = await qwit("run", "tests.cli_engine_flows:PostgresStep", "--backend", "postgres", **env)
    assert ok.code == 0, ok.err
    assert json.loads(ok.out) == {"ran_on": "postgres"}
    for flow, backend, step in [
        ("TemporalStep", "postgres", "temporal"),
        ("TemporalStep", "local", "temporal"),
        ("PostgresStep", "local", "postgres"),
    ]:
        refused = await qwit("run", f"tests.cli_engine_flows:{flow}", "--backend", backend, **env)
        assert refused.code == 2, refused.err
        assert f"names backend {step!r}, but its flow runs on {backend!r}" in refused.err
        assert "started" not in refused.err and refused.out == ""


async def test_postgres_that_cant_be_reached_is_one_line(tmp_path: Path):
    """A DSN nobody answers at: qwit run and qwit worker say where and what
    to check, in one line (exit 1); --no-worker without a DSN is a usage error."""
    bad = {"QWIT_POSTGRES_DSN": "postgresql://app@127.0.0.1:1/shop", "QWIT_BACKEND": "postgres"}
    for args in (["run", FLOW], ["run", FLOW, "--no-worker"], ["status", "x"]):
        done = await qwit(*args, **bad)
        assert done.code == 1, done.err
        assert "Traceback" not in done.err
        lines = done.err.strip().splitlines()
        assert len(lines) == 1, done.err
        assert lines[0].startswith(
            "qwit: can't reach PostgreSQL at 127.0.0.1:1 (database 'shop', user 'app'): "
        )
        assert "Connection refused" in lines[0] and "check QWIT_POSTGRES_DSN" in lines[0]
    worker = await qwit("worker", "tests.test_cli_postgres_flows", **bad)
    assert worker.code == 1, worker.err
    assert "Traceback" not in worker.err
    assert "can't reach PostgreSQL at 127.0.0.1:1 (database 'shop', user 'app')" in worker.err
    no_dsn = {"QWIT_DATA_DIR": str(tmp_path), "QWIT_BACKEND": "postgres"}
    done = await qwit("run", FLOW, "--no-worker", timeout=30, **no_dsn)
    assert done.code == 2, done.err
    assert "--no-worker needs the PostgreSQL your workers use" in done.err
    done = await qwit("react", "x", "skip", "--wait", timeout=30, **no_dsn)
    assert done.code == 2, done.err
    assert "--wait needs the PostgreSQL your workers use" in done.err


async def test_react_cancel_and_redrive_wait_on_postgres(postgres_dsn: str):
    """--wait follows the flow to its end, as on Temporal: its steps on
    stderr, its final args on stdout (0), or its story (1)."""
    env = {"QWIT_POSTGRES_DSN": postgres_dsn, "QWIT_BACKEND": "postgres"}
    await prepare(postgres_dsn)
    client = await qwit_lib.connect(
        backend=qwit_lib.postgres, settings=[PostgresSettings(postgres_dsn)]
    )
    worker = PostgresWorker(postgres_dsn, PgCliWaiting, PgCliAborting)
    async with client, worker:
        approved = await client.start(PgCliWaiting, {"n": 1}, id="pg-w1")
        await wait_for_status(approved, "waiting")
        done = await qwit("react", "pg-w1", "retry", "--args", '{"ok": true}', "--wait", **env)
        assert done.code == 0, done.err
        assert json.loads(done.out) == {"n": 1, "reserved": 1, "ok": True, "approved": True}
        # only what the decision led to: the failed attempt undone, the step run again
        assert story(done.err) == [
            "↩ 2 pgcli.approve compensating",
            "↺ 2 pgcli.approve compensated",
            "▶ 2 pgcli.approve started again",
            "✓ 2 pgcli.approve done (2 attempts)",
        ], done.err

        cancelled = await client.start(PgCliWaiting, {"n": 2}, id="pg-w2")
        await wait_for_status(cancelled, "waiting")
        done = await qwit("cancel", "pg-w2", "--wait", **env)
        assert done.code == 1, done.err
        assert done.out == ""
        assert "↺ 1 pgcli.reserve compensated" in story(done.err)
        assert "flow 'pgcli.waiting' cancelled (id pg-w2)" in done.err

        aborted = await client.start(PgCliAborting, {"n": 3, "fail": True}, id="pg-a1")
        with pytest.raises(qwit_lib.FlowAborted):
            await aborted.result()
        done = await qwit("redrive", "pg-a1", "--args", '{"fail": false}', "--wait", **env)
        assert done.code == 0, done.err
        assert json.loads(done.out) == {"n": 3, "fail": False, "reserved": 3, "charged": True}
        assert "✓ 2 pgcli.charge done" in story(done.err)
        assert "qwit: flow pg-a1: completed" in done.err
        aborted = await client.start(PgCliAborting, {"n": 4, "fail": True}, id="pg-a2")
        with pytest.raises(qwit_lib.FlowAborted):
            await aborted.result()
        done = await qwit("redrive", "pg-a2", "--wait", **env)  # declined again
        assert done.code == 1, done.err
        assert "flow 'pgcli.aborting' aborted (id pg-a2)" in done.err


async def test_a_flow_whose_sub_flow_waits_is_listed_as_waiting(postgres_dsn: str, tmp_path: Path):
    env = {
        "QWIT_POSTGRES_DSN": postgres_dsn,
        "QWIT_DATA_DIR": str(tmp_path),
        "QWIT_BACKEND": "postgres",
    }
    client = await qwit_lib.connect(
        backend=qwit_lib.postgres, settings=[PostgresSettings(postgres_dsn)]
    )
    async with PostgresWorker(postgres_dsn, PgCliWaitingInside, poll_interval=0.2):
        handle = await client.start(PgCliWaitingInside, {"n": 2}, id="pg-inside")
        await wait_for_status(handle, "waiting")
        waiting = await qwit(
            "list", "--json", "--status", "waiting", "--backend", "postgres", **env
        )
        running = await qwit(
            "list", "--json", "--status", "running", "--backend", "postgres", **env
        )
        # its commands name the engine: they work as printed
        status = await qwit("status", "pg-inside", **env)
        await handle.cancel()
        await wait_for_status(handle, "cancelled")
    await client.close()
    assert waiting.code == 0, waiting.err
    assert [(r["flow_id"], r["status"]) for r in json.loads(waiting.out)] == [
        ("pg-inside", "waiting")
    ]
    assert status.code == 0, status.err
    decide = [" ".join(line.split()) for line in status.out.splitlines() if "rollback" in line]
    assert any(line.startswith("qwit react --backend postgres pg-inside") for line in decide), (
        status.out
    )
    assert "pg-inside" not in [r["flow_id"] for r in json.loads(running.out)]
