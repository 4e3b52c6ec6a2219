"""Payload encryption: the codec itself, its configuration, and what the
Temporal server gets to see with it on (and off)."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import temporalio.client
from temporalio.api.common.v1 import Payload
from temporalio.client import WorkflowHistory
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)
from temporalio.worker import Replayer

import qwit
from qwit._saga import ABORT_HELD
from qwit.temporal import (
    DevServer,
    EncryptionCodec,
    EncryptionError,
    QwitPlugin,
    connect_temporal,
    create_worker,
    new_encryption_key,
)
from qwit.temporal._workflow import START_FINISHED
from tests import secure_flows
from tests.secure_flows import Complete, RollBack, WaitThenFinish

KEY_A = base64.b64decode(new_encryption_key())
KEY_B = base64.b64decode(new_encryption_key())


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


@pytest.fixture(autouse=True)
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test chooses its keys; none leak in from the environment."""
    monkeypatch.delenv("QWIT_ENCRYPTION_KEYS", raising=False)
    monkeypatch.delenv("QWIT_ENCRYPTION_KEY_FILE", raising=False)


# -- the codec ---------------------------------------------------------------------


async def test_round_trip_hides_data_and_metadata():
    codec = EncryptionCodec({"a": KEY_A})
    original = [payload("the secret"), payload("the secret")]
    encoded = await codec.encode(original)
    assert len(encoded) == 2
    for p in encoded:
        assert p.metadata["encoding"] == b"binary/encrypted"
        assert p.metadata["encryption-key-id"] == b"a"
        assert set(p.metadata) == {"encoding", "encryption-key-id"}  # json/plain is hidden
        assert b"secret" not in p.SerializeToString()
    # a fresh nonce for every payload: equal plaintexts, different ciphertexts
    assert encoded[0].data[:12] != encoded[1].data[:12]
    assert encoded[0].data != encoded[1].data
    assert await codec.decode(encoded) == original


async def test_unencrypted_payloads_decode_unchanged():
    codec = EncryptionCodec({"a": KEY_A})
    plain = [payload("from before encryption was on")]
    assert await codec.decode(plain) == plain


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag", "key id", "truncated"])
async def test_tampering_is_detected(where: str):
    codec = EncryptionCodec({"a": KEY_A, "b": KEY_B})
    [sealed] = await codec.encode([payload("pay 10 EUR")])
    data = bytearray(sealed.data)
    if where == "nonce":
        data[0] ^= 1
    elif where == "ciphertext":
        data[14] ^= 1
    elif where == "tag":
        data[-1] ^= 1
    elif where == "truncated":
        data = data[:10]
    else:
        # relabelled to another key: that key doesn't authenticate it
        sealed.metadata["encryption-key-id"] = b"b"
    sealed.data = bytes(data)
    with pytest.raises(EncryptionError, match="failed authentication") as info:
        await codec.decode([sealed])
    assert b64(KEY_A) not in str(info.value) and b64(KEY_B) not in str(info.value)


async def test_unknown_key_id_names_the_key_id_never_the_key():
    [sealed] = await EncryptionCodec({"old-2023": KEY_A}).encode([payload("x")])
    with pytest.raises(EncryptionError, match="key id 'old-2023'") as info:
        await EncryptionCodec({"new": KEY_B}).decode([sealed])
    assert "new" in str(info.value)  # the keys it does have, by id
    assert b64(KEY_A) not in str(info.value) and b64(KEY_B) not in str(info.value)


async def test_rotation_first_key_encrypts_every_key_decrypts():
    old = EncryptionCodec({"a": KEY_A})
    rotated = EncryptionCodec.from_text(f"b:{b64(KEY_B)}, a:{b64(KEY_A)}")
    assert rotated.key_id == "b" and rotated.key_ids == ["b", "a"]
    [from_old] = await old.encode([payload("old")])
    [from_new] = await rotated.encode([payload("new")])
    assert from_new.metadata["encryption-key-id"] == b"b"
    assert await rotated.decode([from_old, from_new]) == [payload("old"), payload("new")]
    with pytest.raises(EncryptionError, match="key id 'b'"):
        await old.decode([from_new])


async def test_wire_format_is_that_of_temporals_encryption_samples():
    """nonce (12 bytes) + AES-GCM ciphertext and tag of the serialised payload,
    no associated data: what the codec servers of Temporal's samples read."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    codec = EncryptionCodec({"sample": KEY_A})
    [sealed] = await codec.encode([payload("x")])
    plain = AESGCM(KEY_A).decrypt(sealed.data[:12], sealed.data[12:], None)
    assert Payload.FromString(plain) == payload("x")
    nonce = b"\x01" * 12
    theirs = Payload(
        metadata={"encoding": b"binary/encrypted", "encryption-key-id": b"sample"},
        data=nonce + AESGCM(KEY_A).encrypt(nonce, payload("y").SerializeToString(), None),
    )
    assert await codec.decode([theirs]) == [payload("y")]


def test_repr_names_key_ids_only():
    codec = EncryptionCodec({"b": KEY_B, "a": KEY_A})
    assert repr(codec) == "EncryptionCodec(key_ids=['b', 'a'])"


# -- configuration -----------------------------------------------------------------


def test_keys_from_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QWIT_ENCRYPTION_KEYS", f"b:{b64(KEY_B)},a:{b64(KEY_A)}")
    plugin = QwitPlugin()
    assert isinstance(plugin.encryption, EncryptionCodec)
    assert plugin.encryption.key_ids == ["b", "a"]
    assert QwitPlugin(encryption=False).encryption is None


def test_no_env_no_encryption():
    assert QwitPlugin().encryption is None
    assert EncryptionCodec.from_env({}) is None


def test_keys_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    urlsafe = base64.urlsafe_b64encode(KEY_A).decode()
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2025-06\nb:{b64(KEY_B)}\n\na:{urlsafe}\n")
    monkeypatch.setenv("QWIT_ENCRYPTION_KEY_FILE", str(path))
    codec = QwitPlugin().encryption
    assert codec is not None and codec.key_ids == ["b", "a"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QWIT_ENCRYPTION_KEYS": ""}, "no keys"),
        ({"QWIT_ENCRYPTION_KEYS": " , "}, "no keys"),
        ({"QWIT_ENCRYPTION_KEYS": "a:" + b64(KEY_A)[:21]}, "key 'a' is not valid base64"),
        ({"QWIT_ENCRYPTION_KEYS": "a:" + b64(KEY_A[:16])}, "key 'a' is 16 bytes; AES-256-GCM"),
        ({"QWIT_ENCRYPTION_KEYS": "a:" + b64(KEY_A + b"x")}, "key 'a' is 33 bytes"),
        ({"QWIT_ENCRYPTION_KEYS": b64(KEY_A)}, "entry 1 is not of the form id:base64key"),
        ({"QWIT_ENCRYPTION_KEYS": f"a:{b64(KEY_A)},a:{b64(KEY_B)}"}, "'a' is given twice"),
        ({"QWIT_ENCRYPTION_KEYS": f"bad id:{b64(KEY_A)}"}, "entry 1 has an invalid key id"),
        ({"QWIT_ENCRYPTION_KEY_FILE": ""}, "QWIT_ENCRYPTION_KEY_FILE is set but empty"),
        ({"QWIT_ENCRYPTION_KEY_FILE": "/no/such/file"}, "can't read the key file"),
        (
            {"QWIT_ENCRYPTION_KEYS": f"a:{b64(KEY_A)}", "QWIT_ENCRYPTION_KEY_FILE": "/k"},
            "not both",
        ),
    ],
)
def test_bad_key_material_fails_at_startup(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(EncryptionError, match=message) as info:
        QwitPlugin()
    assert isinstance(info.value, qwit.QwitError)
    for key in (KEY_A, KEY_B):
        assert b64(key) not in str(info.value)
        assert b64(key)[:20] not in str(info.value)


def test_bad_keys_given_in_code():
    with pytest.raises(EncryptionError, match="'a' is 16 bytes"):
        EncryptionCodec({"a": KEY_A[:16]})
    with pytest.raises(EncryptionError, match="at least one key"):
        EncryptionCodec({})
    with pytest.raises(EncryptionError, match="must be bytes"):
        EncryptionCodec({"a": b64(KEY_A)})  # type: ignore[dict-item]


def test_without_cryptography_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    import sys

    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    monkeypatch.setenv("QWIT_ENCRYPTION_KEYS", f"a:{b64(KEY_A)}")
    with pytest.raises(EncryptionError, match=r"pip install 'qwit\[encryption\]'"):
        QwitPlugin()


def test_qwit_imports_without_cryptography():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "import qwit, qwit.temporal\n"
        "assert qwit.temporal.QwitPlugin().encryption is None\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


class Compress(PayloadCodec):
    """Stands for a user's own codec: marks what it saw."""

    async def encode(self, payloads: Any) -> list[Payload]:
        return [
            Payload(metadata={"encoding": b"user"}, data=p.SerializeToString()) for p in payloads
        ]

    async def decode(self, payloads: Any) -> list[Payload]:
        decoded = []
        for p in payloads:
            assert p.metadata["encoding"] == b"user"
            inner = Payload()
            inner.ParseFromString(p.data)
            decoded.append(inner)
        return decoded


async def test_a_codec_set_by_the_user_is_kept_and_encrypted_after():
    codec = EncryptionCodec({"a": KEY_A})
    plugin = QwitPlugin(encryption=codec)
    user = DataConverter(payload_codec=Compress())
    config = plugin.configure_client({"data_converter": user})  # type: ignore[typeddict-item]
    converter = config["data_converter"]
    assert converter.failure_converter_class is DefaultFailureConverterWithEncodedAttributes
    [sealed] = await converter.encode(["hello"])
    assert sealed.metadata["encoding"] == b"binary/encrypted"
    assert await converter.decode([sealed]) == ["hello"]
    # applying the plugin again encrypts once, not twice
    again = plugin.configure_client({"data_converter": converter})  # type: ignore[typeddict-item]
    assert again["data_converter"] is converter
    # an encryption codec the user set themselves is kept as it is
    own = EncryptionCodec({"b": KEY_B})
    mine = QwitPlugin(encryption=codec).configure_client(
        {"data_converter": DataConverter(payload_codec=own)}  # type: ignore[typeddict-item]
    )
    assert mine["data_converter"].payload_codec is own


# -- on a real server: the canary --------------------------------------------------


@dataclasses.dataclass
class Exposure:
    """Where a secret was found, and how much was searched."""

    in_histories: list[str]
    in_database: list[str]
    events: int
    payloads: int
    unencrypted_payloads: list[str]
    database_bytes: int


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _history_exposure(history: WorkflowHistory, secret: str) -> tuple[list[str], list[str], int]:
    """Where the secret shows in a history's JSON (plain strings, and base64
    payload data decoded), and which payloads are not encrypted."""
    found, unencrypted, payloads = [], [], 0
    text = history.to_json()
    if secret in text:
        found.append(f"{history.workflow_id}: JSON text")
    for path, node in _walk(json.loads(text)):
        if isinstance(node, dict) and "metadata" in node and "encoding" in node["metadata"]:
            payloads += 1
            encoding = base64.b64decode(node["metadata"]["encoding"])
            # Search attributes must stay readable: the server indexes them.
            # A patch marker's id is written by Temporal itself, outside the
            # data converter: it may be plain, if it is one of QWIT's own
            # constants (no user data), and nothing else.
            patch = ".markerRecordedEventAttributes.details.patch-data." in path and (
                json.loads(base64.b64decode(node.get("data", "")) or b"{}").get("id")
                in KNOWN_PATCHES
            )
            if encoding != b"binary/encrypted" and ".searchAttributes." not in path and not patch:
                unencrypted.append(f"{path} ({encoding.decode()})")
        data = node.get("data") if isinstance(node, dict) else None
        if isinstance(data, str) and secret.encode() in base64.b64decode(data):
            found.append(f"{history.workflow_id}: {path}.data")
    for event in history.events:
        if secret.encode() in event.SerializeToString():
            found.append(f"{history.workflow_id}: event {event.event_id}")
    return found, unencrypted, payloads


#: The ids of QWIT's ``workflow.patched`` gates (plain in every history).
KNOWN_PATCHES = {ABORT_HELD, START_FINISHED}


async def histories(
    temporal: temporalio.client.Client, workflow_id: str
) -> AsyncIterator[WorkflowHistory]:
    """A workflow's history, then its children's, to any depth."""
    history = await temporal.get_workflow_handle(workflow_id).fetch_history()
    yield history
    for event in history.events:
        if event.HasField("child_workflow_execution_started_event_attributes"):
            child = event.child_workflow_execution_started_event_attributes.workflow_execution
            async for grandchild in histories(temporal, child.workflow_id):
                yield grandchild


def database_files(db: Path) -> list[Path]:
    return [p for p in (db, db.with_name(db.name + "-wal")) if p.exists()]


async def expose(secret: str, tmp_path: Path) -> Exposure:
    """Run flows that carry the secret everywhere on a SQLite dev server, check
    they behave, then search the histories and the database for the secret.
    Encryption is whatever the environment says, for client and worker alike."""
    db = tmp_path / "temporal.db"
    async with DevServer(db_filename=db) as server:
        temporal = await connect_temporal(target_host=server.address)
        queue = f"secure-{uuid.uuid4().hex[:8]}"
        client = qwit.Client(temporal_client=temporal, task_queue=queue)
        async with create_worker(temporal, secure_flows, task_queue=queue):
            done = await client.start(Complete, {"secret": secret}, id=f"done-{queue}")
            assert await done.result() == {"secret": secret, "remembered": f"output of {secret}"}
            failed = await client.start(RollBack, {"secret": secret}, id=f"failed-{queue}")
            with pytest.raises(qwit.FlowRolledBack) as info:
                await failed.result()
        # the outcome, message included, reached the client whole
        assert info.value.step == "secure.explode"
        assert info.value.reason == f"RuntimeError: card declined for {secret}"
        assert info.value.compensated == ["secure.explode", "secure.remember"]
        assert (await failed.state()).status == "rolled_back"

        found: list[str] = []
        unencrypted: list[str] = []
        events = payloads = 0
        for flow_id in (done.id, failed.id):
            async for history in histories(temporal, flow_id):
                events += len(history.events)
                where, plain, count = _history_exposure(history, secret)
                found += where
                unencrypted += plain
                payloads += count
        assert events > 20  # the child's history was searched too

        in_db, scanned = [], 0
        for path in database_files(db):
            data = path.read_bytes()
            scanned += len(data)
            if secret.encode() in data:
                in_db.append(path.name)
    # Stopping the server checkpoints its write-ahead log into the file.
    for path in database_files(db):
        data = path.read_bytes()
        scanned += len(data)
        if secret.encode() in data:
            in_db.append(f"{path.name} (stopped)")
    return Exposure(found, in_db, events, payloads, unencrypted, scanned)


async def test_canary_never_reaches_the_server_in_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("QWIT_ENCRYPTION_KEYS", f"k1:{b64(KEY_A)}")
    secret = f"canary-{uuid.uuid4().hex}"
    exposure = await expose(secret, tmp_path)
    print(exposure)
    assert exposure.in_histories == []
    assert exposure.in_database == []
    assert exposure.payloads > 20
    assert exposure.unencrypted_payloads == []
    assert exposure.database_bytes > 100_000


async def test_negative_control_without_encryption_the_canary_is_found(tmp_path: Path):
    secret = f"canary-{uuid.uuid4().hex}"
    exposure = await expose(secret, tmp_path)
    print(exposure)
    assert exposure.in_histories
    assert any("JSON text" in where for where in exposure.in_histories)  # failure messages
    assert any(".data" in where for where in exposure.in_histories)  # payloads
    assert exposure.in_database
    assert exposure.unencrypted_payloads


async def test_keys_given_in_code_through_qwit_connect(dev_server: DevServer, task_queue: str):
    codec = EncryptionCodec({"code": KEY_A})
    client = await qwit.connect(
        task_queue=task_queue,
        target_host=dev_server.address,
        plugins=[QwitPlugin(encryption=codec)],
    )
    worker_client = await encrypted_client(dev_server.address, {"code": KEY_A})
    async with create_worker(worker_client, secure_flows, task_queue=task_queue):
        handle = await client.start(Complete, {"secret": "s3cr3t"})
        assert (await handle.result())["remembered"] == "output of s3cr3t"
    history = await worker_client.get_workflow_handle(handle.id).fetch_history()
    assert key_ids(history) == {"code"}
    assert "s3cr3t" not in history.to_json()
    await client.close()


# -- rotation on a real server ----------------------------------------------------


async def encrypted_client(address: str, keys: dict[str, bytes]) -> temporalio.client.Client:
    return await connect_temporal(
        target_host=address, plugins=[QwitPlugin(encryption=EncryptionCodec(keys))]
    )


def key_ids(history: WorkflowHistory) -> set[str]:
    ids = set()
    for _, node in _walk(json.loads(history.to_json())):
        if isinstance(node, dict) and "encryption-key-id" in node.get("metadata", {}):
            ids.add(base64.b64decode(node["metadata"]["encryption-key-id"]).decode())
    return ids


async def test_rotation_old_payloads_still_decrypt(dev_server: DevServer, task_queue: str):
    from tests.test_temporal_reactions import wait_status

    secret = f"canary-{uuid.uuid4().hex}"
    with_a = await encrypted_client(dev_server.address, {"a": KEY_A})
    client_a = qwit.Client(temporal_client=with_a, task_queue=task_queue)
    async with create_worker(with_a, secure_flows, task_queue=task_queue):
        waiting = await client_a.start(WaitThenFinish, {"secret": secret})
        await wait_status(waiting, "waiting")
        finished = await client_a.start(Complete, {"secret": secret})
        await finished.result()

    # Rotate: B encrypts from now on; A still decrypts. A new worker has no
    # cache, so it replays the waiting flow's history, written under A.
    with_ba = await encrypted_client(dev_server.address, {"b": KEY_B, "a": KEY_A})
    client_ba = qwit.Client(temporal_client=with_ba, task_queue=task_queue)
    async with create_worker(with_ba, secure_flows, task_queue=task_queue):
        handle = client_ba.get_handle(waiting.id)
        await handle.react(qwit.RETRY, args={"explode": False})
        result = await handle.result()
    assert result["remembered"] == f"output of {secret}"
    history = await with_ba.get_workflow_handle(waiting.id).fetch_history()
    assert key_ids(history) == {"a", "b"}
    assert (await client_ba.get_handle(finished.id).result())["secret"] == secret
    # the whole mixed history replays with the rotated keys
    replayer = Replayer(
        workflows=[], plugins=[QwitPlugin(encryption=EncryptionCodec({"b": KEY_B, "a": KEY_A}))]
    )
    await replayer.replay_workflow(history)

    # Once A is dropped, what A encrypted can't be read, and the error says which key.
    with_b = await encrypted_client(dev_server.address, {"b": KEY_B})
    with pytest.raises(EncryptionError, match="key id 'a'"):
        await with_b.get_workflow_handle(finished.id).result()
