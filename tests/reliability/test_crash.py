"""The crash suite in the test run: a short version by default.

QWIT_RELIABILITY=full pytest tests/reliability     # 200 flows, 25 kills
python -m tests.reliability.crash --seed N          # reproduce a run
python -m tests.reliability.crash --engine postgres --pg-restarts 3 --seed N
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.reliability.crash import run_crash

FULL = os.environ.get("QWIT_RELIABILITY") == "full"
#: Seeds that once found a bug: each runs on every change.
REGRESSION_SEEDS = [2]


@pytest.mark.timeout(1800 if FULL else 300)
async def test_flows_survive_their_worker_being_killed(tmp_path: Path) -> None:
    seed = int(os.environ.get("QWIT_CRASH_SEED") or random.randrange(1 << 30))
    flows, kills = (200, 25) if FULL else (12, 2)
    report = await run_crash(flows, kills, seed, tmp_path, say=print)
    print(report)
    assert report.ok, f"seed {seed}: {report.mismatches[:5]} lost={report.lost}"
    assert report.outcomes and sum(report.outcomes.values()) == flows


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", REGRESSION_SEEDS)
async def test_regression_seeds(seed: int, tmp_path: Path) -> None:
    report = await run_crash(12, 2, seed, tmp_path, say=print)
    assert report.ok, f"seed {seed}: {report.mismatches[:5]} lost={report.lost}"


@pytest.mark.timeout(1800 if FULL else 300)
async def test_postgres_flows_survive_killed_workers_and_restarts(tmp_path: Path) -> None:
    """The same on ``qwit.postgres``, with PostgreSQL itself restarted too."""
    seed = int(os.environ.get("QWIT_CRASH_SEED") or random.randrange(1 << 30))
    flows, kills, restarts = (200, 25, 3) if FULL else (12, 2, 1)
    report = await run_crash(
        flows, kills, seed, tmp_path, say=print, engine="postgres", pg_restarts=restarts
    )
    print(report)
    assert report.ok, f"seed {seed}: {report.mismatches[:5]} lost={report.lost}"
    assert report.outcomes and sum(report.outcomes.values()) == flows
