"""Workflow CPU without the server's noise: ``python -m benchmarks.replay``.

Runs one flow of each shape on each side (a tuned dev server, both workers
without the workflow sandbox), fetches their histories, then replays each
history many times in this process: QWIT's with ``QwitPlugin``, the
hand-written saga's with its own workflow. A replay runs all of a worker's
workflow code (decoding every activation, the workflow itself, encoding its
commands) and none of the server's, the network's or the activities', so
its CPU per flow moves far less between runs than a live worker's.

It prints, per shape, the process CPU and the workflow thread's CPU per
flow of each side and their ratio: the lowest over the rounds (what the
code costs when nothing else interferes) and the median. Rounds alternate
which side goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner

from benchmarks.hand_workflow import Parallel, Saga
from benchmarks.measure import progress, run_once
from benchmarks.run import environment
from benchmarks.shapes import FIVE, FIVE_FAIL, TWENTY, Shape
from qwit.temporal import QwitPlugin

SHAPES = (FIVE, TWENTY, FIVE_FAIL)


async def record(shapes: Sequence[Shape]) -> dict[str, dict[str, WorkflowHistory]]:
    """One flow of each shape per side, run live: their histories."""
    histories: dict[str, dict[str, WorkflowHistory]] = {}
    async with environment(fast=True, unsandboxed=True, together=True) as env:
        for side in env.sides:
            for shape in shapes:
                flow_id, _ = await run_once(side, shape)
                history = await env.plain.get_workflow_handle(flow_id).fetch_history()
                histories.setdefault(shape.key, {})[side.name] = history
    return histories


async def _each(history: WorkflowHistory, times: int) -> AsyncIterator[WorkflowHistory]:
    for _ in range(times):
        yield history


async def replay(
    histories: dict[str, dict[str, WorkflowHistory]], flows: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Replay each history ``flows`` times per round: CPU ms per flow."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    replayers = {
        "qwit": Replayer(
            workflows=[],
            plugins=[QwitPlugin(tracing=False)],
            workflow_runner=UnsandboxedWorkflowRunner(),
            workflow_task_executor=executor,
        ),
        "hand": Replayer(
            workflows=[Saga, Parallel],
            workflow_runner=UnsandboxedWorkflowRunner(),
            workflow_task_executor=executor,
        ),
    }
    results: dict[str, dict[str, Any]] = {}
    for key, sides in histories.items():
        process: dict[str, list[float]] = {"qwit": [], "hand": []}
        thread: dict[str, list[float]] = {"qwit": [], "hand": []}
        for name in sides:  # warm up
            await replayers[name].replay_workflows(_each(sides[name], 20))
        for rep in range(rounds):
            for name in ("qwit", "hand") if rep % 2 == 0 else ("hand", "qwit"):
                started_thread = executor.submit(time.thread_time).result()
                started = time.process_time()
                await replayers[name].replay_workflows(
                    _each(sides[name], flows), raise_on_replay_failure=True
                )
                process[name].append((time.process_time() - started) * 1000 / flows)
                ended_thread = executor.submit(time.thread_time).result()
                thread[name].append((ended_thread - started_thread) * 1000 / flows)
        results[key] = {
            figure: {
                "qwit_min": min(values["qwit"]),
                "hand_min": min(values["hand"]),
                "ratio_min": min(values["qwit"]) / min(values["hand"]),
                "qwit_median": statistics.median(values["qwit"]),
                "hand_median": statistics.median(values["hand"]),
                "ratio_median": statistics.median(values["qwit"])
                / statistics.median(values["hand"]),
            }
            for figure, values in (("process", process), ("workflow_thread", thread))
        }
        progress(f"  {key} replayed")
    executor.shutdown()
    return results


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "**CPU of replaying one flow's history (ms; lowest over the rounds, median)**",
        "",
        "| flow | figure | QWIT | hand-written | QWIT / hand (lowest) | (median) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, figures in results.items():
        for figure, f in figures.items():
            lines.append(
                f"| {key} | {figure.replace('_', ' ')} | {f['qwit_min']:.3f} | "
                f"{f['hand_min']:.3f} | {f['ratio_min']:.2f} | {f['ratio_median']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replay")
    parser.add_argument("--flows", type=int, default=200, help="replays per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per side")
    args = parser.parse_args(argv)
    progress("recording one history per shape and side")
    histories = asyncio.run(record(SHAPES))
    # What this process holds already (the recording's client, both sides'
    # modules) is not what is measured: the collector leaves it alone.
    gc.collect()
    gc.freeze()
    progress(f"replaying, {args.rounds} rounds of {args.flows}")
    print(report(asyncio.run(replay(histories, args.flows, args.rounds))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
