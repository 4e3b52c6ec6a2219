"""``python -m benchmarks``: QWIT against a hand-written Temporal saga, in one run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import temporalio.client

import qwit
from benchmarks import parallel, report
from benchmarks.measure import (
    history,
    latency,
    progress,
    run_once,
    step_phase_medians,
    throughput,
    warm_up,
)
from benchmarks.procs import WorkerProcess, bytecode_env, compile_sources, memory_mb
from benchmarks.shapes import BIG_SHAPES, FIVE, LATENCY_SHAPES, TWENTY, TYPED_HISTORY_SHAPES, Shape
from benchmarks.sides import HandSide, QwitSide, Side
from benchmarks.worker import SIDES, WORKER_OPTIONS
from qwit.temporal import DevServer, connect_temporal, find_temporal_cli


@dataclass(frozen=True)
class Settings:
    mode: str
    warmup: int
    """Runs of each shape and side before anything is measured."""
    latency_reps: int
    """Runs of each shape and side, tuned server."""
    default_latency_reps: int
    """Runs of each shape and side, default server (slower: fewer)."""
    throughput_flows: int
    throughput_rounds: int
    sqlite_flows: int
    sqlite_rounds: int
    parallel_reps: int
    """Runs of each parallel block and map of up to 100 items, and side."""
    big_map_reps: int
    """Runs of each map of 1,000 items, and side."""
    skip_shapes: tuple[str, ...] = ()
    """Parallel shapes left out (the smoke run's failing map of 1,000 items:
    13 s of its 40, its code that of ``map_100_fail``)."""


FULL = Settings("full", 3, 60, 20, 200, 5, 200, 3, 20, 5)
QUICK = Settings("quick", 2, 10, 4, 200, 1, 100, 1, 4, 1)
SMOKE = Settings("smoke", 0, 1, 1, 10, 1, 10, 1, 1, 1, skip_shapes=("map_1000_fail",))


#: Where the workers' bytecode of this checkout is kept between runs.
BYTECODE = Path(tempfile.gettempdir()) / "qwit-benchmarks-bytecode"

#: Flows (20 steps each, per side) whose histories show where a step's time goes.
PHASE_FLOWS = 5


@dataclass
class Env:
    server: DevServer
    workers: dict[str, WorkerProcess]
    sides: list[Side]
    plain: temporalio.client.Client

    @property
    def server_pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid


@asynccontextmanager
async def environment(
    *, unsandboxed: bool = False, together: bool = False, **server_options: Any
) -> AsyncIterator[Env]:
    """A dev server, and a worker process for each side on its own task queue."""
    async with DevServer(**server_options) as server:
        progress(f"  server ready at {server.address}")
        run = uuid.uuid4().hex[:8]
        env = bytecode_env(BYTECODE)
        compile_sources(env)
        workers = {
            side: WorkerProcess(
                side, server.address, f"bench-{side}-{run}", unsandboxed=unsandboxed, env=env
            )
            for side in SIDES
        }
        try:
            if together:
                await asyncio.gather(*(worker.start() for worker in workers.values()))
            else:
                # One after the other: their start-up times are a figure.
                for worker in workers.values():
                    await worker.start()
            qwit_client = await qwit.connect(
                temporal_client=await connect_temporal(target_host=server.address),
                task_queue=workers["qwit"].task_queue,
            )
            plain = await temporalio.client.Client.connect(server.address)
            progress("  workers ready")
            sides: list[Side] = [QwitSide(qwit_client), HandSide(plain, workers["hand"].task_queue)]
            yield Env(server, workers, sides, plain)
        finally:
            await asyncio.gather(*(worker.stop() for worker in workers.values()))


async def histories(env: Env) -> dict[str, dict[str, dict[str, int]]]:
    """History figures of one fresh run of every shape, on both sides.

    The runs go all at once: nothing here is timed, and a history's events
    and bytes do not depend on what else the server does.
    """

    async def one(side: Side, shape: Shape) -> dict[str, int]:
        workflow_id, _ = await run_once(side, shape)
        return await history(env.plain, workflow_id)

    # The hand-written saga has no typed variant: it always sends each
    # activity only what it needs.
    pairs = [
        (shape, side)
        for shape in LATENCY_SHAPES + TYPED_HISTORY_SHAPES + BIG_SHAPES
        for side in env.sides
        if not (shape.typed and side.name == "hand")
    ]
    results = await asyncio.gather(*(one(side, shape) for shape, side in pairs))
    found: dict[str, dict[str, dict[str, int]]] = {}
    for (shape, side), figures in zip(pairs, results, strict=True):
        found.setdefault(shape.key, {})[side.name] = figures
    return found


async def measure(settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {"latency": {}, "throughput": {}, "workers": {}}

    progress("tuned dev server, in memory (fast=True)")
    async with environment(fast=True) as env:
        workers = env.workers
        results["workers"]["ready_s"] = {side: w.ready_seconds for side, w in workers.items()}
        progress("  warming up")
        await warm_up(env.sides, LATENCY_SHAPES, settings.warmup)
        results["workers"]["idle"] = {side: memory_mb(w.pid) for side, w in workers.items()}
        progress(f"  latency, {settings.latency_reps} runs of each flow and side")
        results["latency"]["fast"], ids = await latency(
            env.sides, LATENCY_SHAPES, settings.latency_reps
        )
        results["step_phases"] = {
            "fast": await step_phase_medians(env.plain, ids[TWENTY.key], PHASE_FLOWS)
        }
        progress("  history")
        results["history"] = await histories(env)
        progress(
            f"  throughput, {settings.throughput_rounds} rounds of {settings.throughput_flows}"
        )
        results["throughput"]["memory"] = await throughput(
            env.sides,
            FIVE,
            settings.throughput_flows,
            settings.throughput_rounds,
            workers,
            env.server_pid,
        )
        results["workers"]["end"] = {side: memory_mb(w.pid) for side, w in workers.items()}
        progress(
            f"  parallel blocks and maps, {settings.parallel_reps} runs "
            f"({settings.big_map_reps} of 1,000 items) of each and side"
        )
        results["parallel"] = await parallel.measure(
            env, settings.parallel_reps, settings.big_map_reps, skip=settings.skip_shapes
        )

    progress("tuned dev server, in memory, workers without the workflow sandbox")
    async with environment(fast=True, unsandboxed=True, together=True) as env:
        await warm_up(env.sides, [FIVE], settings.warmup)
        progress(
            f"  throughput, {settings.throughput_rounds} rounds of {settings.throughput_flows}"
        )
        results["throughput"]["unsandboxed"] = await throughput(
            env.sides,
            FIVE,
            settings.throughput_flows,
            settings.throughput_rounds,
            env.workers,
            env.server_pid,
        )

    progress("default dev server (fast=False)")
    async with environment(fast=False, together=True) as env:
        await warm_up(env.sides, LATENCY_SHAPES, min(1, settings.warmup))
        progress(f"  latency, {settings.default_latency_reps} runs of each flow and side")
        results["latency"]["default"], ids = await latency(
            env.sides, LATENCY_SHAPES, settings.default_latency_reps
        )
        results["step_phases"]["default"] = await step_phase_medians(
            env.plain, ids[TWENTY.key], PHASE_FLOWS
        )

    progress("tuned dev server, SQLite (fast=True, db_filename=...)")
    with tempfile.TemporaryDirectory(prefix="qwit-bench-") as tmp:
        async with environment(fast=True, db_filename=Path(tmp) / "bench.db", together=True) as env:
            await warm_up(env.sides, [FIVE], settings.warmup)
            progress(f"  throughput, {settings.sqlite_rounds} rounds of {settings.sqlite_flows}")
            results["throughput"]["sqlite"] = await throughput(
                env.sides,
                FIVE,
                settings.sqlite_flows,
                settings.sqlite_rounds,
                env.workers,
                env.server_pid,
            )
    return results


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _temporal_cli_version() -> str:
    try:
        out = subprocess.run(
            [find_temporal_cli(), "--version"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta(settings: Settings, seconds: float, load: tuple[float, ...]) -> dict[str, Any]:
    return {
        "mode": settings.mode,
        "settings": asdict(settings),
        "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "temporalio": version("temporalio"),
        "pydantic": version("pydantic"),
        "qwit": qwit.__version__,
        "temporal_cli": _temporal_cli_version(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "worker_options": WORKER_OPTIONS,
        # Other work on the machine shows here: both sides felt it alike.
        "loadavg_1m_at_start": load[0],
        "loadavg_1m_at_end": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare QWIT with a hand-written Temporal saga doing the same work.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repetitions (under 3 minutes)")
    mode.add_argument("--smoke", action="store_true", help="minimal repetitions (seconds)")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("benchmark-results.json"),
        help="where to write every figure (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL

    started = time.perf_counter()
    load = os.getloadavg()
    results = asyncio.run(measure(settings))
    figures = report.build(results)
    document = {
        "meta": meta(settings, time.perf_counter() - started, load),
        "figures": figures.flat,
        "details": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(report.table(figures))
    print(f"\n{settings.mode} run, {document['meta']['seconds']} s; figures in {args.json}")
    return 0
