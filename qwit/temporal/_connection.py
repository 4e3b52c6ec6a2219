"""Why Temporal can't be reached, in words a user can act on.

The SDK reports a failed connection as one ``RuntimeError`` holding a Rust
transport error (``InvalidCertificate(UnknownIssuer)`` and the like), and a
call that finds the server gone as an ``RPCError`` (``tcp connect error``,
``transport error``, ``Timeout expired``). QWIT says instead which address
it tried, whether TLS was on, what most likely went wrong and which setting
to look at, and keeps the SDK's error as the cause.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from .._errors import EngineUnavailable

_CA_HINT = (
    "set TEMPORAL_TLS_SERVER_CA_CERT_PATH or TEMPORAL_TLS_SERVER_CA_CERT_DATA to the CA that "
    "signed it"
)
_TLS_VARS = "TEMPORAL_TLS, TEMPORAL_API_KEY or a TEMPORAL_TLS_* variable"
_UNKNOWN = "the connection failed"


class TemporalConnectionError(EngineUnavailable, RuntimeError):
    """QWIT could not reach Temporal: to connect, or for a call once connected.

    The message names the address, says whether TLS was on and what to
    check; the SDK's own error is the ``__cause__``. It never contains the API
    key. It is a ``RuntimeError`` too, as the SDK's connection errors are.

    Attributes:
        address: The ``host:port`` QWIT tried.
        tls: Whether the connection used TLS.
        tls_verification_failed: Whether the server's certificate was
            rejected (untrusted CA, wrong name, expired, ...).
    """

    def __init__(
        self, message: str, *, address: str, tls: bool, tls_verification_failed: bool = False
    ) -> None:
        super().__init__(message)
        self.address = address
        self.tls = tls
        self.tls_verification_failed = tls_verification_failed


def _server_name(config: Mapping[str, Any], address: str) -> str:
    tls = config.get("tls")
    if isinstance(tls, TLSConfig) and tls.domain:
        return tls.domain
    return address.rsplit(":", 1)[0]


def _diagnose(config: Mapping[str, Any], address: str, tls: bool, raw: str) -> tuple[str, bool]:
    """(what went wrong and what to check, whether TLS verification failed)."""
    if "InvalidCertificate(UnknownIssuer" in raw:
        return (
            f"TLS verification failed: the server's certificate is not signed by a CA this "
            f"client trusts; {_CA_HINT}",
            True,
        )
    if "NotValidForName" in raw:
        name = _server_name(config, address)
        presented = re.findall(
            r'(?:DnsName|IpAddress)\(\\?"?([^")\\]+)', raw.split("presented", 1)[-1]
        )
        names = f" (it is for {', '.join(presented)})" if presented else ""
        return (
            f"TLS verification failed: the server's certificate is not valid for the name "
            f"{name!r}{names}: set TEMPORAL_TLS_SERVER_NAME to a name it is for, or connect by "
            "that name",
            True,
        )
    if "InvalidCertificate" in raw:
        detail = re.search(r"InvalidCertificate\((\w+)", raw)
        reason = f" ({detail.group(1)})" if detail else ""
        return f"TLS verification failed: the server's certificate was rejected{reason}", True
    handshake = ("InvalidMessage", "tls handshake", "AlertReceived", "ConnectionReset", "Eof")
    if tls and any(sign in raw for sign in handshake):
        return (
            f"the TLS handshake failed: does the server use TLS at this address? ({_TLS_VARS} "
            "turns TLS on)",
            False,
        )
    if "ConnectionRefused" in raw:
        return "the connection was refused: is a Temporal server running there?", False
    if "dns error" in raw:
        return "the host name could not be resolved", False
    if "Unauthenticated" in raw or "PermissionDenied" in raw:
        return "the server refused the credentials (TEMPORAL_API_KEY or client certificate)", False
    if not tls and ("transport error" in raw or "ConnectionReset" in raw or "BrokenPipe" in raw):
        return (
            "the server closed the connection: if it requires TLS, set TEMPORAL_TLS=true or "
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH",
            False,
        )
    return _UNKNOWN, False


def _tls_on(config: Mapping[str, Any]) -> bool:
    # As Client.connect decides: an API key turns TLS on unless tls says otherwise.
    api_key = config.get("api_key")
    return bool(api_key) if config.get("tls") is None else config.get("tls") is not False


def connection_error(config: Mapping[str, Any], err: BaseException) -> TemporalConnectionError:
    """A ``TemporalConnectionError`` for the failed ``Client.connect(**config)``.

    Raise it ``from err``, so the SDK's error stays the cause.
    """
    address = str(config.get("target_host", ""))
    api_key = config.get("api_key")
    tls = _tls_on(config)
    raw = str(err)
    if isinstance(api_key, str) and api_key:
        raw = raw.replace(api_key, "<api key>")  # never seen there, but never shown either
    what, verification = _diagnose(config, address, tls, raw)
    namespace = config.get("namespace", "default")
    # A diagnosis says it all (the SDK's error stays the __cause__); else show that error.
    cause = f"{' ' if what.endswith('?') else '. '}Cause: {raw}" if what == _UNKNOWN else ""
    message = (
        f"can't connect to Temporal at {address} (namespace {namespace!r}, "
        f"TLS {'on' if tls else 'off'}): {what}{cause}"
    )
    return TemporalConnectionError(
        message, address=address, tls=tls, tls_verification_failed=verification
    )


def config_error(
    err: BaseException, environ: Mapping[str, str] | None = None
) -> TemporalConnectionError:
    """A ``TemporalConnectionError`` for env config that can't be loaded (a
    TLS file that is missing, say)."""
    env = os.environ if environ is None else environ
    # The SDK's FileNotFoundError doesn't say which file: name the suspects.
    missing = [
        f"{name}={value}"
        for name, value in sorted(env.items())
        if name.startswith("TEMPORAL_") and name.endswith("_PATH") and not os.path.exists(value)
    ]
    hint = f" ({', '.join(missing)}: no such file)" if missing else ""
    return TemporalConnectionError(
        f"can't load Temporal's connection settings (TEMPORAL_* variables, TEMPORAL_PROFILE, "
        f"TEMPORAL_CONFIG_FILE){hint}: {type(err).__name__}: {err}",
        address=env.get("TEMPORAL_ADDRESS", ""),
        tls=False,
    )


#: Words of a transport failure in an RPC error whose status is UNKNOWN or INTERNAL.
_TRANSPORT_WORDS = ("transport", "connect", "connection", "broken pipe", "reset", "timeout", "eof")

#: Statuses of a call that may succeed if made again later: the server is
#: down, restarting, unreachable for a while, or too busy right now.
TRANSIENT_STATUSES = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.CANCELLED,
    }
)


def is_transient(err: RPCError) -> bool:
    """Whether ``err`` says the server could not answer now (down, unreachable,
    busy), rather than that the request itself is wrong."""
    if err.status in TRANSIENT_STATUSES:
        return True
    if err.status in (RPCStatusCode.UNKNOWN, RPCStatusCode.INTERNAL):
        text = err.message.lower()
        return any(word in text for word in _TRANSPORT_WORDS)
    return False


def is_unavailable(err: RPCError) -> bool:
    """Whether ``err`` means that Temporal can't be reached or used: a
    transient failure, or credentials the server refuses."""
    return is_transient(err) or err.status in (
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.PERMISSION_DENIED,
    )


def _rpc_diagnosis(err: RPCError) -> str:
    """What an RPC error says of the server, and what to check."""
    text = err.message.lower()
    status = err.status
    if status == RPCStatusCode.RESOURCE_EXHAUSTED:
        return (
            "the server is too busy and refused the request; if it lasts, raise the "
            "namespace's limits or spread the load"
        )
    if status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
        return (
            "the server refused the credentials (TEMPORAL_API_KEY or client certificate) "
            "for this namespace"
        )
    if status == RPCStatusCode.DEADLINE_EXCEEDED or "timeout" in text or "timed out" in text:
        return "the server did not answer in time: is it running, and reachable from here?"
    if "connect" in text or "dns" in text:
        return "nothing answered there: is a Temporal server running, and reachable from here?"
    return "the server went away or is restarting: is it running, and reachable from here?"


def unavailable_error(
    config: Mapping[str, Any], namespace: str, err: RPCError, doing: str, after: str = ""
) -> TemporalConnectionError:
    """A ``TemporalConnectionError`` for a call that Temporal did not answer.

    Raise it ``from err``, so the SDK's error stays the cause.

    Args:
        config: The client's connection settings (``target_host``, ``tls``,
            ``api_key``), as ``temporalio.service.ConnectConfig`` has them.
        namespace: The client's namespace.
        err: What the call raised.
        doing: What QWIT was doing, e.g. ``"to cancel flow 'order-7'"``.
        after: More to say, at the end of the message.
    """
    address = str(config.get("target_host", ""))
    tls = _tls_on(config)
    raw = err.message
    api_key = config.get("api_key")
    if isinstance(api_key, str) and api_key:
        raw = raw.replace(api_key, "<api key>")
    where = f"{address} (namespace {namespace!r}, TLS {'on' if tls else 'off'})"
    message = (
        f"can't reach Temporal at {where} {doing}: {_rpc_diagnosis(err)} "
        f"({err.status.name}: {raw}){after}"
    )
    return TemporalConnectionError(message, address=address, tls=tls)


__all__ = [
    "TRANSIENT_STATUSES",
    "TemporalConnectionError",
    "config_error",
    "connection_error",
    "is_transient",
    "is_unavailable",
    "unavailable_error",
]
