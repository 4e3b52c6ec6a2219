"""Connecting through TLS with an API key, configured only with Temporal's env
config variables, for the client and a `qwit-worker` subprocess alike.

The dev server has no TLS, so a TLS-terminating proxy (tests/tls_proxy.py)
stands in front of it, with a CA and certificate made by the test. The proxy
also decodes the HTTP/2 request headers, to see the API key as it is sent.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import qwit
from qwit.temporal import (
    DevServer,
    TemporalConnectionError,
    connect_temporal,
    new_encryption_key,
)
from tests.secure_flows import Complete, RollBack
from tests.tls_proxy import Authority, TLSProxy

ROOT = Path(__file__).resolve().parent.parent
API_KEY = f"api-key-canary-{uuid.uuid4().hex}"
#: The encryption key of the TLS flows (module-level: the session replay needs it).
ENCRYPTION_KEY = new_encryption_key()

# qwit-worker with everything logged at DEBUG, the SDK's Rust core included.
WORKER_AT_DEBUG = [
    sys.executable,
    "-c",
    """
import logging
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")
from temporalio.runtime import (
    LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
)
Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(
    filter=TelemetryFilter(core_level="DEBUG", other_level="DEBUG"),
    forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
))))
import os, sys
from qwit._cli import worker_main
try:
    worker_main()
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
# Skip interpreter finalization: after a failed connect the SDK's Rust threads
# can abort it ("PyGILState_Release", temporalio/sdk-python issue 300), turning
# exit 1 into SIGABRT about one time in five.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
""",
    "tests.secure_flows",
]


@dataclasses.dataclass
class TLSFront:
    proxy: TLSProxy
    ca: Path
    other_ca: Path

    def env(self, **overrides: str) -> dict[str, str]:
        """Temporal's env config for the proxy, with the right CA and the API key."""
        return {
            "TEMPORAL_ADDRESS": self.proxy.address,
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(self.ca),
            "TEMPORAL_API_KEY": API_KEY,
            **overrides,
        }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_front(
    dev_server: DevServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TLSFront]:
    directory = tmp_path_factory.mktemp("tls")
    authority = Authority.create("QWIT test CA")
    cert, key = authority.issue_server_cert(directory)
    ca, other_ca = directory / "ca.pem", directory / "other-ca.pem"
    ca.write_bytes(authority.pem())
    other_ca.write_bytes(Authority.create("Someone else's CA").pem())
    async with TLSProxy(dev_server.address, cert, key) as proxy:
        yield TLSFront(proxy, ca, other_ca)


@pytest.fixture
def temporal_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No TEMPORAL_* or QWIT_* setting leaks in; the test sets its own."""
    for name in list(os.environ):
        if name.startswith(("TEMPORAL_", "QWIT_")):
            monkeypatch.delenv(name)
    return monkeypatch


def set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def assert_no_api_key(text: str) -> None:
    assert API_KEY not in text
    assert API_KEY[-16:] not in text  # nor a recognisable piece of it
    assert base64.b64encode(API_KEY.encode()).decode()[:20] not in text


async def test_a_flow_runs_end_to_end_through_tls(
    tls_front: TLSFront, temporal_env: pytest.MonkeyPatch, tmp_path: Path
):
    queue = f"tls-{uuid.uuid4().hex[:8]}"
    key = ENCRYPTION_KEY
    # The one setting for encryption, read by the client and the worker alike.
    env = tls_front.env(
        TEMPORAL_TLS_SERVER_NAME="localhost",
        QWIT_TASK_QUEUE=queue,
        QWIT_ENCRYPTION_KEYS=f"k1:{key}",
    )
    set_env(temporal_env, env)
    log = tmp_path / "worker.log"
    paths_before = len(tls_front.proxy.header_values(":path"))
    with log.open("w") as out:
        worker = subprocess.Popen(
            WORKER_AT_DEBUG, cwd=ROOT, env={**os.environ}, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        client = await qwit.connect()
        secret = uuid.uuid4().hex
        result = await asyncio.wait_for(client.run(Complete, {"secret": secret}), 30)
        assert result["remembered"] == f"output of {secret}"
        with pytest.raises(qwit.FlowRolledBack) as info:
            await asyncio.wait_for(client.run(RollBack, {"secret": secret}), 30)
        assert info.value.compensated == ["secure.explode", "secure.remember"]
        await client.close()
    finally:
        # Wait without blocking the loop: the proxy runs on it.
        worker.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.to_thread(worker.wait, 30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    output = log.read_text()
    assert "serving tests.secure_flows" in output
    assert "DEBUG" in output  # the log really was at DEBUG
    assert_no_api_key(output)
    assert key not in output and key[:16] not in output  # nor the encryption key

    # Both processes went through the proxy, and every request carried the key
    # as Temporal's API key auth does.
    paths = tls_front.proxy.header_values(":path")[paths_before:]
    assert any(p.endswith("/PollActivityTaskQueue") for p in paths)  # the worker
    assert any(p.endswith("/StartWorkflowExecution") for p in paths)  # the client
    assert not [tap.error for tap in tls_front.proxy.taps if tap.error]
    assert set(tls_front.proxy.header_values("authorization")) == {f"Bearer {API_KEY}"}
    per_request = [
        dict(request)
        for tap in tls_front.proxy.taps
        for request in tap.requests
        if dict(request).get(":path", "").startswith("/temporal.api.workflowservice")
    ]
    assert per_request and all(r.get("authorization") for r in per_request)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"ca": "other"}, "is not signed by a CA this client trusts"),
        ({"TEMPORAL_TLS_SERVER_NAME": "orders.example.com"}, "not valid for the name"),
    ],
)
async def test_verification_failures_fail_closed_with_a_clear_error(
    tls_front: TLSFront,
    temporal_env: pytest.MonkeyPatch,
    overrides: dict[str, str],
    expected: str,
):
    env = tls_front.env(**{k: v for k, v in overrides.items() if k != "ca"})
    if overrides.get("ca") == "other":
        env["TEMPORAL_TLS_SERVER_CA_CERT_PATH"] = str(tls_front.other_ca)
    set_env(temporal_env, env)
    connections_before = len(tls_front.proxy.taps)
    with pytest.raises(TemporalConnectionError) as info:
        await asyncio.wait_for(connect_temporal(), 30)
    error = info.value
    message = str(error)
    assert message.startswith(f"can't connect to Temporal at {tls_front.proxy.address} ")
    assert "TLS on" in message and "TLS verification failed" in message and expected in message
    assert error.tls_verification_failed and error.address == tls_front.proxy.address
    assert isinstance(error, qwit.QwitError)
    assert isinstance(error.__cause__, RuntimeError)  # the SDK's error, kept
    assert_no_api_key("".join(traceback.format_exception(error)) + repr(error))
    # nothing got through: no request reached the server
    assert not any(tap.requests for tap in tls_front.proxy.taps[connections_before:])

    # The flow API fails the same way, when it first needs Temporal.
    client = await qwit.connect()
    with pytest.raises(TemporalConnectionError, match="TLS verification failed"):
        await client.start(Complete, {"secret": "x"})


async def test_the_worker_fails_closed_in_one_line(
    tls_front: TLSFront, temporal_env: pytest.MonkeyPatch
):
    env = {
        **os.environ,
        **tls_front.env(TEMPORAL_TLS_SERVER_CA_CERT_PATH=str(tls_front.other_ca)),
    }
    # asyncio's subprocess, so the proxy (on this loop) can answer meanwhile
    proc = await asyncio.create_subprocess_exec(
        *WORKER_AT_DEBUG,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    output = stdout.decode() + stderr.decode()
    assert proc.returncode == 1, output
    assert (
        f"qwit-worker: can't connect to Temporal at {tls_front.proxy.address} (namespace "
        "'default', TLS on): TLS verification failed"
    ) in stderr.decode()
    assert_no_api_key(output)


async def test_tls_to_a_server_without_tls(
    dev_server: DevServer, tls_front: TLSFront, temporal_env: pytest.MonkeyPatch
):
    set_env(temporal_env, {**tls_front.env(), "TEMPORAL_ADDRESS": dev_server.address})
    with pytest.raises(TemporalConnectionError, match="TLS handshake failed") as info:
        await asyncio.wait_for(connect_temporal(), 30)
    assert not info.value.tls_verification_failed
    assert_no_api_key(str(info.value))


async def test_plaintext_to_a_tls_server_says_to_turn_tls_on(
    tls_front: TLSFront, temporal_env: pytest.MonkeyPatch
):
    set_env(temporal_env, {"TEMPORAL_ADDRESS": tls_front.proxy.address})
    with pytest.raises(TemporalConnectionError, match=r"TLS off.*set TEMPORAL_TLS=true"):
        await asyncio.wait_for(connect_temporal(), 30)


def test_a_missing_ca_file_is_named(temporal_env: pytest.MonkeyPatch, tmp_path: Path):
    missing = tmp_path / "no-such-ca.pem"
    set_env(temporal_env, {"TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(missing)})
    from qwit.temporal import connect_config

    with pytest.raises(
        TemporalConnectionError, match=f"TEMPORAL_TLS_SERVER_CA_CERT_PATH={missing}"
    ):
        connect_config()


async def test_nothing_listening(temporal_env: pytest.MonkeyPatch):
    from qwit.temporal._devserver import free_port

    address = f"127.0.0.1:{free_port()}"
    set_env(temporal_env, {"TEMPORAL_ADDRESS": address})
    with pytest.raises(
        TemporalConnectionError, match="refused: is a Temporal server running"
    ) as info:
        await asyncio.wait_for(connect_temporal(), 30)
    assert info.value.address == address and not info.value.tls
