"""Why a connection to Temporal failed, in words a user can act on.

The SDK reports a failed connection as one ``RuntimeError`` holding a Rust
transport error (``InvalidCertificate(UnknownIssuer)`` and the like). QWIT
says instead which address it tried, whether TLS was on, what most likely
went wrong and which setting to look at, and keeps the SDK's error as the
cause.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from temporalio.service import TLSConfig

from .._errors import EngineUnavailable

_CA_HINT = (
    "set TEMPORAL_TLS_SERVER_CA_CERT_PATH or TEMPORAL_TLS_SERVER_CA_CERT_DATA to the CA that "
    "signed it"
)
_TLS_VARS = "TEMPORAL_TLS, TEMPORAL_API_KEY or a TEMPORAL_TLS_* variable"


class TemporalConnectionError(EngineUnavailable, RuntimeError):
    """QWIT could not connect to Temporal.

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
    return "the connection failed", False


def connection_error(config: Mapping[str, Any], err: BaseException) -> TemporalConnectionError:
    """A ``TemporalConnectionError`` for the failed ``Client.connect(**config)``.

    Raise it ``from err``, so the SDK's error stays the cause.
    """
    address = str(config.get("target_host", ""))
    api_key = config.get("api_key")
    # As Client.connect decides: an API key turns TLS on unless tls says otherwise.
    tls = bool(api_key) if config.get("tls") is None else config.get("tls") is not False
    raw = str(err)
    if isinstance(api_key, str) and api_key:
        raw = raw.replace(api_key, "<api key>")  # never seen there, but never shown either
    what, verification = _diagnose(config, address, tls, raw)
    namespace = config.get("namespace", "default")
    message = (
        f"can't connect to Temporal at {address} (namespace {namespace!r}, "
        f"TLS {'on' if tls else 'off'}): {what}{' ' if what.endswith('?') else '. '}Cause: {raw}"
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


__all__ = ["TemporalConnectionError", "config_error", "connection_error"]
