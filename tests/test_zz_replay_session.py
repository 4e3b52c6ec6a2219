"""Every flow this test session ran on its dev server replays without a
nondeterminism error. (Named to run last: it replays what the others recorded.)"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
import temporalio.client
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from qwit.temporal import EncryptionCodec, QwitPlugin


async def test_every_history_of_the_session_replays(temporal_client: temporalio.client.Client):
    from tests.test_encryption import KEY_A, KEY_B
    from tests.test_tls import ENCRYPTION_KEY

    executions = temporal_client.list_workflows(
        'WorkflowType="qwit.Flow" AND ExecutionStatus != "Running"'
    )
    histories = [history async for history in executions.map_histories()]
    if not histories:
        pytest.skip("no flow ran on the session's dev server before this test")

    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    # The encryption tests' flows are encrypted; unencrypted payloads decode as is.
    codec = EncryptionCodec(
        {"a": KEY_A, "b": KEY_B, "code": KEY_A, "k1": base64.b64decode(ENCRYPTION_KEY)}
    )
    replayer = Replayer(workflows=[], plugins=[QwitPlugin(encryption=codec)])
    results = await replayer.replay_workflows(each(), raise_on_replay_failure=False)
    ids = {h.run_id: h.workflow_id for h in histories}
    failures = {ids.get(run, run): repr(err) for run, err in results.replay_failures.items()}
    print(f"replayed {len(histories)} histories: {len(failures)} failures")
    assert failures == {}
