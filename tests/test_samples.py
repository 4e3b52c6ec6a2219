"""Every sample runs as part of the suite, the way its README runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_sample(module: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TEMPORAL_")}
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_order_sample_on_its_own_dev_server():
    proc = run_sample("samples.order")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "starting a local Temporal dev server" in out
    assert '"tracking": "1Z-1001"' in out
    assert "rolled back at step 'payments.charge': StepError: card ending 0002 was declined" in out
    assert "undone, newest first: payments.charge, inventory.reserve" in out
    # the shop's own record: the declined order's reservation was released,
    # nothing was charged for it, stock is back where it was for B-2
    assert "released 1 x B-2" in out
    assert out.count("charged") == 1
    assert "stock now: {'A-1': 8, 'B-2': 3}" in out
    # the declined card is an expected outcome (StepError(retry=False)): no
    # "Completing activity as failed ... Traceback" between the output lines
    assert "Traceback" not in proc.stderr + out


def test_quote_sample_retries_a_segment_falls_back_and_notifies():
    proc = run_sample("samples.quote")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "carrier rate, 1250 cents (carrier segment: done after 2 attempt(s))" in out
    assert "flat rate, 1900 cents (carrier segment: skipped after 3 attempt(s))" in out
    # every slot a failed attempt held was released; only the quoted one stays
    assert out.count("held pickup slot") == 5
    assert out.count("released pickup slot") == 4
    assert "pickup slots still held: 1" in out
    assert "notified: order 3001: carrier rate, 1250 cents" in out
    assert "notified: order 3002: flat rate, 1900 cents" in out
