"""The README's examples are real code: run them."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any

import qwit

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_module() -> types.ModuleType:
    """The README's first python blocks (the seed's example), as a module."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    module = types.ModuleType("readme_example")
    for block in blocks[:2]:
        exec(compile(block, "README.md", "exec"), module.__dict__)
    return module


async def test_seed_example_runs(client: qwit.Client, worker: Any):
    example = readme_module()
    async with worker(example.ExampleFlow, example.Example2):
        result = await client.run(example.ExampleFlow, {"request_id": 7})
        nested = await client.run(example.Example2, {"request_id": 8})
    assert result == {"request_id": 7, "arg2": "value2"}
    assert nested["arg2"] == "value2"
    plan = client.prepare(example.Example2).flow
    assert [s.name for s in plan.steps] == ["ExampleFlow", "Example"]


def test_quick_start_commands_are_two_and_use_the_sample():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    assert len(commands) == 2
    assert commands[0].count(".venv/bin/qwit run samples.order.flows:PlaceOrder") == 2
    assert "pytest" in commands[1]
    assert "<!-- test-command -->" in quick


async def test_quick_start_qwit_runs_work_word_for_word(tmp_path):
    """The quick start's `qwit run`s, exactly as written, on a fresh data directory."""
    import shlex

    from tests.clirun import qwit

    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first = re.findall(r"```sh\n(.*?)\n```", quick, re.S)[0]
    runs = [shlex.split(part)[1:] for part in first.split(" && ") if "bin/qwit run" in part]
    env = {"QWIT_DATA_DIR": str(tmp_path / "data")}
    completed = await qwit(*runs[0], timeout=120, **env)
    assert completed.code == 0, completed.err
    assert json.loads(completed.out)["tracking"] == "1Z-1"
    declined = await qwit(*runs[1], timeout=120, **env)
    assert declined.code == 1
    assert declined.out == ""
    assert "payments.charge" in declined.err
    assert "declined" in declined.err
    assert "inventory.reserve" in declined.err
