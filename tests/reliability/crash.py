"""The crash suite: flows in flight while their worker is killed, again and again.

    python -m tests.reliability.crash --flows 200 --kills 25 [--seed N]
    python -m tests.reliability.crash --engine postgres --flows 200 --kills 25 --pg-restarts 3
    python -m tests.reliability.crash --flows 200 --kills 25 --stop term [--engine postgres]

Random flows (sub-flows, a failing step, random reactions) run on `qwit-worker`
subprocesses while the suite kills the worker with SIGKILL at random moments
(forward steps and compensations alike) and starts a new one. Then every flow
must have ended as the model of the saga rules predicts: completed, rolled
back or aborted, and no flow lost, stuck or terminated. The steps apply their
effects through a SQLite ledger that dedups on the idempotency key, shared by
the worker subprocesses, and each flow's record must keep the strict rules of
``tests.strict_ledger``: each effect applied once per key, by one execution
(fresh keys per execution, stable across retries), undone once (a second undo
execution is never forgiven), each undo started after every attempt of its
forward had ended (an attempt of a killed worker ends when it was killed),
newest first, and nothing recorded after the flow reported its end. The seed
is printed first; a failing seed reproduces the run.

With ``--stop term`` the worker is stopped with SIGTERM instead, as a deploy
stops it: it must let its steps in flight finish and exit 0, so the run must
also cut off no attempt.

On ``--engine postgres`` the workers are ``qwit-worker --backend postgres``
processes on an embedded PostgreSQL, and the suite also restarts PostgreSQL
itself ``--pg-restarts`` times at kill moments: SIGKILL (a crash) and SIGTERM
(a smart shutdown, made fast after 5 s as ``pg_ctl`` would) in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import temporalio.client

import qwit
from qwit.temporal import DevServer, connect_temporal
from tests import strict_ledger
from tests.reliability.crash_flows import CrashStep, connect, entries, foreign_uses
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
        self,
        address: str,
        queue: str,
        log: Path,
        module: str = "tests.reliability.crash_flows",
        env: dict[str, str] | None = None,
    ) -> None:
        self.address = address
        self.queue = queue
        self.log = log
        self.module = module
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.died: dict[int, float] = {}
        """pid -> when it was killed (time.monotonic())."""
        self.stops = 0
        self.bad_exits = 0

    async def start(self) -> None:
        env = {
            **os.environ,
            "TEMPORAL_ADDRESS": self.address,
            "QWIT_TASK_QUEUE": self.queue,
            **self.env,
        }
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
        while b"serving" not in self.log.read_bytes().rsplit(b"--- start", 1)[-1]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {self.log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.died[self.proc.pid] = time.monotonic()

    def stop(self) -> None:
        """SIGTERM: the worker lets its steps in flight finish, then exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            self.died[self.proc.pid] = time.monotonic()
            self.stops += 1
            if self.proc.returncode != 0:
                self.bad_exits += 1

    def mark(self) -> None:
        with self.log.open("ab") as out:
            out.write(b"\n--- start\n")


@dataclass
class Report:
    seed: int
    flows: int
    kills: int
    engine: str = "temporal"
    pg_restarts: int = 0
    stop: str = "kill"
    #: Stops (``--stop term``) after which the worker exited other than 0.
    bad_exits: int = 0
    kills_during_compensation: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    effects_applied: int = 0
    effects_undone: int = 0
    dedups: int = 0
    undo_noops: int = 0
    undo_dedups: int = 0
    step_runs: int = 0
    step_runs_repeated: int = 0
    unfinished_attempts: int = 0
    lost: int = 0
    terminated: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        # (a worker stopped with SIGTERM lets its steps in flight finish: no
        # attempt is cut off)
        cut = self.unfinished_attempts if self.stop == "term" else 0
        return (
            not self.mismatches
            and self.lost == 0
            and self.terminated == 0
            and self.bad_exits == 0
            and cut == 0
        )


def check_flow(
    db: sqlite3.Connection,
    spec: FlowSpec,
    run: str,
    outcome: str,
    ended_at: float | None,
    died: dict[int, float],
) -> tuple[list[strict_ledger.Entry], list[str]]:
    """A flow's ledger entries, and every strict rule they break (with the
    model's prediction of what is applied and undone)."""
    kind, log = model(spec)
    expected = strict_ledger.Expected(
        outcome=kind,
        applied=[(eid, 0) for action, eid in log if action == "do"],
        undone=[(eid, 0) for action, eid in log if action == "undo"],
    )
    own = entries(db, run)
    found = strict_ledger.violations(
        own, expected=expected, outcome=outcome, ended_at=ended_at, died=died
    )
    for other in foreign_uses(db, run, {strict_ledger.forward_of(e.key) for e in own}):
        found.append(f"key {other.key} also used by run {other.run}: {other.describe()}")
    return own, found


async def outcome_of(handle: qwit.FlowHandle, timeout: float, ended: dict[str, float]) -> str:
    try:
        await asyncio.wait_for(handle.result(), timeout)
        return "completed"
    except qwit.FlowFailed as failed:
        return KIND[type(failed)]
    finally:
        ended.setdefault(handle.id, time.monotonic())


async def start_surely(
    client: qwit.Client, flow: type[qwit.Flow], args: dict[str, Any], flow_id: str
) -> qwit.FlowHandle:
    """Start a flow, as a caller that must not lose it would: while the engine
    can't be reached (PostgreSQL restarting), again; a start that landed
    before the answer was lost is found by its id."""
    tried = False
    while True:
        try:
            return await client.start(flow, args, id=flow_id)
        except qwit.EngineUnavailable:
            tried = True
            await asyncio.sleep(0.2)
        except qwit.ArgumentsError:
            if not tried:
                raise
            return client.get_handle(flow_id, backend=qwit.postgres)


@contextlib.asynccontextmanager
async def _engine(engine: str, workdir: Path, queue: str) -> Any:
    """The engine's server, a client, and the worker (not started yet)."""
    if engine == "postgres":
        from qwit.postgres import EmbeddedPostgres, PostgresSettings, prepare

        async with EmbeddedPostgres(data_dir=workdir / "pg") as server:
            await prepare(server.dsn)
            client = await qwit.connect(
                backend=qwit.postgres, settings=[PostgresSettings(server.dsn)]
            )
            env = {
                "QWIT_BACKEND": "postgres",
                "QWIT_POSTGRES_DSN": server.dsn,
                "QWIT_POSTGRES_HEARTBEAT": "0.5",
                "QWIT_POSTGRES_STALLED_AFTER": "3",
            }
            try:
                yield server, client, Worker("", queue, workdir / "worker.log", env=env), None
            finally:
                await client.close()
        return
    async with DevServer() as server:
        temporal = await connect_temporal(target_host=server.address)
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        yield server, client, Worker(server.address, queue, workdir / "worker.log"), temporal


async def run_crash(
    flows: int,
    kills: int,
    seed: int,
    workdir: Path,
    *,
    say: Any = print,
    engine: str = "temporal",
    pg_restarts: int = 0,
    stop: str = "kill",
) -> Report:
    """Run the crash suite; return its report (check ``report.ok``).

    ``stop="term"``: the worker is stopped with SIGTERM instead (a deploy):
    it lets its steps in flight finish before it exits, so no attempt is
    cut off (``unfinished_attempts`` stays 0).
    """
    say(f"crash suite: engine={engine} seed={seed} flows={flows} kills={kills} stop={stop}")
    rng = random.Random(seed)
    report = Report(
        seed=seed, flows=flows, kills=kills, engine=engine, pg_restarts=pg_restarts, stop=stop
    )
    began = time.monotonic()
    db_path = str(workdir / "ledger.sqlite")
    connect(db_path).close()
    specs: list[tuple[FlowSpec, dict[str, Any]]] = []
    for _ in range(flows):
        spec = random_flow(rng, max_steps=6)
        args = {
            "db": db_path,
            "run": uuid.uuid4().hex,
            "delay": rng.choice([0.0, 0.1, 0.3]),
            "back_delay": rng.choice([0.1, 0.5, 1.0]),
            **fail_args(spec),
        }
        specs.append((spec, args))
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    # the kills at which PostgreSQL restarts too (SIGTERM, SIGKILL, in turn)
    restarts = set(rng.sample(range(kills), min(pg_restarts, kills))) if pg_restarts else set()
    async with _engine(engine, workdir, queue) as (server, client, worker, temporal):
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
                handles.append(await start_surely(client, flow, args, f"crash-{seed}-{i}"))
                await asyncio.sleep(spread)

        try:
            starting = asyncio.create_task(start_all())
            for k in range(kills):
                await asyncio.sleep(kill_gaps[k])
                if stop == "term":
                    await asyncio.to_thread(worker.stop)
                else:
                    worker.kill()
                say(f"  kill {k + 1}/{kills}: {len(handles)} flows started")
                if k in restarts:
                    sig = signal.SIGKILL if len(restarts) % 2 else signal.SIGTERM
                    restarts.discard(k)
                    await asyncio.to_thread(server.stop, sig)
                    say(f"  PostgreSQL stopped ({sig.name}), started again")
                    await asyncio.sleep(pauses[k])
                    await asyncio.to_thread(server.start)
                await asyncio.sleep(pauses[k])
                worker.mark()
                await worker.start()
            await starting
            ended: dict[str, float] = {}
            results = await asyncio.gather(
                *(outcome_of(h, timeout=120 + 10 * kills, ended=ended) for h in handles),
                return_exceptions=True,
            )
        finally:
            worker.stop()
        report.bad_exits = worker.bad_exits
        db = connect(db_path)
        backs: list[float] = []  # when each undo attempt started
        try:
            for i, ((spec, args), handle, result) in enumerate(
                zip(specs, handles, results, strict=True)
            ):
                if isinstance(result, BaseException):
                    report.lost += 1
                    report.mismatches.append(f"flow {i} did not end: {result!r}")
                    continue
                report.outcomes[result] = report.outcomes.get(result, 0) + 1
                own, found = check_flow(
                    db, spec, args["run"], result, ended.get(handle.id), worker.died
                )
                count = Counter(e.kind for e in own)
                report.effects_applied += count[strict_ledger.DO]
                report.effects_undone += count[strict_ledger.UNDO]
                report.dedups += count[strict_ledger.DEDUP]
                report.undo_noops += count[strict_ledger.UNDO_NOOP]
                report.undo_dedups += count[strict_ledger.UNDO_DEDUP]
                starts = [e for e in own if e.kind == strict_ledger.START]
                report.step_runs += len(starts)
                report.step_runs_repeated += len(starts) - len({e.key for e in starts})
                report.unfinished_attempts += len(starts) - count[strict_ledger.END]
                if found:
                    report.mismatches.append(
                        f"flow {i} ({handle.id}, {result}): "
                        + "; ".join(found[:5])
                        + f"; spec={json.dumps(asdict(spec))}"
                    )
                if temporal is not None:
                    status = (await temporal.get_workflow_handle(handle.id).describe()).status
                    if status in (
                        temporalio.client.WorkflowExecutionStatus.TERMINATED,
                        temporalio.client.WorkflowExecutionStatus.TIMED_OUT,
                    ):
                        report.terminated += 1
                backs.extend(e.at for e in starts if e.direction == "back")
        finally:
            db.close()
        report.kills_during_compensation = sum(
            1 for at in worker.died.values() if any(at - 1.0 <= t <= at for t in backs)
        )
    report.seconds = round(time.monotonic() - began, 1)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--engine", choices=["temporal", "postgres"], default="temporal")
    parser.add_argument("--pg-restarts", type=int, default=0)
    parser.add_argument(
        "--stop",
        choices=["kill", "term"],
        default="kill",
        help="how the worker is stopped: SIGKILL (a crash) or SIGTERM (a deploy)",
    )
    options = parser.parse_args()
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    workdir = options.workdir or Path(f"/tmp/qwit-crash-{seed}")
    # a run starts from nothing: an earlier run's database and ledger go
    shutil.rmtree(workdir / "pg", ignore_errors=True)
    (workdir / "ledger.sqlite").unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(
        run_crash(
            options.flows,
            options.kills,
            seed,
            workdir,
            engine=options.engine,
            pg_restarts=options.pg_restarts,
            stop=options.stop,
        )
    )
    summary = {k: v for k, v in asdict(report).items() if k != "mismatches"}
    print(json.dumps(summary, indent=2))
    for line in report.mismatches:
        print("MISMATCH", line)
    print("OK" if report.ok else f"FAILED (seed {seed})")
    return 0 if report.ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
