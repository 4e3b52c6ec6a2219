"""Reaching Temporal: the configured cluster, or a dev server of our own."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import click
import temporalio.client
from temporalio.envconfig import ClientConfig

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
        Failed: Temporal can't be reached.
    """
    env_config()  # a broken config is a usage error, reported before connecting
    try:
        return await connect_temporal(**overrides(address, namespace), **extra)
    except RuntimeError as exc:
        raise Failed(f"can't reach Temporal at {describe_target(address)}: {exc}") from None


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


@contextmanager
def exclusive(path: Path) -> Any:
    """Hold an exclusive lock on ``path`` (yields False if another process has it).

    Two Temporal servers must never open the same SQLite file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = path.open("a+")
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, trust the user
            yield True
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` (and we may bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@asynccontextmanager
async def embedded_server(
    namespace: str, say: Any, db_name: str = "run.db"
) -> AsyncIterator[DevServer]:
    """A dev server that lives as long as the command, its state in the data dir.

    When another command already holds that state (two ``qwit run`` at once),
    this one keeps its server's state in memory instead.

    Raises:
        Failed: the Temporal CLI is missing, or the server did not start.
    """
    db = data_dir() / db_name
    with exclusive(db.with_name(db.name + ".lock")) as owned:
        try:
            server = DevServer(db_filename=db if owned else None, namespace=namespace)
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
            await server.__aexit__(None, None, None)
