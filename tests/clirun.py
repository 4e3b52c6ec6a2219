"""Running ``qwit`` as users do: a real subprocess, its exit code and output."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QWIT = [sys.executable, "-c", "from qwit._cli import main; main()"]


@dataclass
class Done:
    code: int
    out: str
    err: str


def cli_env(**env: str) -> dict[str, str]:
    """This process's environment without Temporal's settings, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "QWIT_"))}
    return {**clean, "COLUMNS": "200", **env}


async def start(*args: str, **env: str) -> asyncio.subprocess.Process:
    """Start ``qwit ARGS...`` in the repository root, with pipes for its output."""
    return await asyncio.create_subprocess_exec(
        *QWIT,
        *args,
        cwd=ROOT,
        env=cli_env(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> Done:
    """Wait for a started ``qwit`` to end."""
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def qwit(*args: str, timeout: float = 60, **env: str) -> Done:
    """Run ``qwit ARGS...`` to its end; the test's event loop (and worker) keeps running."""
    return await finish(await start(*args, **env), timeout)


async def read_until(stream: asyncio.StreamReader, text: str, timeout: float = 30) -> str:
    """Read lines until one contains ``text``; everything read so far."""
    seen = []

    async def read() -> str:
        while True:
            line = (await stream.readline()).decode()
            assert line, f"output ended before {text!r}:\n{''.join(seen)}"
            seen.append(line)
            if text in line:
                return "".join(seen)

    return await asyncio.wait_for(read(), timeout)
