"""Server restarts in the test run (short by default; QWIT_RELIABILITY=full: 100 flows)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.reliability.restarts import run_restarts

FULL = os.environ.get("QWIT_RELIABILITY") == "full"


@pytest.mark.timeout(900 if FULL else 300)
async def test_acknowledged_flows_survive_server_restarts(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    report = await run_restarts(100 if FULL else 15, seed, tmp_path, say=print)
    print(report)
    assert report.restarts.count("SIGTERM") == 3
    assert report.restarts.count("SIGKILL") == 3
    assert report.acknowledged > 0
    assert report.ok, f"seed {seed}: lost={report.lost} {report.mismatches[:5]}"


@pytest.mark.timeout(300)
async def test_negative_control_an_in_memory_server_loses_flows(tmp_path: Path) -> None:
    """The same run on a server without persistence must be seen to lose flows."""
    report = await run_restarts(8, 7, tmp_path, persistent=False, say=print)
    assert report.acknowledged > 0
    assert report.lost > 0
    assert not report.ok
