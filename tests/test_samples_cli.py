"""The samples run from the command line, with the commands their READMEs give."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

from qwit.temporal import DevServer
from samples.approval import flows as approval_flows
from tests.clirun import finish, read_until, start
from tests.clirun import qwit as run_qwit

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(sample: str) -> list[list[str]]:
    """The `qwit ...` commands of a sample's README, in order, as argument lists."""
    text = (ROOT / "samples" / sample / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [
        shlex.split(line)[1:]
        for block in blocks
        for line in block.splitlines()
        if line.startswith("qwit ")
    ]


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()]


async def test_shipping_sample(dev_server: DevServer):
    ships, fails, graph = readme_commands("shipping")[:3]
    assert ships[0] == fails[0] == "run" and graph[0] == "graph"
    # Each run serves its own steps: on a task queue of its own, neither
    # depends on the other's worker still being there.
    shipped, failed = await asyncio.gather(
        *(
            run_qwit(*command, TEMPORAL_ADDRESS=dev_server.address, QWIT_TASK_QUEUE=queue)
            for command, queue in ((ships, f"ship-{uuid.uuid4()}"), (fails, f"ship-{uuid.uuid4()}"))
        )
    )

    assert shipped.code == 0, shipped.err
    assert shipped.out.strip(), f"no JSON on stdout; stderr:\n{shipped.err}"
    result = json.loads(shipped.out)
    assert result["tracking"] == f"1Z-{result['booking']}"

    assert failed.code == 1, failed.err
    story = lines(failed.err)
    assert "✗ 3.2 shipping.print_label failed: StepError: no carrier route to 'XX'" in story
    assert "✗ 3 shipping (sub-flow) failed: StepError: no carrier route to 'XX'" in story
    assert story.index("↺ 3.1 shipping.book_carrier compensated") < story.index(
        "↺ 2 payments.charge compensated"
    )
    assert (
        "undone, newest first: shipping.print_label, shipping.book_carrier, payments.charge, "
        "inventory.reserve" in story
    )

    drawn = await run_qwit(*graph)
    assert drawn.code == 0
    assert 'subgraph f3["3 shipping (sub-flow)"]' in drawn.out


async def test_approval_sample(dev_server: DevServer, worker: Any, task_queue: str):
    dev, submit, status, approve, reject = readme_commands("approval")[:5]
    assert dev == ["dev", "samples.approval.flows"]
    assert [submit[0], status[0], approve[:3], reject[:3]] == [
        "run",
        "status",
        ["react", "claim-7", "retry"],
        ["react", "claim-7", "rollback"],
    ]
    # The worker of `qwit dev` serves the steps; here, this test's worker does.
    assert "--no-worker" in submit
    env = {"TEMPORAL_ADDRESS": dev_server.address, "QWIT_TASK_QUEUE": task_queue}

    def ours(command: list[str], claim: str) -> list[str]:
        return [claim if arg == "claim-7" else arg for arg in command]

    async def submitted(claim: str) -> tuple[asyncio.subprocess.Process, str]:
        proc = await start(*ours(submit, claim), **env)
        assert proc.stderr is not None
        return proc, await read_until(proc.stderr, f"qwit react {claim} rollback")

    kept, dropped = f"claim-{uuid.uuid4().hex[:8]}", f"claim-{uuid.uuid4().hex[:8]}"
    async with worker(approval_flows):
        (to_approve, told), (to_reject, _) = await asyncio.gather(
            submitted(kept), submitted(dropped)
        )
        assert "flow waits for an operator at step 2 'expenses.approve'" in told
        assert f"qwit react {kept} retry [--args JSON]" in told

        done = await run_qwit(*ours(status, kept), **env)
        assert done.code == 0, done.err
        assert f"flow expenses.claim id {kept} status waiting" in lines(done.out)

        decided = await asyncio.gather(
            run_qwit(*ours(approve, kept), **env), run_qwit(*ours(reject, dropped), **env)
        )
        assert [d.code for d in decided] == [0, 0], [d.err for d in decided]

        paid = await finish(to_approve)
        withdrawn = await finish(to_reject)
    assert paid.code == 0, paid.err
    assert json.loads(paid.out)["approved_by"] == "manager", (paid.out, paid.err)
    assert withdrawn.code == 1, withdrawn.err
    assert "undone, newest first: expenses.approve, expenses.submit" in withdrawn.err
