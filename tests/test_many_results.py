"""Awaiting many flows at once from one process: every ``result()`` comes back.

Each waiting ``result()`` is a long poll, and Temporal caps concurrent long
polls per namespace and API (``frontend.namespaceCount``, 1,200 by default):
over the cap it answers ``RESOURCE_EXHAUSTED`` ("namespace concurrent poller
limit exceeded"). A client holds at most ``result_polls`` long polls (100 by
default), and waits out a refusal with backoff.

The quick tests lower the cap to 50 on a dev server of their own and await
150 flows (in the first, every flow waits at its first step for longer than
the SDK's own retries last, cut to 1 s there, so the waits pile up). The long run awaits
2,000 flows on the session's dev server (default cap)::

    QWIT_MANY_RESULTS=2000 pytest tests/test_many_results.py -k many_flows -s
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import temporalio.client

import qwit
from qwit.temporal import DevServer, TemporalEngine, connect_temporal, create_worker
from tests.test_rpc_errors import SHORT_RETRIES

#: The server's cap on concurrent long polls per namespace and API, in the quick tests.
LOW_LIMIT = 50
#: Flows awaited at once in the quick tests.
QUICK_FLOWS = 150
#: Flows awaited at once in the long run (0: skipped).
MANY = int(os.environ.get("QWIT_MANY_RESULTS", "0") or 0)
STEPS = 5
#: Seconds the flows of the first quick test wait at their first step: longer
#: than the SDK's own retries of a refusal last (``SHORT_RETRIES``).
HOLD = 4.0
GATE = asyncio.Event()


class Tiny(qwit.Step, abstract=True):
    """Adds its mark to the args; fails, not retried, where the flow says."""

    retry = qwit.Retry(max_attempts=1)
    position = 0

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("gated") and self.position == 1:
            await GATE.wait()
        if args.get("fail_at") == self.position:
            raise qwit.StepError(f"step {self.position} fails on purpose", retry=False)
        return {f"s{self.position}": True}

    async def step_back(self, args: dict[str, Any]) -> None:
        pass


class S1(Tiny, name="many.s1"):
    position = 1


class S2(Tiny, name="many.s2"):
    position = 2


class S3(Tiny, name="many.s3"):
    position = 3


class S4(Tiny, name="many.s4"):
    position = 4


class S5(Tiny, name="many.s5"):
    position = 5


class FiveSteps(qwit.Flow, name="many.five_steps"):
    def build_flow(self) -> None:
        for step in (S1, S2, S3, S4, S5):
            self.step(step)


def args_of(i: int, gated: bool) -> dict[str, Any]:
    """Every third flow fails, at a step that varies."""
    args: dict[str, Any] = {"i": i, "gated": gated}
    return {**args, "fail_at": i % STEPS + 1} if i % 3 == 0 else args


def check(i: int, outcome: Any, gated: bool) -> str:
    """How flow ``i`` ended, asserting it ended as it should."""
    args = args_of(i, gated)
    fail_at = args.get("fail_at")
    if fail_at is None:
        assert outcome == {**args, **{f"s{n}": True for n in range(1, STEPS + 1)}}, (i, outcome)
        return "completed"
    assert isinstance(outcome, qwit.FlowRolledBack), (i, repr(outcome))
    assert outcome.step == f"many.s{fail_at}"
    assert outcome.compensated == [f"many.s{n}" for n in range(fail_at, 0, -1)]
    return "rolled_back"


async def await_all(
    client: qwit.Client, flows: int, gated: bool
) -> tuple[dict[str, int], float, TemporalEngine]:
    """Start ``flows`` flows, await them all at once; (outcomes, seconds, engine).

    With ``gated``, the flows wait at their first step for ``HOLD`` seconds.
    """
    began = time.monotonic()
    GATE.clear()
    if gated:
        asyncio.get_running_loop().call_later(HOLD, GATE.set)
    else:
        GATE.set()
    starts = (client.start(FiveSteps, args_of(i, gated)) for i in range(flows))
    handles = await asyncio.gather(*starts)
    results = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
    took = time.monotonic() - began
    raw = [
        r for r in results if isinstance(r, BaseException) and not isinstance(r, qwit.FlowFailed)
    ]
    assert not raw, f"{len(raw)} result() calls raised, e.g. {raw[0]!r}"
    outcomes: dict[str, int] = {}
    for i, outcome in enumerate(results):
        kind = check(i, outcome, gated)
        outcomes[kind] = outcomes.get(kind, 0) + 1
    engine = client.engine()
    assert isinstance(engine, TemporalEngine)
    return outcomes, took, engine


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def low_limit_server() -> AsyncIterator[temporalio.client.Client]:
    """A dev server that takes at most LOW_LIMIT long polls per API at once."""
    config = [f"frontend.namespaceCount={LOW_LIMIT}"]
    async with DevServer(dynamic_config=config) as server:
        yield await connect_temporal(target_host=server.address, retry_config=SHORT_RETRIES)


async def _run_on(
    temporal: temporalio.client.Client, flows: int, gated: bool = False, **engine: Any
) -> Any:
    queue = f"many-{uuid.uuid4().hex[:8]}"
    client = await qwit.connect(temporal_client=temporal, task_queue=queue)
    for name, value in engine.items():
        setattr(client.engine(), name, value)
    async with create_worker(temporal, FiveSteps, task_queue=queue):
        return await await_all(client, flows, gated)


@pytest.mark.timeout(300)
async def test_results_outlast_the_servers_long_poll_limit(
    low_limit_server: temporalio.client.Client,
):
    # 100 long polls for a server that takes 50, for longer than the SDK
    # retries a refusal: the refusals are waited out.
    outcomes, took, engine = await _run_on(low_limit_server, QUICK_FLOWS, gated=True)
    assert outcomes == {"completed": 100, "rolled_back": 50}
    assert engine.result_retries["RESOURCE_EXHAUSTED"] > 0, engine.result_retries
    print(f"{QUICK_FLOWS} flows in {took:.1f} s, retries: {dict(engine.result_retries)}")


@pytest.mark.timeout(300)
async def test_a_client_holds_at_most_result_polls_long_polls(
    low_limit_server: temporalio.client.Client,
):
    # Under the server's limit: no refusal at all, the waits take turns.
    outcomes, took, engine = await _run_on(
        low_limit_server, QUICK_FLOWS, result_polls=LOW_LIMIT - 10
    )
    assert outcomes == {"completed": 100, "rolled_back": 50}
    assert engine.result_retries["RESOURCE_EXHAUSTED"] == 0, engine.result_retries
    print(f"{QUICK_FLOWS} flows in {took:.1f} s, retries: {dict(engine.result_retries)}")


@pytest.mark.skipif(not MANY, reason="set QWIT_MANY_RESULTS=2000 for the long run")
@pytest.mark.timeout(1800)
async def test_many_flows_awaited_at_once(temporal_client: temporalio.client.Client):
    outcomes, took, engine = await _run_on(temporal_client, MANY)
    failing = len([i for i in range(MANY) if i % 3 == 0])
    assert outcomes == {"completed": MANY - failing, "rolled_back": failing}
    print(
        f"\n{MANY} five-step flows awaited at once from one process: {took:.1f} s "
        f"({MANY / took:.1f} flows/s); result() retries: {dict(engine.result_retries)}"
    )
