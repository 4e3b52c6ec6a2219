"""`qwit dev`: a local Temporal with its UI and a worker, stopped cleanly, state kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwit._cli import cli
from qwit._cli._connect import port_free
from qwit.temporal._devserver import free_port
from tests.clirun import finish, qwit, read_until, start


async def test_dev_serves_flows_stops_cleanly_and_keeps_its_state(tmp_path):
    port, ui_port = free_port(), free_port()
    data = str(tmp_path / "qwit-data")
    dev = await start(
        "dev", "samples.approval.flows", "--port", str(port), "--ui-port", str(ui_port),
        QWIT_DATA_DIR=data,
    )  # fmt: skip
    try:
        assert dev.stdout is not None
        banner = await read_until(dev.stdout, "Ctrl-C stops.")
        address = f"127.0.0.1:{port}"
        assert f"Temporal      {address}" in banner
        assert f"Web UI        http://127.0.0.1:{ui_port}" in banner
        assert "Worker        samples.approval.flows on task queue 'qwit'" in banner
        assert f"export TEMPORAL_ADDRESS={address}" in banner
        assert f"{data}/dev.db" in banner

        # dev's worker runs the steps: this run has none of its own
        done = await qwit(
            "run", "samples.approval.flows:ExpenseClaim", "--no-worker", "--id", "claim-small",
            "--args", '{"employee": "bo", "cents": 1200}', TEMPORAL_ADDRESS=address,
        )  # fmt: skip
        assert done.code == 0, done.err
        assert json.loads(done.out)["approved_by"] == "policy"

        dev.send_signal(signal.SIGINT)
        stopped = await finish(dev, timeout=30)
    finally:
        if dev.returncode is None:
            dev.kill()
            await dev.wait()
    assert stopped.code == 0, stopped.err
    assert "stopping..." in stopped.out and "stopped" in stopped.out
    assert port_free(port) and port_free(ui_port)
    # its state is its user's alone
    state = Path(data)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in state.iterdir()} == {
        name: 0o600 for name in os.listdir(state)
    }
    assert (state / "dev.db").exists()

    # restarted on the same data dir (headless, SIGTERM this time): the flow is still there
    dev = await start("dev", "--port", str(port), "--headless", QWIT_DATA_DIR=data)
    try:
        assert dev.stdout is not None
        banner = await read_until(dev.stdout, "Ctrl-C stops.")
        assert "(headless)" in banner
        done = await qwit("status", "claim-small", "--json", TEMPORAL_ADDRESS=f"127.0.0.1:{port}")
        assert done.code == 0, done.err
        assert json.loads(done.out)["status"] == "completed"
        dev.send_signal(signal.SIGTERM)
        stopped = await finish(dev, timeout=30)
    finally:
        if dev.returncode is None:
            dev.kill()
            await dev.wait()
    assert stopped.code == 0, stopped.err
    assert port_free(port)


@pytest.mark.parametrize("option", ["--port", "--ui-port"])
def test_dev_refuses_a_busy_port(option, tmp_path, monkeypatch):
    monkeypatch.setenv("QWIT_DATA_DIR", str(tmp_path))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = free_port()
        ports = {"--port": str(other), "--ui-port": str(free_port())}
        ports[option] = str(port)
        result = CliRunner().invoke(cli, ["dev", *(x for kv in ports.items() for x in kv)])
    assert result.exit_code == 2, result.output
    assert f"port {port} on 127.0.0.1 is in use" in result.output
    assert f"pass another with {option}" in result.output


def test_dev_usage_errors():
    result = CliRunner().invoke(cli, ["dev", "tests.no_such_module"])
    assert result.exit_code == 2
    assert "can't import module 'tests.no_such_module'" in result.output
