"""With no Temporal address configured, the commands share ``qwit run``'s local
state: ``qwit list`` and ``qwit status`` show the flows ``qwit run`` ran (from
its server while one runs, else from a server of their own on its database),
and that state is private to its user."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwit._cli import cli
from qwit._cli._connect import private_db
from tests.clirun import finish, qwit, read_until, start

GOOD = {"order_id": "1", "sku": "A-1", "card": "4242", "cents": 2599}
DECLINED = {"order_id": "2", "sku": "B-2", "card": "4000-0002", "cents": 999}
ORDER = "samples.order.flows:PlaceOrder"


def modes(directory: Path) -> dict[str, int]:
    """Permission bits of the directory (as ".") and of every file in it."""
    found = {".": stat.S_IMODE(directory.stat().st_mode)}
    for path in directory.iterdir():
        found[path.name] = stat.S_IMODE(path.stat().st_mode)
    return found


async def test_list_and_status_show_the_flows_qwit_run_ran(tmp_path: Path):
    data = tmp_path / "data"
    env = {"QWIT_DATA_DIR": str(data)}
    done = await qwit("run", ORDER, "--args", json.dumps(GOOD), "--id", "order-1", **env)
    assert done.code == 0, done.err
    failed = await qwit("run", ORDER, "--args", json.dumps(DECLINED), "--id", "order-2", **env)
    assert failed.code == 1, failed.err

    listed = await qwit("list", "--json", **env)
    assert listed.code == 0, listed.err
    rows = {row["flow_id"]: row for row in json.loads(listed.out)}
    assert set(rows) == {"order-1", "order-2"}
    assert rows["order-1"]["status"] == "completed"
    assert rows["order-2"]["status"] == "rolled_back"
    assert {row["flow"] for row in rows.values()} == {"orders.place"}
    assert f"the flows of qwit run, in {data / 'run.db'}" in listed.err

    table = await qwit("list", **env)
    assert table.code == 0, table.err
    assert "order-1" in table.out and "order-2" in table.out and "rolled back" in table.out

    status = await qwit("status", "order-2", **env)
    assert status.code == 0, status.err
    lines = [" ".join(line.split()) for line in status.out.splitlines()]
    assert "flow orders.place id order-2 status rolled back" in lines
    assert "2 payments.charge compensated 1 StepError: card ending 0002 was declined" in lines

    # the state is its user's alone: the directory 0700, the database and its files 0600
    found = modes(data)
    assert found.pop(".") == 0o700
    assert "run.db" in found
    assert found == dict.fromkeys(found, 0o600), found


async def test_a_qwit_run_in_progress_is_reached_by_the_other_commands(tmp_path: Path):
    env = {"QWIT_DATA_DIR": str(tmp_path / "data")}
    claim = json.dumps({"employee": "ann", "cents": 25000})
    run = await start("run", "samples.approval.flows:ExpenseClaim", "--args", claim,
                      "--id", "claim-1", **env)  # fmt: skip
    try:
        assert run.stderr is not None
        await read_until(run.stderr, "flow waits for an operator")
        listed = await qwit("list", "--json", **env)
        assert listed.code == 0, listed.err
        assert [(r["flow_id"], r["status"]) for r in json.loads(listed.out)] == [
            ("claim-1", "waiting")
        ]
        assert "the qwit run in progress" in listed.err
        decided = await qwit("react", "claim-1", "rollback", **env)
        assert decided.code == 0, decided.err
        ended = await finish(run)
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    assert ended.code == 1, ended.err
    assert "flow 'expenses.claim' rolled back (id claim-1)" in ended.err

    # no run in progress: reading works, deciding can't
    status = await qwit("status", "claim-1", "--json", **env)
    assert status.code == 0, status.err
    assert json.loads(status.out)["status"] == "rolled_back"
    cancelled = await qwit("cancel", "claim-1", **env)
    assert cancelled.code == 1
    assert "no qwit run is in progress" in cancelled.err


async def test_without_state_or_address_the_request_fails_and_says_why(tmp_path: Path):
    data = tmp_path / "never-used"
    for args in (["list"], ["status", "f-1"], ["react", "f-1", "retry"], ["cancel", "f-1"]):
        done = await qwit(*args, QWIT_DATA_DIR=str(data))
        assert done.code == 1, (args, done.err)
        assert "no Temporal address is configured" in done.err, done.err
        assert "Traceback" not in done.err
    assert not data.exists()  # asking created nothing


def test_no_worker_without_an_address_is_a_usage_error(tmp_path, monkeypatch):
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(cli, ["run", ORDER, "--no-worker"])
    assert result.exit_code == 2, result.output
    assert "--no-worker needs the Temporal your workers use" in result.output
    assert "Set TEMPORAL_ADDRESS" in result.output and "drop --no-worker" in result.output
    assert not (tmp_path / "data").exists()  # no server was started


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_state_left_readable_by_an_older_version_is_made_private(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    for name in ("run.db", "run.db-wal", "run.db-shm"):
        (data / name).write_bytes(b"")
        (data / name).chmod(0o644)
    monkeypatch.setenv("QWIT_DATA_DIR", str(data))
    assert private_db("run.db") == data / "run.db"
    assert modes(data) == {".": 0o700, "run.db": 0o600, "run.db-wal": 0o600, "run.db-shm": 0o600}


def test_a_new_data_dir_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path / "new" / "data"))
    private_db("dev.db")
    assert stat.S_IMODE((tmp_path / "new" / "data").stat().st_mode) == 0o700
