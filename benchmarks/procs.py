"""Processes the benchmark starts, and what Linux says they used."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
#: The packages run from this checkout rather than from site-packages.
_SOURCE_PACKAGES = ("qwit", "benchmarks")


def bytecode_env(cache: Path) -> dict[str, str]:
    """The environment of a worker that runs compiled bytecode, as an
    installed package does (pip compiles what it installs), even where
    ``PYTHONDONTWRITEBYTECODE`` is set: without it, every import of QWIT's
    source would compile it again, and the compiler's memory would count as
    the worker's. Bytecode goes under ``cache``, not into the checkout.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def compile_sources(env: dict[str, str]) -> None:
    """Compile this checkout's packages into ``env``'s bytecode cache, once,
    before any worker starts: both sides then start from bytecode."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *_SOURCE_PACKAGES],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    # The command name (field 2) may hold spaces: split after its closing paren.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of ``pid`` now (``rss``) and at its peak (``peak``), in MB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values["rss" if key == "VmRSS" else "peak"] = int(rest.split()[0]) / 1024
    return values


class WorkerProcess:
    """``python -m benchmarks.worker`` for one side, on its own task queue."""

    def __init__(
        self,
        side: str,
        address: str,
        task_queue: str,
        *,
        unsandboxed: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.side = side
        self.env = env
        self.task_queue = task_queue
        self.command = [
            sys.executable,
            "-m",
            "benchmarks.worker",
            "--side",
            side,
            "--address",
            address,
            "--task-queue",
            task_queue,
        ]
        if unsandboxed:
            self.command.append("--unsandboxed")
        self.process: asyncio.subprocess.Process | None = None
        self.ready_seconds = 0.0
        # Kept aside: workers log every failed activity, and a benchmark fails
        # steps on purpose. Shown only if the worker does not start.
        self._stderr = tempfile.TemporaryFile(prefix="qwit-bench-worker-")  # noqa: SIM115

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 60.0) -> WorkerProcess:
        started = time.perf_counter()
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if line.strip() != b"ready":
            await self.stop(keep_stderr=True)
            raise RuntimeError(f"the {self.side} worker did not start: {self.stderr_tail()}")
        self.ready_seconds = time.perf_counter() - started
        return self

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-4000:].decode(errors="replace")

    async def stop(self, timeout: float = 40.0, *, keep_stderr: bool = False) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if not keep_stderr:
            self._stderr.close()
