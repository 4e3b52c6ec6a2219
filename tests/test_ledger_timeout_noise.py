"""A plain step that stops, with an error, after its deadline: the attempt
timed out, and nothing else is reported about it.

Fails with the library as it is: ``_Deadline.run_thread`` (qwit/_runner.py)
raises the timeout without reading the thread's own error, so asyncio logs
"Future exception was never retrieved" for every such attempt (seen in every
property-test run with a timing-out plain step).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import pytest

import qwit


class StopsLate(qwit.Step, name="noise.stops_late"):
    retry = qwit.Retry(max_attempts=1)

    def step_forward(self, args: dict[str, Any]) -> None:
        time.sleep(0.5)  # past its deadline: it sees `cancelled` only now
        if qwit.context().cancelled:
            raise RuntimeError("stopped: timed out")


class StopsLateFlow(qwit.Flow, name="noise.flow"):
    def build_flow(self) -> None:
        self.step(StopsLate, timeout=0.2, timeout_grace=5)


async def test_a_plain_step_stopping_after_its_deadline_logs_no_unretrieved_error(caplog):
    client = await qwit.connect(backend=qwit.local)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(qwit.FlowRolledBack) as failed:
            await client.run(StopsLateFlow, {})
        gc.collect()
        await asyncio.sleep(0.1)
    await client.close()
    assert failed.value.error_type == "builtins.TimeoutError"
    assert "exception was never retrieved" not in caplog.text
