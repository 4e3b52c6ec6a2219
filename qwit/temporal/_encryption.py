"""Payload encryption: an AES-256-GCM codec for everything QWIT sends to Temporal.

With encryption on, the Temporal server (and whoever reads its database or
its histories) sees only ciphertext for flow args, step outputs, failure
details, failure messages and stack traces. It still sees what it needs to
schedule work: workflow ids, workflow and activity type names (flow and step
names), task queues, search attributes and error type names.

Keys are named: the first key encrypts, and every key listed decrypts, so a
key is rotated by putting a new one first and keeping the old ones until no
flow in flight (or history you want to read) uses them. Each key is 32 bytes,
written in base64, as ``id:base64key`` entries::

    QWIT_ENCRYPTION_KEYS="k2:<base64 32 bytes>,k1:<base64 32 bytes>"
    QWIT_ENCRYPTION_KEY_FILE=/run/secrets/qwit-keys   # one id:base64key a line

``cryptography`` is imported only when encryption is used
(``pip install 'qwit[encryption]'``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
)

from .._errors import QwitError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: ``id1:base64key,id2:base64key``: the first key encrypts, all decrypt.
ENCRYPTION_KEYS_ENV = "QWIT_ENCRYPTION_KEYS"
#: Path of a file of ``id:base64key`` lines (``#`` comments allowed).
ENCRYPTION_KEY_FILE_ENV = "QWIT_ENCRYPTION_KEY_FILE"

#: The ``encoding`` metadata of an encrypted payload.
ENCODING = b"binary/encrypted"
#: Payload metadata naming the key that encrypted it.
KEY_ID_METADATA = "encryption-key-id"

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the 96-bit nonce GCM is designed for
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class EncryptionError(QwitError, RuntimeError):
    """Encryption is misconfigured, or a payload can't be decrypted.

    Messages name key ids, never key material. It is a ``RuntimeError`` too,
    so a worker that can't start reports it in one line, like a failed
    connection.
    """


def new_encryption_key() -> str:
    """A fresh random 256-bit key, in base64, for ``id:base64key`` entries.

    Example:
        >>> entry = f"k1:{qwit.temporal.new_encryption_key()}"
    """
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _aesgcm_class() -> type[AESGCM]:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise EncryptionError(
            "payload encryption needs the cryptography package: pip install 'qwit[encryption]'"
        ) from None
    return AESGCM


def _decode_key(key_id: str, text: str, source: str) -> bytes:
    # Accept the URL-safe alphabet too: key files come from many tools.
    normalised = text.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(normalised, validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionError(f"{source}: key {key_id!r} is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(
            f"{source}: key {key_id!r} is {len(key)} bytes; AES-256-GCM needs {KEY_BYTES} "
            "(make one with qwit.temporal.new_encryption_key())"
        )
    return key


def parse_keys(text: str, *, source: str = "encryption keys") -> dict[str, bytes]:
    """Parse ``id:base64key`` entries, separated by commas or newlines.

    Blank entries and lines starting with ``#`` are ignored. The order is
    kept: the first key is the one that encrypts.

    Args:
        text: The entries.
        source: Where they come from, for error messages.

    Raises:
        EncryptionError: No keys, a malformed entry, a bad key id, a key that
            is not base64 or not 32 bytes, or a key id given twice. The
            message never contains key material.
    """
    keys: dict[str, bytes] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for position, entry in enumerate((e for e in entries if e and not e.startswith("#")), 1):
        key_id, sep, material = entry.partition(":")
        key_id = key_id.strip()
        if not sep:
            # Don't echo the entry: it may be a bare key.
            raise EncryptionError(f"{source}: entry {position} is not of the form id:base64key")
        if not _KEY_ID.fullmatch(key_id):
            raise EncryptionError(
                f"{source}: entry {position} has an invalid key id (letters, digits, '.', "
                "'_' and '-', at most 64)"
            )
        if key_id in keys:
            raise EncryptionError(f"{source}: key id {key_id!r} is given twice")
        keys[key_id] = _decode_key(key_id, material, source)
    if not keys:
        raise EncryptionError(f"{source}: no keys (expected id:base64key entries)")
    return keys


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload with AES-256-GCM.

    Each payload is serialised whole (data and metadata, so even its
    encoding is hidden) and encrypted under a fresh random 96-bit nonce; the
    result is the nonce then the ciphertext and tag, with the metadata
    ``encoding: binary/encrypted`` and ``encryption-key-id``. That is the
    format of Temporal's own encryption samples, so a codec server built
    from them can show QWIT's payloads in the Temporal UI. Payloads that are
    not encrypted decode unchanged, so encryption can be switched on while
    unencrypted flows are still in flight.

    Args:
        keys: Key id to 32-byte key, in order: the first key encrypts, every
            key decrypts.

    Raises:
        EncryptionError: No keys, a bad key id or length, or ``cryptography``
            is not installed.

    Example:
        >>> codec = EncryptionCodec.from_text("k2:...,k1:...")
        >>> client = await qwit.temporal.connect_temporal(
        ...     plugins=[qwit.temporal.QwitPlugin(encryption=codec)]
        ... )
    """

    def __init__(self, keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        items = list(keys.items() if isinstance(keys, Mapping) else keys)
        if not items:
            raise EncryptionError("encryption needs at least one key")
        aesgcm = _aesgcm_class()
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in items:
            if not _KEY_ID.fullmatch(key_id):
                raise EncryptionError(f"invalid encryption key id {key_id!r}")
            if key_id in self._ciphers:
                raise EncryptionError(f"encryption key id {key_id!r} is given twice")
            if not isinstance(key, (bytes, bytearray)):
                raise EncryptionError(
                    f"encryption key {key_id!r} must be bytes (for base64 text, use "
                    "EncryptionCodec.from_text)"
                )
            if len(key) != KEY_BYTES:
                raise EncryptionError(
                    f"encryption key {key_id!r} is {len(key)} bytes; AES-256-GCM needs {KEY_BYTES}"
                )
            self._ciphers[key_id] = aesgcm(bytes(key))
        self.key_id = items[0][0]
        """Id of the key that encrypts."""

    @property
    def key_ids(self) -> list[str]:
        """Ids of every key that decrypts, the encrypting one first."""
        return list(self._ciphers)

    def __repr__(self) -> str:
        return f"EncryptionCodec(key_ids={self.key_ids!r})"

    @classmethod
    def from_text(cls, text: str, *, source: str = "encryption keys") -> EncryptionCodec:
        """A codec for ``id:base64key`` entries (see ``parse_keys``)."""
        return cls(parse_keys(text, source=source))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EncryptionCodec:
        """A codec for the ``id:base64key`` lines of a file.

        Raises:
            EncryptionError: The file can't be read, or holds bad keys.
        """
        source = f"{ENCRYPTION_KEY_FILE_ENV} {os.fspath(path)}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise EncryptionError(f"{source}: can't read the key file: {err}") from None
        return cls.from_text(text, source=source)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EncryptionCodec | None:
        """The codec that ``QWIT_ENCRYPTION_KEYS`` or ``QWIT_ENCRYPTION_KEY_FILE``
        configures, or None when neither is set.

        A variable that is set but empty is an error, not "no encryption": a
        secret that failed to load must not silently turn encryption off.

        Raises:
            EncryptionError: Both are set, one is empty, or the keys are bad.
        """
        env = os.environ if environ is None else environ
        text, path = env.get(ENCRYPTION_KEYS_ENV), env.get(ENCRYPTION_KEY_FILE_ENV)
        if text is not None and path is not None:
            raise EncryptionError(
                f"set {ENCRYPTION_KEYS_ENV} or {ENCRYPTION_KEY_FILE_ENV}, not both"
            )
        if text is not None:
            return cls.from_text(text, source=ENCRYPTION_KEYS_ENV)
        if path is not None:
            if not path.strip():
                raise EncryptionError(f"{ENCRYPTION_KEY_FILE_ENV} is set but empty")
            return cls.from_file(path.strip())
        return None

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Encrypt each payload with the first key."""
        cipher = self._ciphers[self.key_id]
        key_id = self.key_id.encode()
        encoded = []
        for payload in payloads:
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), None)
            encoded.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id},
                    data=nonce + sealed,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Decrypt each encrypted payload with the key it names.

        Raises:
            EncryptionError: The payload names a key id this codec doesn't
                have, or fails authentication (altered, or a different key
                under the same id).
        """
        return [self._decrypt(p) if p.metadata.get("encoding") == ENCODING else p for p in payloads]

    def _decrypt(self, payload: Payload) -> Payload:
        from cryptography.exceptions import InvalidTag

        raw_id = payload.metadata.get(KEY_ID_METADATA, b"")
        key_id = raw_id.decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise EncryptionError(
                f"a payload is encrypted with key id {key_id!r}, which is not among this "
                f"process's keys ({', '.join(self._ciphers)}): add that key to "
                f"{ENCRYPTION_KEYS_ENV} or {ENCRYPTION_KEY_FILE_ENV}, after the current one"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
        except (InvalidTag, ValueError):
            raise EncryptionError(
                f"a payload encrypted with key id {key_id!r} failed authentication: it was "
                f"altered, or key {key_id!r} here is not the key that encrypted it"
            ) from None
        decoded = Payload()
        decoded.ParseFromString(plain)
        return decoded


class _Chained(PayloadCodec, WithSerializationContext):
    """A codec the user chose (compression, say), then encryption: encrypting
    last keeps the user's codec working on plaintext."""

    def __init__(self, inner: PayloadCodec, encryption: EncryptionCodec) -> None:
        self.inner = inner
        self.encryption = encryption

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.encryption.encode(await self.inner.encode(payloads))

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return await self.inner.decode(await self.encryption.decode(payloads))

    def with_context(self, context: SerializationContext) -> _Chained:
        if isinstance(self.inner, WithSerializationContext):
            return _Chained(self.inner.with_context(context), self.encryption)
        return self


def _encrypts(codec: PayloadCodec | None) -> bool:
    return isinstance(codec, EncryptionCodec) or (
        isinstance(codec, _Chained) and _encrypts(codec.encryption)
    )


def encrypted_converter(
    converter: DataConverter, encryption: EncryptionCodec | None
) -> DataConverter:
    """``converter`` with ``encryption`` after its own codec (if any), and with
    failure messages and stack traces moved into encrypted payloads.

    A converter that already encrypts with an ``EncryptionCodec`` keeps its
    codec, so applying this twice encrypts once. A custom failure converter
    is kept as it is.
    """
    codec = converter.payload_codec
    if encryption is not None and not _encrypts(codec):
        codec = encryption if codec is None else _Chained(codec, encryption)
    if not _encrypts(codec):
        return converter
    failures = converter.failure_converter_class
    if failures is DefaultFailureConverter:
        failures = DefaultFailureConverterWithEncodedAttributes
    if codec is converter.payload_codec and failures is converter.failure_converter_class:
        return converter
    return dataclasses.replace(converter, payload_codec=codec, failure_converter_class=failures)


__all__ = [
    "ENCODING",
    "ENCRYPTION_KEYS_ENV",
    "ENCRYPTION_KEY_FILE_ENV",
    "KEY_ID_METADATA",
    "EncryptionCodec",
    "EncryptionError",
    "encrypted_converter",
    "new_encryption_key",
    "parse_keys",
]
