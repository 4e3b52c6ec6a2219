"""Flows that wait, tested without waiting: Temporal's time-skipping test
server, and qwit.local's skipping clock. A step whose undo fails for good
only after its default back_retry (25 attempts over about forty minutes)
ends CompensationFailed in seconds."""

from __future__ import annotations

import time
from typing import Any

import pytest

import qwit
from qwit._timeskip import TimeSkipping, skipping_local_client

TRIES: dict[str, int] = {}


class Book(qwit.Step, name="ts.book"):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"booking": "b-1"}

    async def step_back(self, args: dict[str, Any]) -> None:
        TRIES[args["run"]] = TRIES.get(args["run"], 0) + 1
        raise RuntimeError("the refund service is down")


class Pay(qwit.Step, name="ts.pay"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> None:
        raise qwit.StepError("card declined", retry=False)


class Trip(qwit.Flow, name="ts.trip"):
    def build_flow(self) -> None:
        self.step(Book)
        self.step(Pay)


#: What the default back_retry waits between its 25 attempts, in seconds.
BACKOFF = sum(qwit.Retry(max_attempts=25, max_interval=120).delay(n) for n in range(1, 25))


async def test_forty_minutes_of_undo_retries_on_temporal_in_seconds():
    assert BACKOFF > 40 * 60 * 0.9
    began = time.monotonic()
    async with TimeSkipping.start() as ts, ts.worker(Trip):
        with pytest.raises(qwit.CompensationFailed) as failed:
            await ts.run(Trip, {"run": "temporal"})
    assert failed.value.failed_compensations == ["ts.book"]
    assert TRIES["temporal"] == 25
    assert time.monotonic() - began < 60


async def test_forty_minutes_of_undo_retries_on_local_in_seconds():
    client, clock = skipping_local_client()
    began = time.monotonic()
    with pytest.raises(qwit.CompensationFailed):
        await client.run(Trip, {"run": "local"})
    assert TRIES["local"] == 25
    assert clock.skipped == pytest.approx(BACKOFF)
    assert time.monotonic() - began < 10
    await client.close()


async def test_the_fixtures(qwit_time_skipping, qwit_local_time):
    async with qwit_time_skipping.worker(Trip):
        with pytest.raises(qwit.CompensationFailed):
            await qwit_time_skipping.run(Trip, {"run": "fixture-temporal"})
    client, clock = qwit_local_time
    with pytest.raises(qwit.CompensationFailed):
        await client.run(Trip, {"run": "fixture-local"})
    assert clock.skipped == pytest.approx(BACKOFF)
