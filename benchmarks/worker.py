"""A benchmark worker, in its own process so that its memory and CPU can be
measured alone: ``python -m benchmarks.worker --side qwit|hand ...``.

It prints ``ready`` once polling, and stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from typing import Any

import temporalio.client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

#: The same for both sides. Explicit, so that a change of temporalio's
#: defaults can't make the two workers differ.
WORKER_OPTIONS: dict[str, Any] = {
    "max_concurrent_workflow_tasks": 100,
    "max_concurrent_activities": 100,
    "max_concurrent_local_activities": 100,
    "max_cached_workflows": 1000,
}
GRACEFUL_SHUTDOWN = timedelta(seconds=30)
SIDES = ("qwit", "hand")


async def build(args: argparse.Namespace) -> Worker:
    options = dict(WORKER_OPTIONS)
    if args.unsandboxed:
        options["workflow_runner"] = UnsandboxedWorkflowRunner()
    if args.side == "qwit":
        from benchmarks.flows import STEPS
        from benchmarks.parallel import Item
        from qwit.temporal import connect_temporal, create_worker

        client = await connect_temporal(target_host=args.address)
        return create_worker(
            client,
            *STEPS,
            Item,
            task_queue=args.task_queue,
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            **options,
        )
    from benchmarks.hand_activities import ACTIVITIES
    from benchmarks.hand_workflow import Parallel, Saga

    plain = await temporalio.client.Client.connect(args.address)
    return Worker(
        plain,
        task_queue=args.task_queue,
        workflows=[Saga, Parallel],
        activities=list(ACTIVITIES),
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        **options,
    )


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--side", choices=SIDES, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--unsandboxed", action="store_true")
    args = parser.parse_args(argv)
    worker = await build(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        print("ready", flush=True)
        await stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
