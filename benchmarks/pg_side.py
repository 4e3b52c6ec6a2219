"""One side of ``python -m benchmarks.postgres``, in a process of its own.

    python -m benchmarks.pg_side SIDE SETTINGS_JSON

SIDE is ``qwit-postgres`` (a QWIT client and a ``PostgresWorker`` in this
process), ``dbos`` (a hand-written DBOS saga, DBOS running in this process as
it does in an application) or ``qwit-temporal`` (a QWIT client and a Temporal
worker in this process, on a dev server). Every side runs the same saga: N
trivial async steps, each returning a one-key dict; the failing shape fails
at its 5th step (no retry) and undoes the 4 before it, newest first. It
prints one JSON object: per shape the wall time of each run, then the
throughput run (flows in flight at once) and this process's CPU time in it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

import qwit


class BenchStep(qwit.Step, name="pgbench.step"):
    retry = qwit.Retry(max_attempts=1)

    async def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        i = qwit.context().path
        if args.get("fail_at") == i:
            raise qwit.StepError("declined", retry=False)
        return {f"s{i}": "x"}

    async def step_back(self, args: dict[str, Any]) -> None:
        return None


def qwit_flow(steps: int) -> type[qwit.Flow]:
    class Bench(qwit.Flow, name=f"pgbench.flow{steps}"):
        def build_flow(self) -> None:
            for _ in range(steps):
                self.step(BenchStep)

    return Bench


SHAPES = {"1 step": (1, None), "5 steps": (5, None), "20 steps": (20, None), "fail at 5": (5, 5)}


async def qwit_side(settings: dict[str, Any], engine: str) -> dict[str, Any]:
    flows = {steps: qwit_flow(steps) for steps, _ in SHAPES.values()}
    if engine == "postgres":
        from qwit.postgres import PostgresSettings, PostgresWorker, prepare

        dsn = settings["dsn"]
        await prepare(dsn)
        client = await qwit.connect(backend=qwit.postgres, settings=[PostgresSettings(dsn)])
        serving: Any = PostgresWorker(dsn, *flows.values(), concurrency=100, poll_interval=0.5)
    else:
        from qwit.temporal import connect_temporal, create_worker

        temporal = await connect_temporal(target_host=settings["address"])
        queue = f"pgbench-{uuid.uuid4().hex[:8]}"
        client = await qwit.connect(temporal_client=temporal, task_queue=queue)
        serving = create_worker(
            temporal,
            *flows.values(),
            task_queue=queue,
            max_concurrent_activities=100,
            max_concurrent_workflow_tasks=100,
        )

    async def one(shape: str) -> None:
        steps, fail_at = SHAPES[shape]
        args = {} if fail_at is None else {"fail_at": str(fail_at)}
        handle = await client.start(flows[steps], args)
        try:
            result = await handle.result()
        except qwit.FlowRolledBack as failed:
            undone = len(failed.compensated)
            if fail_at is None or undone != fail_at:
                raise RuntimeError(f"{shape}: rolled back, undid {undone}") from None
            return
        if len(result) != steps:
            raise RuntimeError(f"{shape}: {len(result)} outputs, not {steps}")

    async with serving:
        return await measure(settings, one)


def dbos_side(settings: dict[str, Any]) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig
    from dbos._serialization import DBOSPortableJSONSerializer

    config: DBOSConfig = {
        "name": "pgbench",
        "system_database_url": settings["dsn"],
        "serializer": DBOSPortableJSONSerializer(),
        "log_level": "WARNING",
    }
    DBOS(config=config)

    @DBOS.step()
    async def forward(i: int, fail: bool) -> dict[str, Any]:
        if fail:
            raise RuntimeError("declined")
        return {f"s{i}": "x"}

    @DBOS.step()
    async def back(i: int) -> None:
        return None

    @DBOS.workflow()
    async def saga(steps: int, fail_at: int | None) -> dict[str, Any]:
        done: list[int] = []
        out: dict[str, Any] = {}
        try:
            for i in range(1, steps + 1):
                out.update(await forward(i, i == fail_at))
                done.append(i)
        except RuntimeError:
            for i in reversed(done):  # the compensations, newest first
                await back(i)
            return {"undone": len(done)}
        return out

    DBOS.launch()

    async def one(shape: str) -> None:
        steps, fail_at = SHAPES[shape]
        handle = await DBOS.start_workflow_async(saga, steps, fail_at)
        result = await handle.get_result()
        expected = {"undone": fail_at - 1} if fail_at else None
        assert (result == expected) if expected else len(result) == steps, result

    try:
        return asyncio.run(measure(settings, one))
    finally:
        DBOS.destroy()


async def measure(settings: dict[str, Any], one: Any) -> dict[str, Any]:
    for shape in SHAPES:
        for _ in range(settings["warmup"]):
            await one(shape)
    latency: dict[str, list[float]] = {}
    for _ in range(settings["reps"]):  # the shapes in turn, so noise spreads evenly
        for shape in SHAPES:
            began = time.perf_counter()
            await one(shape)
            latency.setdefault(shape, []).append(time.perf_counter() - began)
    flows = settings["flows"]
    cpu = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(one("5 steps") for _ in range(flows)))
    wall = time.perf_counter() - began
    return {
        "latency": latency,
        "throughput": {
            "flows": flows,
            "seconds": wall,
            "cpu_seconds": time.process_time() - cpu,
        },
    }


def main() -> None:
    side, raw = sys.argv[1], sys.argv[2]
    settings = json.loads(raw)
    if side == "dbos":
        out = dbos_side(settings)
    else:
        engine = "postgres" if side == "qwit-postgres" else "temporal"
        out = asyncio.run(qwit_side(settings, engine))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
