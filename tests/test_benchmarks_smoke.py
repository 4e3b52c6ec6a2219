"""The benchmark suite runs end to end (smoke mode) and reports every figure.

No speed is checked here: timings on a shared machine belong to the
benchmark's own report, not to pass/fail.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.parallel import PARALLEL_SHAPES
from benchmarks.run import FULL, QUICK, SMOKE

ROOT = Path(__file__).resolve().parent.parent

LATENCY_SHAPES = ["1_steps", "5_steps", "20_steps", "5_steps_fail", "5_local_steps"]
BIG = [f"{n}_steps_1kb{typing}" for n in (25, 50) for typing in ("", "_typed_forward", "_typed")]
TYPED = ["5_steps_typed", "20_steps_typed"]
#: The smoke run leaves out the failing map of 1,000 items (the full and quick
#: runs do not: ``test_only_the_smoke_run_leaves_a_shape_out``).
PARALLEL = [
    f"{kind}{fail}"
    for kind in ("parallel_5", "map_100", "map_1000")
    for fail in ("", "_fail")
    if f"{kind}{fail}" not in SMOKE.skip_shapes
]
#: The history of a QWIT flow is at most this many times the hand-written
#: saga's for the same flow. Sizes, not timings: the same on every run but for
#: the lengths of random ids.
HISTORY_BYTES_GOAL = 1.25


def expected_keys() -> list[tuple[str, str]]:
    """(value key without the side, ratio key) for every figure."""
    figures: list[tuple[str, str]] = []

    def figure(metric: str, unit: str, suffix: str) -> None:
        unit_part = f"_{unit}" if unit else ""
        figures.append((f"{metric}{unit_part}_{{side}}{suffix}", f"{metric}_ratio{suffix}"))

    for server in ("", "_default_server"):
        for shape in LATENCY_SHAPES:
            for q in ("p50", "p95"):
                figure(f"latency_{q}", "ms", f"_{shape}{server}")
        figure("latency_per_step", "ms", server)
        for phase in ("activity", "task_dispatch", "task_run", "first_task_run"):
            figure(f"step_{phase}", "ms", server)
    for store in ("", "_unsandboxed", "_sqlite"):
        figure("throughput", "flows_per_s", store)
        figure("throughput_steps", "per_s", store)
        for part in ("worker_cpu", "server_cpu", "client_cpu"):
            figure(part, "ms_per_flow", store)
    for shape in LATENCY_SHAPES:
        figure("history_events", "", f"_{shape}")
        figure("history_bytes", "", f"_{shape}")
        figure("workflow_input", "bytes", f"_{shape}")
    for shape in BIG + TYPED:
        figure("history_bytes", "", f"_{shape}")
    for typing in ("", "_typed_forward", "_typed"):
        figure("history_growth_exponent", "", f"_1kb{typing}")
    for shape in PARALLEL:
        figure("latency_p50", "ms", f"_{shape}")
        figure("worker_cpu", "ms_per_flow", f"_{shape}")
        figure("history_events", "", f"_{shape}")
        figure("history_bytes", "", f"_{shape}")
    figure("worker_rss_idle", "mb", "")
    figure("worker_rss_peak", "mb", "")
    figure("worker_ready", "s", "")
    return figures


def run_benchmark(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` from the repository root, which must succeed
    (without the caller's ``TEMPORAL_*`` settings: it starts its own server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    proc = run_benchmark("benchmarks", "--smoke", "--json", str(path))
    assert "| figure | QWIT | hand-written | QWIT / hand |" in proc.stdout
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_every_figure_has_both_sides_and_a_ratio(report: dict[str, Any]) -> None:
    figures = report["figures"]
    missing = []
    for value_key, ratio_key in expected_keys():
        for key in (value_key.format(side="qwit"), value_key.format(side="hand"), ratio_key):
            if key not in figures:
                missing.append(key)
    assert not missing, f"missing figures: {missing}"
    for key in ("history_events_ratio", "history_bytes_ratio", "throughput_ratio"):
        assert key in figures


def test_values_are_sane(report: dict[str, Any]) -> None:
    figures = report["figures"]
    for key, value in figures.items():
        assert isinstance(value, (int, float)), key
        if "cpu" in key and "parallel" in key:
            # One smoke run of a flow of a few ms of CPU: Linux counts a
            # process's CPU in 10 ms ticks, so it may read 0 (and its ratio NaN).
            assert value >= 0 or math.isnan(value), f"{key} = {value}"
            continue
        assert math.isfinite(value), key
        if "growth_exponent" not in key:
            assert value > 0, f"{key} = {value}"
    assert figures["history_events_ratio"] > 0
    # More steps take longer, on both sides.
    for side in ("qwit", "hand"):
        assert (
            figures[f"latency_p50_ms_{side}_20_steps"] > figures[f"latency_p50_ms_{side}_1_steps"]
        )
        assert (
            figures[f"history_bytes_{side}_50_steps_1kb"]
            > figures[f"history_bytes_{side}_25_steps_1kb"]
        )


def test_both_sides_did_the_same_work(report: dict[str, Any]) -> None:
    history = report["details"]["history"]
    for side in ("qwit", "hand"):
        assert history["5_steps"][side]["activities_forward"] == 5
        assert history["5_steps_fail"][side]["activities_forward"] == 5
        assert history["5_steps_fail"][side]["activities_back"] == 4
        assert history["5_local_steps"][side]["markers"] == 5
        assert history["5_local_steps"][side]["activities_forward"] == 0
        # each map element ran once
        parallel = report["details"]["parallel"]
        assert parallel["map_100"][side]["activities_forward"] == 100
        assert parallel["map_1000"][side]["activities_forward"] == 1000
        assert 0 < parallel["map_100_fail"][side]["activities_back"] <= 100
    assert report["meta"]["mode"] == "smoke"


@pytest.mark.parametrize("shape", ["5_steps", "5_steps_typed", "20_steps_typed"])
def test_history_bytes_are_within_the_goal(report: dict[str, Any], shape: str) -> None:
    # Untyped steps are sent every arg the flow has so far (the contract), so
    # the 20-step untyped flow is over it: the hand-written saga sends each
    # activity only what it reads, as typed steps are sent.
    ratio = report["figures"][f"history_bytes_ratio_{shape}"]
    assert ratio <= HISTORY_BYTES_GOAL, f"{shape}: {ratio:.3f}"


@pytest.mark.timeout(600)
def test_the_postgres_benchmark_runs_and_reports_every_figure(tmp_path: Path):
    """``python -m benchmarks.postgres --smoke``: QWIT on PostgreSQL and the
    hand-written DBOS saga, every figure of both sides reported."""
    out = tmp_path / "pg.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.postgres",
            "--smoke",
            "--sides",
            "qwit-postgres,dbos",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("QWIT_")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"qwit-postgres", "dbos"}
    for side, figures in summary.items():
        assert set(figures) == set(summary["dbos"]), side
        for name, value in figures.items():
            assert math.isfinite(value) and value >= 0, (side, name, value)
        assert figures["throughput (flows/s)"] > 0
    assert "pg/dbos" in proc.stdout


def test_a_figure_from_paired_runs_reports_the_spread_of_their_ratios():
    from benchmarks.report import Figures, table

    figures = Figures()
    figures.add("S", "flows/s", "throughput", "flows_per_s", "", 10.0, 10.0, ([9, 11], [10, 10]))
    figures.add("S", "bytes", "history_bytes", "", "", 120, 100)
    assert figures.flat["throughput_ratio_min"] == 0.9
    assert figures.flat["throughput_ratio_max"] == 1.1
    assert "history_bytes_ratio_min" not in figures.flat  # one value: no spread
    lines = table(figures).splitlines()
    assert lines[2].endswith("| QWIT / hand | lowest-highest |")
    assert lines[4] == "| flows/s | 10 | 10 | 1.00 | 0.90-1.10 |"
    assert lines[5] == "| bytes | 120 | 100 | 1.20 |  |"


def test_only_the_smoke_run_leaves_a_shape_out(report: dict[str, Any]) -> None:
    shapes = {shape.key for shape in PARALLEL_SHAPES}
    assert FULL.skip_shapes == QUICK.skip_shapes == ()
    assert set(SMOKE.skip_shapes) == {"map_1000_fail"} <= shapes
    assert set(report["details"]["parallel"]) == shapes - set(SMOKE.skip_shapes)


def test_the_replay_benchmark_replays_both_sides_histories() -> None:
    proc = run_benchmark("benchmarks.replay", "--flows", "2", "--rounds", "2")
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ")]
    figures = {(row[0].strip(), row[1].strip()): row[2:] for row in rows[1:]}
    for shape in ("5_steps", "20_steps", "5_steps_fail"):
        for figure in ("process", "workflow thread"):
            values = [float(v) for v in figures[shape, figure]]
            assert all(math.isfinite(v) and v > 0 for v in values), (shape, figure, values)
