"""Reaching Temporal: the configured cluster, or a dev server of our own.

With no Temporal address configured, the commands share one local state:
``$QWIT_DATA_DIR/run.db``, the SQLite file of the dev server that ``qwit run``
starts. While a ``qwit run`` holds it, the address of its server is in
``run.db.address`` for ``qwit list``, ``status``, ``react`` and ``cancel``;
otherwise ``qwit list`` and ``qwit status`` start a server of their own on it
for as long as they need it. The data directory is private (0700) and the
files QWIT and its servers keep there are 0600.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

# Imported here, with the interpreter's own sys.path, before the user's
# directory is added to it: the lock that guards a database must be the real one.
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, trust the user
    fcntl = None  # type: ignore[assignment]

import click
import temporalio.client
from temporalio.envconfig import ClientConfig

from .._errors import QwitError
from ..temporal import DevServer, connect_temporal
from ._common import Failed

#: Environment variable that moves QWIT's data directory.
DATA_DIR_ENV = "QWIT_DATA_DIR"
#: The state of ``qwit run``'s dev server, in the data directory.
RUN_DB = "run.db"
#: The state of ``qwit dev``'s server, in the data directory.
DEV_DB = "dev.db"
#: Mode of the data directory: only its owner may list or enter it.
DIR_MODE = 0o700
#: Mode of the files in it: the owner's alone.
FILE_MODE = 0o600
#: Files SQLite keeps next to a database.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


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
    """``Client.connect`` keywords that the command-line options set.

    Raises:
        click.UsageError: the Temporal address (``--address``, else the env
            config's) is not ``HOST:PORT``.
    """
    target = str(address or env_config().get("target_host") or "")
    if target:
        host, _, port = target.split("://", 1)[-1].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.UsageError(f"the Temporal address {target} is not HOST:PORT")
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
    except ValueError as exc:  # e.g. "invalid target URL: invalid port number"
        raise click.UsageError(
            f"the Temporal address {describe_target(address)} is not HOST:PORT: {exc}"
        ) from None


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


def private_data_dir() -> Path:
    """The data directory, created private (0700), or made private if it is not.

    A directory an older QWIT created with the default mode (0755) is
    tightened too, when this user owns it.
    """
    directory = data_dir()
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(directory, DIR_MODE, follow=True)
    return directory


def private_db(name: str) -> Path:
    """The path of a database of the data directory, which is made private.

    The database and SQLite's files beside it, if an older QWIT left them
    readable by others, are made 0600. The server creates them itself (the
    dev server sets up its schema only in a file that does not exist yet):
    ``DevServer`` gives it a umask under which they are created 0600.
    """
    db = private_data_dir() / name
    for path in (db, *(db.with_name(db.name + side) for side in SQLITE_SIDE_FILES)):
        _tighten(path, FILE_MODE)
    return db


def _tighten(path: Path, mode: int, *, follow: bool = False) -> None:
    """Take off ``path`` the permissions ``mode`` does not give (if it is ours).

    A symbolic link is followed only if ``follow`` (the data directory may
    be one); otherwise it is left alone.
    """
    try:
        info = path.stat() if follow else path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        return
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return
    if stat.S_IMODE(info.st_mode) & ~mode:
        with suppress(OSError):  # a read-only file system, say: nothing more to do
            path.chmod(stat.S_IMODE(info.st_mode) & mode)


async def start_server(server: DevServer) -> None:
    """Start ``server``; with a database file, whatever it creates is 0600
    (``DevServer`` gives it a private umask).

    Raises:
        RuntimeError: the server did not start.
    """
    server.start_process()
    try:
        await server.wait_ready()
    except BaseException:
        server.stop()
        raise


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
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        if fcntl is None:  # pragma: no cover - Windows: no advisory locks, trust the user
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


#: Seconds a command waits for the server of the previous one to let go of the state.
LOCK_WAIT = 5.0
#: Seconds to reach the server of a ``qwit run`` in progress.
LIVE_CONNECT_TIMEOUT = 5.0

#: What to set instead of relying on the local state.
NO_ADDRESS = "no Temporal address is configured (TEMPORAL_ADDRESS, TEMPORAL_PROFILE or --address)"


def _lock_for(db: Path) -> Lock:
    return Lock(db.with_name(db.name + ".lock"))


def _address_file(db: Path) -> Path:
    """Where the ``qwit run`` that holds ``db`` says where its server listens."""
    return db.with_name(db.name + ".address")


def local_namespace(namespace: str | None) -> str:
    """The namespace on a local dev server: the option, the env config's, or ``default``."""
    return str(namespace or env_config().get("namespace") or "default")


def _publish(db: Path, address: str, namespace: str) -> None:
    """Say where the server that holds ``db`` listens (a private file, replaced whole)."""
    target = _address_file(db)
    partial = target.with_name(f"{target.name}.{os.getpid()}")
    text = json.dumps({"address": address, "namespace": namespace, "pid": os.getpid()})
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(partial, target)


def _published(db: Path) -> tuple[str, str] | None:
    """The address and namespace the ``qwit run`` that holds ``db`` published, if any."""
    try:
        found = json.loads(_address_file(db).read_text())
        return str(found["address"]), str(found["namespace"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@asynccontextmanager
async def _own_server(db: Path | None, lock: Lock, namespace: str) -> AsyncIterator[DevServer]:
    """A headless dev server on ``db`` (in memory if None) that inherits ``lock``.

    On the way out the server is asked to stop, without waiting the second or
    so it takes: it holds the lock on its state until it has stopped, and the
    next command waits for that.

    Raises:
        Failed: the Temporal CLI is missing, or the server did not start.
    """
    try:
        # The server inherits the lock: held until the server has stopped.
        server = DevServer(
            db_filename=db, namespace=namespace, pass_fds=() if lock.fd is None else (lock.fd,)
        )
    except FileNotFoundError as exc:
        raise Failed(str(exc)) from None
    try:
        await start_server(server)
    except RuntimeError as exc:
        raise Failed(str(exc)) from None
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)


@asynccontextmanager
async def embedded_server(
    namespace: str, say: Callable[[str], None], db_name: str = RUN_DB
) -> AsyncIterator[DevServer]:
    """A dev server for one command, its state kept in the data dir.

    While it runs, its address is published beside its state, so that
    ``qwit list``, ``status``, ``react`` and ``cancel`` reach it with no
    address configured. When another command keeps the state busy for
    longer than ``LOCK_WAIT`` (two ``qwit run`` at once), this one's server
    keeps its state in memory instead.

    Raises:
        Failed: the Temporal CLI is missing, or the server did not start.
    """
    db = private_db(db_name)
    lock = _lock_for(db)
    owned = lock.acquire(wait=LOCK_WAIT)
    try:
        where = f"state in {db}" if owned else f"state in memory: {db} is in use"
        say(f"starting a local Temporal dev server ({where})")
        async with _own_server(db if owned else None, lock, namespace) as server:
            if owned:
                _publish(db, server.address, namespace)
            try:
                yield server
            finally:
                if owned:
                    with suppress(OSError):
                        _address_file(db).unlink()
    finally:
        lock.release()


async def _connect_local(address: str, namespace: str) -> temporalio.client.Client:
    # Only the local server's own settings: env TLS or API keys are for other clusters.
    return await connect(address, namespace, tls=False, api_key=None)


async def _reach_live_run(db: Path, namespace: str | None) -> temporalio.client.Client | None:
    """A client of the server of the ``qwit run`` in progress, if one answers."""
    published = _published(db)
    if published is None:
        return None
    address, run_namespace = published
    try:
        return await asyncio.wait_for(
            _connect_local(address, namespace or run_namespace), LIVE_CONNECT_TIMEOUT
        )
    except asyncio.TimeoutError:
        return None
    except Failed:
        if _listening(address):
            raise  # the server is there: what failed is ours to report (bad keys, say)
        return None


def _listening(address: str) -> bool:
    """Whether something accepts connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


@asynccontextmanager
async def local_temporal(
    namespace: str | None, say: Callable[[str], None], *, may_start: bool
) -> AsyncIterator[temporalio.client.Client]:
    """With no address configured: the Temporal that keeps ``qwit run``'s flows.

    That is the server of the ``qwit run`` in progress, if there is one;
    else, when ``may_start``, a headless server of our own on ``run.db`` for
    as long as the block runs (it runs no worker: nothing moves the flows on).

    Args:
        namespace: ``--namespace``, over the env config's.
        say: Prints a line for the user (on stderr).
        may_start: Whether a server may be started on the state when no
            ``qwit run`` is in progress (reading it needs no worker; deciding
            or cancelling a flow does).

    Raises:
        Failed: There is nothing to reach, or the state is busy.
    """
    db = data_dir() / RUN_DB
    lock = _lock_for(db)
    owned = lock.acquire() if db.exists() else False
    try:
        if db.exists() and not owned:
            live = await _reach_live_run(db, namespace)
            if live is not None:
                say(f"no Temporal address configured: the qwit run in progress, on {db}")
                yield live
                return
            if may_start:
                owned = lock.acquire(wait=LOCK_WAIT)
        if not db.exists():
            raise Failed(f"{NO_ADDRESS}, and no qwit run has kept flows in {db} yet")
        if not may_start:
            raise Failed(
                f"{NO_ADDRESS}, and no qwit run is in progress: the flows in {db} can be "
                "decided or cancelled only while a qwit run serves them"
            )
        if not owned:
            raise Failed(f"{db} is in use by another process; try again when it has stopped")
        private_db(RUN_DB)
        ns = local_namespace(namespace)
        say(f"no Temporal address configured: the flows of qwit run, in {db}")
        async with _own_server(db, lock, ns) as server:
            yield await _connect_local(server.address, ns)
    finally:
        lock.release()


@asynccontextmanager
async def temporal_for(
    address: str | None,
    namespace: str | None,
    say: Callable[[str], None],
    *,
    may_start: bool = True,
) -> AsyncIterator[temporalio.client.Client]:
    """The Temporal a command talks to: the configured one, else ``qwit run``'s.

    Raises:
        Failed: Temporal can't be reached (see ``connect`` and ``local_temporal``).
    """
    if address_configured(address):
        yield await connect(address, namespace)
    else:
        async with local_temporal(namespace, say, may_start=may_start) as temporal:
            yield temporal
