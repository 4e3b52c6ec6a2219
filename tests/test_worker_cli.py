"""`qwit-worker`: the command users deploy, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import qwit
from qwit.temporal import DevServer
from tests.worker_app import Restartable

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, "-c", "from qwit._cli import worker_main; worker_main()"]


def start_worker(address: str, queue: str, *modules: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TEMPORAL_ADDRESS": address, "QWIT_TASK_QUEUE": queue}
    return subprocess.Popen(
        [*WORKER, *modules],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        await asyncio.sleep(0.05)


async def wait_ready(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait until the worker logs that it serves (it logs after polling starts)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if "serving" in line:
            return
        assert line, "worker exited before serving"
    raise AssertionError("worker did not start")


def test_usage_errors_exit_2_with_one_line():
    for modules, expected in [
        (["tests.no_such_module"], "can't import module 'tests.no_such_module'"),
        (["tests.empty_module"], "nothing to serve"),
    ]:
        proc = subprocess.run(
            [*WORKER, *modules], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr
        # one line: the reason, not click's usage text (the command was right)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = subprocess.run(WORKER, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Missing argument" in proc.stderr


def test_a_worker_of_the_local_engine_is_refused_saying_why():
    # (QWIT_BACKEND=local is what ``qwit run`` takes: a worker has nothing to serve)
    env = {**os.environ, "QWIT_BACKEND": "local"}
    proc = subprocess.run(
        [*WORKER, "tests.worker_app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "run in the process that starts them; no worker serves them" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_worker_serves_and_exits_0_on_signal(dev_server: DevServer, sig, procs, tmp_path):
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    proc = start_worker(dev_server.address, queue, "tests.worker_app")
    procs.append(proc)
    await wait_ready(proc)
    (tmp_path / "go").touch()
    client = await qwit.connect(target_host=dev_server.address, task_queue=queue)
    result = await client.run(Restartable, {"dir": str(tmp_path)})
    assert result["first_pid"] == result["gate_pid"] == result["last_pid"] == proc.pid
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "worker stopped" in out


async def test_flow_survives_killing_its_worker_mid_flow(dev_server: DevServer, procs, tmp_path):
    queue = f"cli-{uuid.uuid4().hex[:8]}"
    first = start_worker(dev_server.address, queue, "tests.worker_app")
    procs.append(first)
    await wait_ready(first)
    client = await qwit.connect(target_host=dev_server.address, task_queue=queue)
    handle = await client.start(Restartable, {"dir": str(tmp_path)})
    await wait_for(tmp_path / "gate.attempt1")
    first.kill()  # SIGKILL: no graceful shutdown, the step in flight is lost
    first.wait()
    second = start_worker(dev_server.address, queue, "tests.worker_app")
    procs.append(second)
    await wait_ready(second)
    (tmp_path / "go").touch()
    result = await asyncio.wait_for(handle.result(), 60)
    assert result["first_pid"] == first.pid
    assert result["gate_pid"] == result["last_pid"] == second.pid
    # First ran once: nothing was replayed as a new effect
    assert (tmp_path / "first").read_text().split() == [str(first.pid)]
    assert not (tmp_path / "first.back").exists()
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=30)
    assert second.returncode == 0


async def test_heartbeat_lets_a_killed_workers_step_resume_fast_and_in_place(
    dev_server: DevServer, procs, tmp_path
):
    from tests.worker_app import LongJob

    queue = f"cli-{uuid.uuid4().hex[:8]}"
    first = start_worker(dev_server.address, queue, "tests.worker_app")
    procs.append(first)
    await wait_ready(first)
    client = await qwit.connect(target_host=dev_server.address, task_queue=queue)
    handle = await client.start(LongJob, {"dir": str(tmp_path), "items": 30})
    await wait_for(tmp_path / "item12")
    first.kill()
    first.wait()
    killed_at = time.time()
    second = start_worker(dev_server.address, queue, "tests.worker_app")
    procs.append(second)
    await wait_ready(second)
    result = await asyncio.wait_for(handle.result(), 60)
    assert result["items_done"] == 30
    attempts = sorted(p.name for p in tmp_path.glob("progress.attempt*"))
    assert attempts[0] == "progress.attempt1.from0"
    resumed = next(p for p in tmp_path.glob("progress.attempt2.from*"))
    resume_at = int(resumed.name.rsplit("from", 1)[1])
    # it resumed where the last heartbeat said, not from the start...
    assert resume_at >= 5
    # ...soon after the kill: the heartbeat timeout (1.5 s), not the step timeout (120 s)
    assert resumed.stat().st_mtime - killed_at < 15
    # every item was processed; items before the resume point exactly once
    for item in range(30):
        pids = (tmp_path / f"item{item}").read_text().split()
        assert pids, item
        if item < resume_at:
            assert pids == [str(first.pid)]
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=30)


SLOW_IMPORT = """
import os
import pathlib
import time

import qwit

pathlib.Path(os.environ["QWIT_TEST_MARK"]).touch()
time.sleep(float(os.environ["QWIT_TEST_IMPORT_SECONDS"]))  # (an import that hangs)


class Slow(qwit.Step, name="slow_import.step"):
    def step_forward(self, args):
        return None
"""


def start_slow_worker(
    tmp_path: Path, backend: str, address: str, import_seconds: float
) -> subprocess.Popen[str]:
    module = f"slow_import_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(SLOW_IMPORT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "QWIT_TEST_MARK": str(tmp_path / "importing"),
        "QWIT_TEST_IMPORT_SECONDS": str(import_seconds),
        "TEMPORAL_ADDRESS": address,
        # (well formed; nothing listens there)
        "QWIT_POSTGRES_DSN": "postgresql://qwit@127.0.0.1:1/qwit",
    }
    return subprocess.Popen(
        [*WORKER, "--backend", backend, module],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("backend", ["temporal", "postgres"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_the_worker_imports_stops_it_with_exit_0(
    backend, sig, procs, tmp_path
):
    # Before, SIGTERM there was the default death (-15), and SIGINT a
    # KeyboardInterrupt: the contract's worker exits 0 on either; and at
    # once, even while an import hangs.
    proc = start_slow_worker(tmp_path, backend, "127.0.0.1:1", import_seconds=120)
    procs.append(proc)
    await wait_for(tmp_path / "importing")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "worker stopped before it served" in out


async def test_a_signal_while_the_worker_connects_stops_it_at_once(procs, tmp_path):
    # A server that accepts connections and never answers: connecting hangs.
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        proc = start_slow_worker(tmp_path, "temporal", f"127.0.0.1:{port}", import_seconds=0)
        procs.append(proc)
        await wait_for(tmp_path / "importing")
        await asyncio.sleep(2)  # (connecting)
        assert proc.poll() is None
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, out
        assert "worker stopped before it served" in out
        assert time.monotonic() - began < 10
    finally:
        silent.close()
        for writer in accepted:
            writer.close()
        await silent.wait_closed()
