"""The crash suite: flows in flight while their worker is killed, again and again.

    python -m tests.reliability.crash --flows 200 --kills 25 [--seed N]

Random flows (sub-flows, a failing step, random reactions) run on `qwit-worker`
subprocesses while the suite kills the worker with SIGKILL at random moments
(forward steps and compensations alike) and starts a new one. Then every flow
must have ended as the model of the saga rules predicts: completed, rolled
back or aborted, each effect applied exactly once per idempotency key, the
undone ones undone exactly once, newest first, and no flow lost, stuck or
terminated. The seed is printed first; a failing seed reproduces the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import temporalio.client

import qwit
from qwit.temporal import DevServer, connect_temporal
from tests.reliability.crash_flows import CrashStep, connect
from tests.saga_model import FlowSpec, fail_args, flow_class, model, random_flow

ROOT = Path(__file__).resolve().parents[2]
KIND = {
    qwit.FlowRolledBack: "rolled_back",
    qwit.FlowAborted: "aborted",
    qwit.CompensationFailed: "compensation_failed",
    qwit.FlowCancelled: "cancelled",
}


class Worker:
    """A `qwit-worker` subprocess (by default for the crash steps)."""

    def __init__(
        self, address: str, queue: str, log: Path, module: str = "tests.reliability.crash_flows"
    ) -> None:
        self.address = address
        self.queue = queue
        self.log = log
        self.module = module
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        env = {**os.environ, "TEMPORAL_ADDRESS": self.address, "QWIT_TASK_QUEUE": self.queue}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from qwit._cli import worker_main; worker_main()",
                    self.module,
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # serving once its pollers are up; give it a moment
        deadline = time.monotonic() + 30
        while b"serving" not in self.log.read_bytes().split(b"--- start", 1)[-1]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()

    def mark(self) -> None:
        with self.log.open("ab") as out:
            out.write(b"\n--- start\n")


@dataclass
class Report:
    seed: int
    flows: int
    kills: int
    kills_during_compensation: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    effects_applied: int = 0
    effects_undone: int = 0
    step_runs: int = 0
    step_runs_repeated: int = 0
    lost: int = 0
    terminated: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.lost == 0 and self.terminated == 0


def ledger_of(db: sqlite3.Connection, flow_id: str) -> tuple[set[str], list[str]]:
    applied = {eid for (eid,) in db.execute("SELECT eid FROM effects WHERE flow = ?", (flow_id,))}
    undone = [
        eid
        for (eid,) in db.execute("SELECT eid FROM undos WHERE flow = ? ORDER BY seq", (flow_id,))
    ]
    return applied, undone


def check_flow(
    db: sqlite3.Connection, spec: FlowSpec, flow_id: str, outcome: str
) -> tuple[set[str], list[str], str | None]:
    """A flow's ledger (applied, undone), and what differs from the model, if anything."""
    kind, log = model(spec)
    applied, undone = ledger_of(db, flow_id)
    expected_applied = {eid for action, eid in log if action == "do"}
    expected_undone = [eid for action, eid in log if action == "undo"]
    if (outcome, applied, undone) == (kind, expected_applied, expected_undone):
        return applied, undone, None
    return (
        applied,
        undone,
        f"{flow_id}: got {outcome} applied={sorted(applied)} undone={undone}; expected "
        f"{kind} applied={sorted(expected_applied)} undone={expected_undone}; "
        f"spec={json.dumps(asdict(spec))}",
    )


async def outcome_of(handle: qwit.FlowHandle, timeout: float) -> str:
    try:
        await asyncio.wait_for(handle.result(), timeout)
        return "completed"
    except qwit.FlowFailed as failed:
        return KIND[type(failed)]


async def run_crash(
    flows: int, kills: int, seed: int, workdir: Path, *, say: Any = print
) -> Report:
    """Run the crash suite; return its report (check ``report.ok``)."""
    say(f"crash suite: seed={seed} flows={flows} kills={kills}")
    rng = random.Random(seed)
    report = Report(seed=seed, flows=flows, kills=kills)
    began = time.monotonic()
    db_path = str(workdir / "ledger.sqlite")
    connect(db_path).close()
    specs: list[tuple[FlowSpec, dict[str, Any]]] = []
    for _ in range(flows):
        spec = random_flow(rng, max_steps=6)
        args = {
            "db": db_path,
            "delay": rng.choice([0.0, 0.1, 0.3]),
            "back_delay": rng.choice([0.1, 0.5, 1.0]),
            **fail_args(spec),
        }
        specs.append((spec, args))
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        worker = Worker(server.address, queue, workdir / "worker.log")
        worker.mark()
        await worker.start()
        handles: list[qwit.FlowHandle] = []
        kill_gaps = [rng.uniform(0.2, 1.5) for _ in range(kills)]
        pauses = [rng.choice([0.0, 0.1, 0.5]) for _ in range(kills)]
        # Flows start all through the kill phase, so kills find flows at every
        # stage: starting, going forward, compensating.
        spread = sum(kill_gaps) * 0.8 / max(flows, 1)

        async def start_all() -> None:
            for i, (spec, args) in enumerate(specs):
                flow = flow_class(spec, CrashStep)
                handles.append(await client.start(flow, args, id=f"crash-{seed}-{i}"))
                await asyncio.sleep(spread)

        try:
            starting = asyncio.create_task(start_all())
            kill_times = []
            for k in range(kills):
                await asyncio.sleep(kill_gaps[k])
                worker.kill()
                kill_times.append(time.time())
                say(f"  kill {k + 1}/{kills}: {len(handles)} flows started")
                await asyncio.sleep(pauses[k])
                worker.mark()
                await worker.start()
            await starting
            results = await asyncio.gather(
                *(outcome_of(h, timeout=120 + 10 * kills) for h in handles),
                return_exceptions=True,
            )
        finally:
            worker.stop()
        db = connect(db_path)
        try:
            for i, ((spec, _args), handle, result) in enumerate(
                zip(specs, handles, results, strict=True)
            ):
                if isinstance(result, BaseException):
                    report.lost += 1
                    report.mismatches.append(f"flow {i} did not end: {result!r}")
                    continue
                report.outcomes[result] = report.outcomes.get(result, 0) + 1
                applied, undone, mismatch = check_flow(db, spec, handle.id, result)
                report.effects_applied += len(applied)
                report.effects_undone += len(undone)
                if mismatch:
                    report.mismatches.append(f"flow {i}: {mismatch}")
                status = (await temporal.get_workflow_handle(handle.id).describe()).status
                if status in (
                    temporalio.client.WorkflowExecutionStatus.TERMINATED,
                    temporalio.client.WorkflowExecutionStatus.TIMED_OUT,
                ):
                    report.terminated += 1
            runs = db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone()
            report.step_runs = runs[0]
            report.step_runs_repeated = runs[0] - runs[1]
            backs = [t for (t,) in db.execute("SELECT at FROM runs WHERE direction = 'back'")]
            report.kills_during_compensation = sum(
                1 for kill in kill_times if any(kill - 1.0 <= t <= kill for t in backs)
            )
        finally:
            db.close()
    report.seconds = round(time.monotonic() - began, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    workdir = options.workdir or Path(f"/tmp/qwit-crash-{seed}")
    workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run_crash(options.flows, options.kills, seed, workdir))
    summary = {k: v for k, v in asdict(report).items() if k != "mismatches"}
    print(json.dumps(summary, indent=2))
    for line in report.mismatches:
        print("MISMATCH", line)
    print("OK" if report.ok else f"FAILED (seed {seed})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
