"""Mutations of the recovery rules (fallbacks, retried segments, redrive,
cancel modes, stopped rollbacks, final steps), and which tests catch them.

    python -m tests.reliability.mutate_recovery [ENGINE] [TEST_FILE ...]

Each mutation breaks one rule in ``qwit/`` (the file is restored afterwards,
whatever happens); the tests (default ``tests/test_property_recovery.py``
and ``tests/test_recovery.py``) on ENGINE (default ``local``) run against it
and must fail. Prints CAUGHT or NOT CAUGHT for each; exits 1 if any
mutation was not caught. ``QWIT_PROPERTY_EXAMPLES`` (set to 60 here unless
given) sets the property test's flows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAGA = "qwit/_saga.py"
PREFILLED = '                if run.status == "done":\n'

MUTATIONS = {
    "a redrive runs under the earlier run's keys": (
        "qwit/_redrive.py",
        '{"execution": secrets.token_urlsafe(16), "redrive": redrive, "payload_limit": None}',
        '{"redrive": redrive, "payload_limit": None}',
    ),
    "a redrive does not undo what it runs again": (
        SAGA,
        "            if self.saga.undo_first:\n",
        "            if False:\n",
    ),
    "a redriven flow's rollback skips the earlier run's steps": (
        SAGA,
        PREFILLED + "                    self.saga.done.append(run)\n",
        PREFILLED + "                    pass\n",
    ),
    "a retried segment reuses its first attempt's keys": (
        SAGA,
        "child_execution(execution, run.path, run.runs),",
        "child_execution(execution, run.path, 1),",
    ),
    "a fallback leaves the failed attempt's effect": (
        SAGA,
        "        if run.has_effect:\n            await self._undo(run)\n        args = run.args",
        "        args = run.args",
    ),
    "a cancel without rollback rolls back": (
        SAGA,
        "        if not self._cancel_rolls_back:\n            return await self._stop_in_place()",
        "        if False:\n            return await self._stop_in_place()",
    ),
    "an undo that fails with ABORT does not stop the rollback": (
        SAGA,
        "                    self.saga.rollback_stopped = True  # what is left stays as it is",
        "                    pass",
    ),
    "final steps run before the rollback": (
        SAGA,
        "            await self.runtime.shield(self._finally(failed.info))",
        "            pass",
    ),
}


def main(engine: str, tests: list[str]) -> int:
    missed = 0
    env = {"QWIT_PROPERTY_EXAMPLES": "60", **os.environ}
    for name, (file, old, new) in MUTATIONS.items():
        path = ROOT / file
        original = path.read_text()
        if original.count(old) != 1:
            raise SystemExit(f"mutation {name!r}: its code is no longer in {file}")
        try:
            path.write_text(original.replace(old, new))
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
            proc = subprocess.run(
                [*command, *tests, "-k", engine, "-x"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=900,
                env=env,
            )
        finally:
            path.write_text(original)
        lines = proc.stdout.strip().splitlines()
        failed = [line for line in lines if line.startswith("FAILED")]
        caught = proc.returncode != 0
        missed += not caught
        verdict = "CAUGHT" if caught else "NOT CAUGHT"
        print(f"{name}: {verdict} ({lines[-1] if lines else ''}) {failed[:1]}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(
        main(
            sys.argv[1] if len(sys.argv) > 1 else "local",
            sys.argv[2:] or ["tests/test_property_recovery.py", "tests/test_recovery.py"],
        )
    )
