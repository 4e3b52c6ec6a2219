"""Reaching Temporal: the configured cluster, or a dev server of our own."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import click
import temporalio.client
from temporalio.envconfig import ClientConfig

from .._errors import QwitError
from ..temporal import DevServer, connect_temporal
from ._common import Failed

#: Environment variable that moves QWIT's data directory.
DATA_DIR_ENV = "QWIT_DATA_DIR"


def env_config() -> dict[str, Any]:
    """Temporal's environment config (env vars, profile, config file), as is.

    Raises:
        click.UsageError: the config can't be read (e.g. an unknown profile).
    """
    try:
        return dict(ClientConfig.load_client_connect_config())
    except Exception as exc:
        raise click.UsageError(f"Temporal's environment config: {exc}") from None


def address_configured(address: str | None) -> bool:
    """Whether a Temporal address is given: ``--address``, or Temporal's env config."""
    return bool(address) or "target_host" in env_config()


def overrides(address: str | None, namespace: str | None) -> dict[str, Any]:
    """``Client.connect`` keywords that the command-line options set."""
    given: dict[str, Any] = {}
    if address:
        given["target_host"] = address
    if namespace:
        given["namespace"] = namespace
    return given


def describe_target(address: str | None) -> str:
    """The address a connection goes to, for messages."""
    return str(address or env_config().get("target_host") or "localhost:7233")


async def connect(
    address: str | None, namespace: str | None, **extra: Any
) -> temporalio.client.Client:
    """A temporalio client for QWIT, per Temporal's env config and the options.

    Args:
        address: ``--address``, over the env config's.
        namespace: ``--namespace``, over the env config's.
        **extra: More ``Client.connect`` keywords.

    Raises:
        Failed: Temporal can't be reached, or the encryption keys are bad.
    """
    env_config()  # a broken config is a usage error, reported before connecting
    try:
        return await connect_temporal(**overrides(address, namespace), **extra)
    except QwitError as exc:
        # It says which address, with TLS or not, and what to check.
        raise Failed(str(exc)) from None
    except RuntimeError as exc:
        raise Failed(f"can't connect to Temporal at {describe_target(address)}: {exc}") from None


def data_dir() -> Path:
    """Where QWIT keeps local state: ``$QWIT_DATA_DIR``, else the per-user data dir."""
    given = os.environ.get(DATA_DIR_ENV)
    if given:
        return Path(given).expanduser()
    if sys.platform == "win32":  # pragma: no cover - not tested here
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "qwit"


class Lock:
    """An exclusive lock on a file, which a server we start can hold for us.

    Two Temporal servers must never open the same SQLite file. The lock's
    file descriptor is passed to the server process, so the lock lasts as
    long as the server does, even after this process has exited.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait`` seconds; False if another holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, trust the user
            self.fd = fd
            return True
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.1)
            else:
                self.fd = fd
                return True

    def release(self) -> None:
        """Let go of our hold (a server given the lock keeps it until it exits)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False if another process has it."""
    lock = Lock(path)
    owned = lock.acquire()
    try:
        yield owned
    finally:
        lock.release()


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (and we may bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: Seconds ``qwit run`` waits for the server of the previous run to let go of its state.
LOCK_WAIT = 5.0


@asynccontextmanager
async def embedded_server(
    namespace: str, say: Callable[[str], None], db_name: str = "run.db"
) -> AsyncIterator[DevServer]:
    """A dev server for one command, its state kept in the data dir.

    On the way out the server is asked to stop, without waiting the second or
    so it takes: it holds the lock on its state until it has stopped, and the
    next command waits for that. When another command keeps the state busy
    for longer (two ``qwit run`` at once), this one's server keeps its state
    in memory instead.

    Raises:
        Failed: the Temporal CLI is missing, or the server did not start.
    """
    db = data_dir() / db_name
    lock = Lock(db.with_name(db.name + ".lock"))
    owned = lock.acquire(wait=LOCK_WAIT)
    try:
        try:
            # The server inherits the lock: held until the server has stopped.
            server = DevServer(
                db_filename=db if owned else None,
                namespace=namespace,
                pass_fds=() if lock.fd is None else (lock.fd,),
            )
        except FileNotFoundError as exc:
            raise Failed(str(exc)) from None
        where = f"state in {db}" if owned else f"state in memory: {db} is in use"
        say(f"starting a local Temporal dev server ({where})")
        try:
            await server.start()
        except RuntimeError as exc:
            raise Failed(str(exc)) from None
        try:
            yield server
        finally:
            if server.process is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
    finally:
        lock.release()
