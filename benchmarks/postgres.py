"""``python -m benchmarks.postgres``: QWIT on PostgreSQL against a hand-written
DBOS saga on the same PostgreSQL, and QWIT on Temporal, in one run.

    python -m benchmarks.postgres            # 30 runs a shape, 200 flows in flight, 2 rounds
    python -m benchmarks.postgres --quick    # 10 runs, 1 round
    python -m benchmarks.postgres --smoke    # every comparison once
    python -m benchmarks.postgres --json out.json   # default: benchmark-postgres.json

(The full run the README reports is kept in ``benchmarks/results/postgres-full.json``.)

It starts one embedded PostgreSQL (a database per side) and a Temporal dev
server, and runs each side in a process of its own (``benchmarks.pg_side``:
the client and the worker, or DBOS, in that process, as in an application),
the sides in turn and in alternating order over the rounds. Reported: p50
latency of 1, 5 and 20 steps and of the failure path (a failure at step 5,
4 undone), latency per step (20 steps), throughput with 200 flows in
flight, the side's process CPU per flow in the throughput run, and
PostgreSQL's CPU per flow over the side's whole run. Ratios are QWIT on
PostgreSQL over DBOS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg

from qwit.postgres import EmbeddedPostgres
from qwit.temporal import DevServer

ROOT = Path(__file__).resolve().parent.parent
SIDES = ["qwit-postgres", "dbos", "qwit-temporal"]
MODES = {
    "full": {"warmup": 3, "reps": 30, "flows": 200, "rounds": 2},
    "quick": {"warmup": 2, "reps": 10, "flows": 200, "rounds": 1},
    "smoke": {"warmup": 0, "reps": 1, "flows": 10, "rounds": 1},
}


def server_cpu(pid: int) -> float:
    """CPU seconds of the PostgreSQL postmaster and its backends so far."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        return total
    except psutil.Error:
        return 0.0


def run_side(side: str, settings: dict[str, Any], pg_pid: int) -> dict[str, Any]:
    before = server_cpu(pg_pid)
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.pg_side", side, json.dumps(settings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = settings["warmup"] * 4 + settings["reps"] * 4 + settings["flows"]
    out["pg_cpu_ms_per_flow"] = (server_cpu(pg_pid) - before) * 1000 / runs
    out["side_seconds"] = time.perf_counter() - began
    return out


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for side, rounds in results.items():
        figures: dict[str, float] = {}
        for shape in rounds[0]["latency"]:
            runs = [t for r in rounds for t in r["latency"][shape]]
            figures[f"p50 {shape} (ms)"] = statistics.median(runs) * 1000
        figures["per step, 20 steps (ms)"] = figures["p50 20 steps (ms)"] / 20
        figures["throughput (flows/s)"] = statistics.median(
            r["throughput"]["flows"] / r["throughput"]["seconds"] for r in rounds
        )
        figures["process CPU per flow (ms)"] = statistics.median(
            r["throughput"]["cpu_seconds"] * 1000 / r["throughput"]["flows"] for r in rounds
        )
        figures["PostgreSQL CPU per flow (ms)"] = statistics.median(
            r["pg_cpu_ms_per_flow"] for r in rounds
        )
        summary[side] = figures
    return summary


def table(summary: dict[str, dict[str, float]]) -> str:
    sides = [s for s in SIDES if s in summary]
    rows = list(summary[sides[0]])
    head = f"{'':32}" + "".join(f"{s:>15}" for s in sides) + f"{'pg/dbos':>10}"
    lines = [head]
    for row in rows:
        cells = "".join(f"{summary[s][row]:>15.2f}" for s in sides)
        ratio = ""
        if "qwit-postgres" in summary and "dbos" in summary and summary["dbos"][row]:
            ratio = f"{summary['qwit-postgres'][row] / summary['dbos'][row]:>9.2f}x"
        lines.append(f"{row:32}{cells}{ratio:>10}")
    return "\n".join(lines)


async def main_async(mode: str, sides: list[str], json_path: Path) -> int:
    settings = dict(MODES[mode])
    rounds = settings.pop("rounds")
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    async with EmbeddedPostgres() as pg:
        assert pg.pid is not None
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for side in sides:
                db = side.replace("-", "_")
                conn.execute(f"DROP DATABASE IF EXISTS {db}")
                conn.execute(f"CREATE DATABASE {db}")
        base = pg.dsn.rsplit("/", 1)[0]
        server: DevServer | None = None
        if "qwit-temporal" in sides:
            server = DevServer()
            await server.__aenter__()
        try:
            for round_ in range(rounds):
                order = sides if round_ % 2 == 0 else list(reversed(sides))
                for side in order:
                    print(f"round {round_ + 1}/{rounds}: {side}", file=sys.stderr, flush=True)
                    side_settings = {
                        **settings,
                        "dsn": f"{base}/{side.replace('-', '_')}",
                        "address": server.address if server else None,
                    }
                    done = await asyncio.to_thread(run_side, side, side_settings, pg.pid)
                    results[side].append(done)
        finally:
            if server is not None:
                await server.__aexit__(None, None, None)
    summary = summarise(results)
    print(table(summary))
    text = json.dumps({"mode": mode, "summary": summary, "raw": results}, indent=1)
    await asyncio.to_thread(json_path.write_text, text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true")
    group.add_argument("--smoke", action="store_true")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--json", type=Path, default=Path("benchmark-postgres.json"))
    options = parser.parse_args()
    mode = "smoke" if options.smoke else "quick" if options.quick else "full"
    sides = [s for s in options.sides.split(",") if s]
    return asyncio.run(main_async(mode, sides, options.json))


if __name__ == "__main__":
    sys.exit(main())
