"""Steps served by `qwit-worker` subprocesses in the tests; they talk to the test
through files in the directory named by args['dir']."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import qwit


def mark(args: dict[str, Any], name: str) -> None:
    path = Path(args["dir"]) / name
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")


class First(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        mark(args, "first")
        return {"first_pid": os.getpid()}

    async def step_back(self, args: dict[str, Any]) -> None:
        mark(args, "first.back")


class Gate(qwit.Step):
    """Waits until the test creates the file `go`; short timeout so a killed
    worker's attempt is retried quickly elsewhere."""

    timeout = 4
    timeout_grace = 0.5  # (the server's limit is timeout + grace)
    retry = qwit.Retry(max_attempts=10, initial_interval=0.2, max_interval=0.5)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        mark(args, f"gate.attempt{qwit.context().attempt}")
        while not (Path(args["dir"]) / "go").exists():
            await asyncio.sleep(0.05)
        return {"gate_pid": os.getpid()}


class Last(qwit.Step):
    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        mark(args, "last")
        return {"last_pid": os.getpid()}


class Restartable(qwit.Flow):
    def build_flow(self) -> None:
        self.step(First)
        self.step(Gate)
        self.step(Last)


class Progress(qwit.Step):
    """Works through `items`, heartbeating its position; a new attempt resumes
    after the last position the previous one reported."""

    heartbeat_timeout = 1.5
    timeout = 120
    retry = qwit.Retry(max_attempts=5, initial_interval=0.2, max_interval=0.5)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        ctx = qwit.context()
        last = ctx.heartbeat_details
        start = 0 if last is None else int(last) + 1
        mark(args, f"progress.attempt{ctx.attempt}.from{start}")
        for item in range(start, args["items"]):
            mark(args, f"item{item}")
            qwit.heartbeat(item)
            await asyncio.sleep(0.1)
        return {"items_done": args["items"]}


class LongJob(qwit.Flow):
    def build_flow(self) -> None:
        self.step(First)
        self.step(Progress)
