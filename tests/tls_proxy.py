"""A TLS front for the dev server (which has no TLS of its own): certificates
made on the spot, and a TLS-terminating TCP proxy that also reads the HTTP/2
request headers going through it, to see what a client sends."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import ssl
from pathlib import Path
from types import TracebackType

import hpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass
class Authority:
    """A certificate authority of the test's own."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_server_cert(self, directory: Path) -> tuple[Path, Path]:
        """A server certificate for ``localhost`` and ``127.0.0.1``; returns
        the paths of the certificate and key PEM files."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        cert_path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + self.pem()  # the chain
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, CONTINUATION = 0x1, 0x9
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20


class HeaderTap:
    """Reads the request headers out of a client's HTTP/2 byte stream.

    Only framing and HPACK (with the ``hpack`` package): HEADERS and
    CONTINUATION frames are decoded in order, with one decoder per connection
    as HPACK requires; every other frame is skipped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._preface = False
        self._decoder = hpack.Decoder()
        self._block = b""
        self.requests: list[list[tuple[str, str]]] = []
        self.error: Exception | None = None

    def feed(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._feed(data)
        except Exception as exc:  # a tap must never break the connection
            self.error = exc

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        if not self._preface:
            if len(self._buffer) < len(PREFACE):
                return
            if not self._buffer.startswith(PREFACE):
                raise ValueError("not an HTTP/2 connection")
            self._buffer = self._buffer[len(PREFACE) :]
            self._preface = True
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            kind, flags = self._buffer[3], self._buffer[4]
            if len(self._buffer) < 9 + length:
                return
            payload, self._buffer = self._buffer[9 : 9 + length], self._buffer[9 + length :]
            if kind == HEADERS:
                pad = 0
                if flags & PADDED:
                    pad, payload = payload[0], payload[1:]
                if flags & PRIORITY:
                    payload = payload[5:]
                self._block = payload[: len(payload) - pad]
            elif kind == CONTINUATION:
                self._block += payload
            else:
                continue
            if flags & END_HEADERS:
                self.requests.append(list(self._decoder.decode(self._block, raw=False)))
                self._block = b""

    def values(self, name: str) -> list[str]:
        """Every value the client sent for header ``name``."""
        return [v for request in self.requests for k, v in request if k == name]


class TLSProxy:
    """``127.0.0.1:port`` with TLS (ALPN h2), forwarding plain TCP to ``backend``."""

    def __init__(self, backend: str, cert: Path, key: Path) -> None:
        host, _, port = backend.rpartition(":")
        self.backend = (host, int(port))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["h2"])
        self.taps: list[HeaderTap] = []
        self.handshake_failures = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def header_values(self, name: str) -> list[str]:
        return [v for tap in self.taps for v in tap.values(name)]

    async def __aenter__(self) -> TLSProxy:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, ssl=self.context, ssl_handshake_timeout=5
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        tap = HeaderTap()
        self.taps.append(tap)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backend)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, tap), self._pump(up_reader, writer, None)
            )
        except asyncio.CancelledError:
            pass  # the proxy is closing; ending quietly keeps asyncio from logging it
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap: HeaderTap | None
    ) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(65536):
                if tap is not None:
                    tap.feed(data)
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
