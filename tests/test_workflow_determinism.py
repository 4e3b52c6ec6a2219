"""The generic workflow runs outside temporalio's sandbox, so nothing checks at
run time that its code stays deterministic. This test reads the modules it
runs and refuses what would make a replay differ from the run it replays:
clocks, randomness, the environment, files, threads, processes.

(``qwit._runtime`` and ``qwit._tracing`` are left out: the first's defaults,
a monotonic clock and ``asyncio.sleep``, are replaced by the Temporal
workflow's ``_Runtime``; the second reads the environment when a worker is
set up, and in a workflow uses temporalio's replay-safe tracer.)
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qwit"

#: The modules a QWIT workflow runs (the interpreter and the data it keeps).
WORKFLOW_MODULES = [
    "_saga.py",
    "_plan.py",
    "_state.py",
    "_errors.py",
    "_options.py",
    "_jsonargs.py",
    "_metrics.py",
    "temporal/_workflow.py",
]

FORBIDDEN_MODULES = {
    "time",
    "random",
    "uuid",
    "secrets",
    "os",
    "threading",
    "subprocess",
    "socket",
    "multiprocessing",
}
#: Calls that read a clock or the outside world whatever their module.
FORBIDDEN_CALLS = {"now", "utcnow", "today", "open", "input", "getenv"}


def problems(source: str) -> list[str]:
    """What in ``source`` would make a workflow nondeterministic."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.partition(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.partition(".")[0]]
        else:
            names = []
        found += [f"line {node.lineno}: imports {n}" for n in names if n in FORBIDDEN_MODULES]
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            # (``workflow.now()`` is Temporal's replay-safe clock, and
            # ``self.runtime.now()`` the engine's, which on Temporal is it)
            receiver = func.value if isinstance(func, ast.Attribute) else None
            replay_safe = (isinstance(receiver, ast.Name) and receiver.id == "workflow") or (
                isinstance(receiver, ast.Attribute) and receiver.attr == "runtime"
            )
            if name in FORBIDDEN_CALLS and not replay_safe:
                found.append(f"line {node.lineno}: calls {name}()")
    return found


@pytest.mark.parametrize("module", WORKFLOW_MODULES)
def test_the_workflow_modules_read_no_clock_randomness_or_outside_world(module: str):
    assert problems((ROOT / module).read_text()) == []


def test_the_check_refuses_what_it_should():
    source = (
        "import time\nfrom os import environ\nimport datetime\n"
        "x = datetime.datetime.now()\ny = open('f')\nz = workflow.now()\n"
        "w = self.runtime.now()\n"
    )
    assert problems(source) == [
        "line 1: imports time",
        "line 2: imports os",
        "line 4: calls now()",
        "line 5: calls open()",
    ]


def test_the_temporal_runtime_replaces_the_default_clock():
    # FlowRuntime.now() reads a monotonic clock; in a workflow it must be
    # Temporal's (asyncio.sleep, the default sleep, is a durable timer there).
    from qwit._runtime import FlowRuntime
    from qwit.temporal._workflow import _Runtime

    assert _Runtime.now is not FlowRuntime.now
    assert "workflow.time()" in inspect.getsource(_Runtime.now)
