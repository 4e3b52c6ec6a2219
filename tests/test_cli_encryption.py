"""`qwit list` and `qwit status` on flows encrypted with a key the CLI lacks (none
set, or rotated out): listed as undecryptable, and the status names the key."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import pytest

import qwit
from qwit.temporal import (
    DevServer,
    EncryptionCodec,
    QwitPlugin,
    connect_temporal,
    create_worker,
    new_encryption_key,
)
from qwit.testing import wait_for_status
from tests import secure_flows
from tests.clirun import Done
from tests.clirun import qwit as run_qwit
from tests.secure_flows import Complete, RollBack, WaitThenFinish

KEY_A = new_encryption_key()
KEY_B = new_encryption_key()
ROTATED = {"QWIT_ENCRYPTION_KEYS": f"cli-b:{KEY_B}"}  # cli-a's flows are from before it
NO_KEYS: dict[str, str] = {}


@pytest.fixture
async def encrypted(dev_server: DevServer, task_queue: str) -> Any:
    """A client and a worker of key ``a`` on the test's task queue."""
    temporal = await connect_temporal(
        target_host=dev_server.address,
        plugins=[QwitPlugin(encryption=EncryptionCodec({"cli-a": base64.b64decode(KEY_A)}))],
    )
    client = qwit.Client(temporal_client=temporal, task_queue=task_queue)
    async with create_worker(temporal, secure_flows, task_queue=task_queue) as worker:
        yield client, worker


async def cli(server: DevServer, *args: str, **env: str) -> Done:
    return await run_qwit(*args, TEMPORAL_ADDRESS=server.address, **env)


async def listed(server: DevServer, flow_id: str, flow: str, **env: str) -> dict[str, Any]:
    """The row of ``flow_id`` in `qwit list --json --flow FLOW`, once visibility has it."""
    deadline = time.monotonic() + 20
    while True:
        done = await cli(server, "list", "--json", "--flow", flow, **env)
        assert done.code == 0, done.err
        assert "Traceback" not in done.err
        rows = {row["flow_id"]: row for row in json.loads(done.out)}
        if flow_id in rows and rows[flow_id]["status"] != "running":
            return rows[flow_id]
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.3)


@pytest.mark.parametrize("env", [NO_KEYS, ROTATED], ids=["no-keys", "rotated-out"])
async def test_list_shows_undecryptable_flows_and_status_names_the_key(
    dev_server: DevServer, encrypted: Any, env: dict[str, str]
):
    client, _ = encrypted
    run = uuid.uuid4().hex[:8]
    done = await client.start(Complete, {"secret": "s"}, id=f"enc-done-{run}")
    await done.result()
    # A flow of an older QWIT, which published no outcome when it failed: to
    # list it, the CLI must read the flow itself.
    old = client.prepare(RollBack, {"secret": "s"}, id=f"enc-failed-{run}")
    failed = await client.engine().start(RollBack, old.model_copy(update={"execution": None}))
    with pytest.raises(qwit.FlowRolledBack):
        await failed.result()
    # A flow of this version publishes its outcome (QwitStatus): search
    # attributes are not encrypted, so it reads without the key.
    new = await client.start(RollBack, {"secret": "s"}, id=f"enc-new-{run}")
    with pytest.raises(qwit.FlowRolledBack):
        await new.result()
    new_row = await listed(dev_server, new.id, "secure.roll_back", **env)
    assert (new_row["status"], new_row["note"]) == ("rolled_back", "")

    row = await listed(dev_server, failed.id, "secure.roll_back", **env)
    assert row["flow"] == "secure.roll_back"
    assert row["status"] == "failed"  # Temporal's word: QWIT's can't be read
    assert row["note"].startswith("undecryptable: encrypted with key id 'cli-a'"), row
    lacking = "this process has only 'cli-b'" if env else "no keys are set here"
    assert lacking in row["note"]
    # the others are listed as usual
    assert (await listed(dev_server, done.id, "secure.complete", **env))["note"] == ""
    table = await cli(dev_server, "list", "--flow", "secure.roll_back", **env)
    assert table.code == 0, table.err
    line = next(line for line in table.out.splitlines() if failed.id in line)
    assert "undecryptable" in line

    for flow_id in (failed.id, done.id):
        status = await cli(dev_server, "status", flow_id, **env)
        assert status.code == 1
        assert (
            f"can't read flow '{flow_id}': encrypted with key id 'cli-a', which this process "
            in (status.err)
        )
        assert lacking in status.err
        assert "worker" not in status.err and "Traceback" not in status.err

    # with the key, all is readable again
    both = {"QWIT_ENCRYPTION_KEYS": f"cli-b:{KEY_B},cli-a:{KEY_A}"}
    assert (await listed(dev_server, failed.id, "secure.roll_back", **both))["status"] == (
        "rolled_back"
    )
    status = await cli(dev_server, "status", failed.id, **both)
    assert status.code == 0, status.err


async def test_status_of_a_running_flow_whose_state_comes_encrypted(
    dev_server: DevServer, encrypted: Any
):
    client, _ = encrypted
    handle = await client.start(WaitThenFinish, {"secret": "s"}, id=f"enc-wait-{uuid.uuid4().hex}")
    try:
        await wait_for_status(handle, "waiting", 20)
        # the worker answers, with a state encrypted under a key this process lacks
        status = await cli(dev_server, "status", handle.id, **ROTATED)
        assert status.code == 1
        assert f"can't read flow '{handle.id}': encrypted with key id 'cli-a'" in status.err
        assert "this process has only 'cli-b'" in status.err
        assert "Traceback" not in status.err
    finally:
        await handle.cancel()
