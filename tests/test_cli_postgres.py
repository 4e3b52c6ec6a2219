"""The command line on the PostgreSQL engine: ``--backend postgres`` (and
``QWIT_BACKEND``) for run, status, list, react, cancel and redrive, with
``$QWIT_POSTGRES_DSN`` or, without it, an embedded PostgreSQL kept in
``$QWIT_DATA_DIR/postgres``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.clirun import qwit

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
    assert "redriven" in again.err
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
