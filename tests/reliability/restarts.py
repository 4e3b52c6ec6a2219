"""Server restarts: flows in flight while the Temporal server itself goes down.

    python -m tests.reliability.restarts --flows 100 [--seed N] [--in-memory]

A dev server with SQLite persistence is stopped (3 times with SIGTERM, 3 times
with SIGKILL) and started again on the same port and database while a
`qwit-worker` and the client carry on. Every flow whose start the server
acknowledged must reach its end, as the model of the saga rules predicts. With
`--in-memory` (no persistence) the same run must report lost flows: the
negative control that shows the check can see a loss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import qwit
from qwit.temporal import DevServer, connect_temporal
from qwit.temporal._devserver import free_port
from tests.reliability.crash import KIND, Worker, check_flow
from tests.reliability.crash_flows import CrashStep, connect
from tests.saga_model import FlowSpec, fail_args, flow_class, random_flow


@dataclass
class RestartReport:
    seed: int
    flows: int
    persistent: bool
    restarts: list[str] = field(default_factory=list)
    acknowledged: int = 0
    start_errors: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.mismatches


async def _outcome(handle: qwit.FlowHandle, deadline: float, ended: dict[str, float]) -> str:
    """The flow's end, asking again while the server is unreachable; notes when
    it was reported in ``ended``."""
    while True:
        try:
            await asyncio.wait_for(handle.result(), max(1.0, deadline - time.monotonic()))
            ended[handle.id] = time.monotonic()
            return "completed"
        except qwit.FlowFailed as failed:
            ended[handle.id] = time.monotonic()
            return KIND[type(failed)]
        except qwit.FlowNotFound:
            raise  # a server that lost the flow says so: no need to wait for it
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def run_restarts(
    flows: int, seed: int, workdir: Path, *, persistent: bool = True, say: Any = print
) -> RestartReport:
    """Run the restart suite; return its report."""
    say(f"restart suite: seed={seed} flows={flows} persistent={persistent}")
    rng = random.Random(seed)
    report = RestartReport(seed=seed, flows=flows, persistent=persistent)
    began = time.monotonic()
    ledger = str(workdir / "ledger.sqlite")
    connect(ledger).close()
    port = free_port()
    db_file = workdir / "temporal.sqlite" if persistent else None

    def new_server() -> DevServer:
        return DevServer(port=port, db_filename=db_file)

    specs: list[tuple[FlowSpec, dict[str, Any]]] = []
    for i in range(flows):
        spec = random_flow(rng, max_steps=5)
        args = {"db": ledger, "run": f"rs-{seed}-{i}", "delay": rng.choice([0.05, 0.2, 0.4])}
        specs.append((spec, {**args, **fail_args(spec)}))
    signals = [signal.SIGTERM] * 3 + [signal.SIGKILL] * 3
    rng.shuffle(signals)
    queue = f"restarts-{uuid.uuid4().hex[:8]}"
    server = await new_server().start()
    worker = Worker(server.address, queue, workdir / "worker.log")
    worker.mark()
    await worker.start()
    temporal = await connect_temporal(target_host=server.address)
    client = await qwit.connect(temporal_client=temporal, task_queue=queue)
    started: list[tuple[int, qwit.FlowHandle]] = []

    async def start_all() -> None:
        for i, (spec, args) in enumerate(specs):
            try:
                handle = await client.start(flow_class(spec, CrashStep), args, id=f"rs-{seed}-{i}")
            except Exception:
                report.start_errors += 1
            else:
                started.append((i, handle))
            await asyncio.sleep(0.03)

    try:
        starting = asyncio.create_task(start_all())
        for sig in signals:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            server.stop(sig)
            report.restarts.append(signal.Signals(sig).name)
            say(f"  server stopped with {signal.Signals(sig).name}, {len(started)} flows started")
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            server = await new_server().start()
            if worker.proc is not None and worker.proc.poll() is not None:
                worker.mark()
                await worker.start()
        await starting
        report.acknowledged = len(started)
        deadline = time.monotonic() + 180
        ended: dict[str, float] = {}
        results = await asyncio.gather(
            *(_outcome(handle, deadline, ended) for _, handle in started),
            return_exceptions=True,
        )
        db = connect(ledger)
        try:
            for (i, handle), result in zip(started, results, strict=True):
                if isinstance(result, BaseException):
                    report.lost += 1
                    continue
                report.outcomes[result] = report.outcomes.get(result, 0) + 1
                spec, args = specs[i]
                _, found = check_flow(
                    db, spec, args["run"], result, ended.get(handle.id), worker.died
                )
                report.mismatches.extend(f"flow {i}: {problem}" for problem in found)
        finally:
            db.close()
    finally:
        worker.stop()
        server.stop()
    report.seconds = round(time.monotonic() - began, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--in-memory", action="store_true")
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    workdir = Path(f"/tmp/qwit-restarts-{seed}")
    workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(
        run_restarts(options.flows, seed, workdir, persistent=not options.in_memory)
    )
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "mismatches"}, indent=2))
    for line in report.mismatches:
        print("MISMATCH", line)
    print("OK" if report.ok else f"FAILED (seed {seed})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
