"""``qwit run -v`` and ``qwit status -v`` show where the failing step raised its
error: the step's own traceback, carried by the flow's failure as data."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from qwit.temporal import DevServer
from tests import verbose_flows
from tests.clirun import qwit


def _story(err: str) -> str:
    """What ``qwit run`` says of the failure, from the reason on."""
    return err[err.index("reason: KeyError: 'pear'") :]


async def test_run_and_status_verbose_show_the_failing_steps_traceback(
    dev_server: DevServer, task_queue: str, worker: Any
):
    flow_id = f"tb-{uuid.uuid4().hex[:8]}"
    common = ("--args", json.dumps({"item": "pear"}), "--no-worker", "--task-queue", task_queue)
    # The worker runs in this test's process: its log is not qwit run's output.
    async with worker(verbose_flows.PriceFlow):
        verbose = await qwit(
            "run", "tests.verbose_flows:PriceFlow", *common, "--id", flow_id, "-v",
            TEMPORAL_ADDRESS=dev_server.address,
        )  # fmt: skip
        plain = await qwit(
            "run", "tests.verbose_flows:PriceFlow", *common,
            TEMPORAL_ADDRESS=dev_server.address,
        )  # fmt: skip

    assert verbose.code == 1, verbose.err
    story = _story(verbose.err)
    assert "traceback of step 'v.price':" in story, verbose.err
    # the step's frame, then the helper's, where the KeyError was raised
    assert "in step_forward" in story and "in price_of" in story, story
    assert story.index("in step_forward") < story.index("in price_of")
    assert "return PRICES[item]" in story
    assert story.rstrip().splitlines()[-1].strip().startswith("undone, newest first:")

    assert plain.code == 1, plain.err
    assert "reason: KeyError: 'pear'" in plain.err
    assert "price_of" not in plain.err and "Traceback" not in plain.err

    status = await qwit("status", flow_id, "-v", TEMPORAL_ADDRESS=dev_server.address)
    assert status.code == 0, status.err
    assert "traceback of step 2 'v.price':" in status.out, status.out
    assert "in price_of" in status.out and "return PRICES[item]" in status.out
    brief = await qwit("status", flow_id, TEMPORAL_ADDRESS=dev_server.address)
    assert brief.code == 0, brief.err
    assert "KeyError" in brief.out and "price_of" not in brief.out


@pytest.mark.parametrize("backend", ["local", "postgres"])
async def test_run_verbose_shows_the_traceback_on_every_engine(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
):
    env = {"QWIT_DATA_DIR": str(tmp_path)}
    if backend == "postgres":
        env["QWIT_POSTGRES_DSN"] = request.getfixturevalue("postgres_dsn")
    args = ("--args", json.dumps({"item": "pear"}), "--backend", backend)
    verbose = await qwit("run", "tests.verbose_flows:PriceFlow", *args, "-v", **env)
    plain = await qwit("run", "tests.verbose_flows:PriceFlow", *args, **env)
    assert verbose.code == 1, verbose.err
    story = _story(verbose.err)
    assert "traceback of step 'v.price':" in story, verbose.err
    assert "in price_of" in story and "return PRICES[item]" in story
    assert plain.code == 1, plain.err
    assert "price_of" not in plain.err and "Traceback" not in plain.err
