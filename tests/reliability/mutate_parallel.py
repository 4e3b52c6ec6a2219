"""Mutations of the parallel saga rules, and which tests catch them.

    python -m tests.reliability.mutate_parallel [ENGINE] [TEST_FILE]

Each mutation breaks one rule of parallel blocks and maps in
``qwit/_saga.py`` (restored afterwards, whatever happens); the tests of
TEST_FILE (default ``tests/test_parallel.py``) on ENGINE (default ``local``)
run against it and must fail. Prints CAUGHT or NOT CAUGHT for each; exits 1
if any mutation was not caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAGA = ROOT / "qwit" / "_saga.py"

UNDO_NEWEST_FIRST = (
    "            for run in ([failed] if failed is not None else []) + self.saga.done"
)
MUTATIONS = {
    "undo in plan order, not reverse dependency order": (
        f"{UNDO_NEWEST_FIRST}[::-1]:\n                await self._undo(run)",
        f"{UNDO_NEWEST_FIRST}:\n                await self._undo(run)",
    ),
    "a failed member undone before its siblings stopped": (
        "                raise _Stop(reaction, run, undo_failed=False)",
        "                await self._undo(run)\n"
        "                raise _Stop(reaction, run, undo_failed=False)",
    ),
    "siblings of a stop not cancelled": (
        "                            other.stopping = True\n"
        "                            task.cancel()",
        "                            other.stopping = False",
    ),
    "a map's undos not limited to max_concurrency": (
        "        gate = asyncio.Semaphore(limit) if limit is not None and limit < len(todo) "
        "else None",
        "        gate = None",
    ),
    "members undone one after the other (not side by side)": (
        "        await asyncio.gather(*(undo(member) for member in todo))",
        "        for member in todo:\n            await undo(member)",
    ),
}


def main(engine: str, tests: str) -> int:
    original = SAGA.read_text()
    missed = 0
    try:
        for name, (old, new) in MUTATIONS.items():
            if original.count(old) != 1:
                raise SystemExit(f"mutation {name!r}: its code is no longer in {SAGA}")
            SAGA.write_text(original.replace(old, new))
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            proc = subprocess.run(
                [*command, tests, "-k", engine, "-x"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=900,
            )
            lines = proc.stdout.strip().splitlines()
            failed = [line for line in lines if line.startswith("FAILED")]
            caught = proc.returncode != 0
            missed += not caught
            verdict = "CAUGHT" if caught else "NOT CAUGHT"
            print(f"{name}: {verdict} ({lines[-1] if lines else ''}) {failed[:1]}", flush=True)
    finally:
        SAGA.write_text(original)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1] if len(sys.argv) > 1 else "local",
            sys.argv[2] if len(sys.argv) > 2 else "tests/test_parallel.py",
        )
    )
