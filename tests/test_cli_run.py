"""`qwit run`: a flow from the command line, on its own dev server or a configured one."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

from qwit.temporal import DevServer
from tests.clirun import finish, qwit, read_until, start

GOOD = {"order_id": "1001", "sku": "A-1", "quantity": 2, "card": "4242", "cents": 2599}
DECLINED = {"order_id": "1002", "sku": "B-2", "quantity": 1, "card": "4000-0002", "cents": 999}


async def test_run_on_an_embedded_dev_server_completes_and_rolls_back(tmp_path):
    # Nothing configured: each run starts a local dev server with its state in the data dir.
    good_dir, bad_dir = tmp_path / "good", tmp_path / "bad"
    good, bad = await asyncio.gather(
        start("run", "samples.order.flows:PlaceOrder", "--args", json.dumps(GOOD),
              QWIT_DATA_DIR=str(good_dir)),
        start("run", "samples.order.flows:PlaceOrder", "--args", json.dumps(DECLINED),
              "--id", "order-1002", QWIT_DATA_DIR=str(bad_dir)),
    )  # fmt: skip
    completed, failed = await asyncio.gather(finish(good), finish(bad))

    assert completed.code == 0, completed.err
    result = json.loads(completed.out)
    assert result == {**GOOD, "reservation": result["reservation"],
                      "charge": result["charge"], "tracking": "1Z-1001"}  # fmt: skip
    assert "starting a local Temporal dev server" in completed.err
    assert f"state in {good_dir / 'run.db'}" in completed.err
    progress = [" ".join(line.split()) for line in completed.err.splitlines()]
    for name in ("inventory.reserve", "payments.charge", "shipping.create"):
        assert any(line.endswith(f"{name} done") for line in progress), progress
    assert (good_dir / "run.db").exists()

    assert failed.code == 1, failed.err
    assert failed.out == ""
    err = failed.err
    assert "id order-1002" in err
    assert "flow 'orders.place' rolled back (id order-1002)" in err
    assert "failed step: 'payments.charge'" in err
    assert "reason: StepError: card ending 0002 was declined" in err
    assert "undone, newest first: payments.charge, inventory.reserve" in err
    # the progress lines told it in order: forward, the failure, then the undo newest first
    story = [" ".join(line.split()[1:]) for line in err.splitlines() if line[:1] in "▶✓✗↩↺"]
    assert story == [
        "1 inventory.reserve started",
        "1 inventory.reserve done",
        "2 payments.charge started",
        "2 payments.charge failed: StepError: card ending 0002 was declined",
        "2 payments.charge compensating",
        "2 payments.charge compensated",
        "1 inventory.reserve compensating",
        "1 inventory.reserve compensated",
    ]


async def test_run_on_a_configured_server_with_retries_and_a_sub_flow(dev_server: DevServer):
    queue = "cli-run-retried"
    done = await qwit(
        "run", "tests.cli_flows:Retried", "--task-queue", queue, TEMPORAL_ADDRESS=dev_server.address
    )
    assert done.code == 0, done.err
    assert json.loads(done.out) == {"reserved": True, "attempt": 3}
    assert "starting a local Temporal" not in done.err
    assert f"on Temporal at {dev_server.address}, task queue '{queue}'" in done.err
    progress = [" ".join(line.split()) for line in done.err.splitlines()]
    assert "↻ 2 t.flaky retrying (attempt 2) after ConnectionError: try 1 refused" in progress
    assert "✓ 2 t.flaky done (3 attempts)" in progress

    done = await qwit(
        "run", "tests.cli_flows:Outer", "--args", '{"approved": true, "fail_notify": true}',
        QWIT_TASK_QUEUE="cli-run-outer", TEMPORAL_ADDRESS=dev_server.address,
    )  # fmt: skip
    assert done.code == 0, done.err
    assert json.loads(done.out)["approved_by"] == "ops"
    progress = [" ".join(line.split()) for line in done.err.splitlines()]
    assert "✓ 2.1 t.pack done" in progress
    assert "↷ 2.2 t.notify skipped" in progress
    assert "qwit: serving only 't.outer''s steps: flow 't.empty' has no steps" in done.err


async def test_run_usage_error_names_the_bad_flow():
    done = await qwit("run", "samples.order.flows:PlaceOrdr")
    assert done.code == 2
    assert "'samples.order.flows:PlaceOrdr' does not resolve" in done.err
    assert done.out == ""


async def test_ctrl_c_cancels_the_flow_which_rolls_back(dev_server: DevServer):
    claim = '{"employee": "al", "cents": 50000}'
    run = await start(
        "run", "samples.approval.flows:ExpenseClaim", "--args", claim,
        QWIT_TASK_QUEUE="cli-run-interrupted", TEMPORAL_ADDRESS=dev_server.address,
    )  # fmt: skip
    assert run.stderr is not None
    await read_until(run.stderr, "flow waits for an operator")
    run.send_signal(signal.SIGINT)
    done = await finish(run)
    assert done.code == 1, done.err
    assert "cancelling the flow: it rolls back (Ctrl-C again to stop waiting)" in done.err
    assert "flow 'expenses.claim' cancelled" in done.err
    assert "undone, newest first: expenses.approve, expenses.submit" in done.err


async def test_run_completes_beside_a_worker_for_other_modules(dev_server: DevServer):
    # A newcomer's trap: a `qwit-worker` (as `qwit dev` starts) serves another
    # module on the same queue and address. `qwit run` starts its own worker
    # for the order sample; before, the first worker to take a step it lacked
    # failed it for good (4 runs out of 4 rolled back at step 1).
    import uuid

    from tests.test_worker_cli import start_worker, wait_ready

    queue = f"mixed-{uuid.uuid4().hex[:8]}"
    other = start_worker(dev_server.address, queue, "samples.approval.flows")
    # Its log is read to the end: a worker blocked on a full pipe holds the
    # step it took (once, every refusal logged a traceback, and a run hung).
    logged: list[str] = []
    assert other.stdout is not None
    reader = threading.Thread(target=logged.extend, args=(other.stdout,), daemon=True)
    try:
        await wait_ready(other)
        reader.start()
        runs = [
            await finish(
                await start(
                    "run",
                    "samples.order.flows:PlaceOrder",
                    "--args",
                    json.dumps(GOOD),
                    TEMPORAL_ADDRESS=dev_server.address,
                    QWIT_TASK_QUEUE=queue,
                )
            )
        ]
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait(timeout=30)
        reader.join(timeout=30)
        other.stdout.close()
    for done in runs:
        assert done.code == 0, done.err
        assert json.loads(done.out)["tracking"] == "1Z-1001"
    # A refusal is routine here: one line per step it lacks, no tracebacks.
    log = "".join(logged)
    assert "Traceback" not in log, log
    for step in ("inventory.reserve", "payments.charge", "shipping.create"):
        assert log.count(f"step {step!r} is not served by this worker") <= 1, log


async def test_run_with_the_id_of_a_running_flow_fails_in_one_line(dev_server: DevServer):
    """An id already running is a request that failed (exit 1), not a usage error."""
    import uuid

    flow_id = f"claim-{uuid.uuid4().hex[:8]}"
    claim = '{"employee": "al", "cents": 50000}'
    env = {"QWIT_TASK_QUEUE": f"cli-run-{flow_id}", "TEMPORAL_ADDRESS": dev_server.address}
    first = await start("run", "samples.approval.flows:ExpenseClaim", "--args", claim,
                        "--id", flow_id, **env)  # fmt: skip
    try:
        assert first.stderr is not None
        await read_until(first.stderr, "flow waits for an operator")
        again = await qwit("run", "samples.approval.flows:ExpenseClaim", "--args", claim,
                           "--id", flow_id, **env)  # fmt: skip
        assert again.code == 1, again.err
        assert again.out == ""
        assert again.err.strip().splitlines()[-1] == (
            f"qwit: a flow with id {flow_id!r} is already running"
        )
        assert "Usage:" not in again.err and "Traceback" not in again.err
    finally:
        first.send_signal(signal.SIGINT)  # cancelled: it rolls back
        done = await finish(first)
    assert done.code == 1 and "flow 'expenses.claim' cancelled" in done.err
