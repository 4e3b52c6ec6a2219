"""The user's directory can't shadow Python's modules or QWIT's own imports.

``qwit`` is run as its console script is: the current directory (the user's)
is not on ``sys.path`` until QWIT adds it, after everything else, to import
the modules named on the command line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

from tests.clirun import ROOT, Done, cli_env

FLOWS = """
import qwit


class Hello(qwit.Step, name="local.hello"):
    def step_forward(self, args):
        return {"greeting": f"hello {args['name']}"}


class Greet(qwit.Flow, name="local.greet"):
    def build_flow(self):
        self.step(Hello)
"""

#: An ``fcntl.py`` that, were it imported, would leave a mark (and break the lock).
FAKE_FCNTL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the local fcntl.py ran")
LOCK_EX = LOCK_NB = 0
def flock(fd, op):
    pass
"""


def entry_point(bin_dir: Path) -> Path:
    """A script like the ``qwit`` console script, importing the QWIT under test."""
    bin_dir.mkdir()
    script = bin_dir / "qwit"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(1, {str(ROOT)!r})  # QWIT as installed; not the current directory\n"
        "from qwit._cli import main\n"
        "main()\n"
    )
    return script


async def run_in(directory: Path, script: Path, *args: str, **env: str) -> Done:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args,
        cwd=directory, env=cli_env(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def test_a_local_fcntl_is_never_imported(tmp_path: Path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "greetings.py").write_text(FLOWS)
    (project / "fcntl.py").write_text(FAKE_FCNTL)
    script = entry_point(tmp_path / "bin")
    data = str(tmp_path / "data")

    done = await run_in(project, script, "run", "greetings:Greet", "--args", '{"name": "ann"}',
                        QWIT_DATA_DIR=data)  # fmt: skip
    assert not (project / "IMPORTED").exists(), "the current directory's fcntl.py was imported"
    assert done.code == 0, done.err
    assert json.loads(done.out)["greeting"] == "hello ann"
    assert "ignoring fcntl.py in the current directory" in done.err
    assert "'fcntl' belongs to Python's standard library" in done.err

    # the lock on the state is the real one: a second server can't take the same database
    from qwit._cli._connect import Lock

    held = Lock(tmp_path / "data" / "run.db.lock")
    assert held.acquire(wait=20)  # once the first run's server has stopped
    try:
        again = await run_in(project, script, "run", "greetings:Greet", "--args",
                             '{"name": "bo"}', QWIT_DATA_DIR=data)  # fmt: skip
    finally:
        held.release()
    assert again.code == 0, again.err
    assert f"state in memory: {tmp_path / 'data' / 'run.db'} is in use" in again.err
    assert not (project / "IMPORTED").exists()


async def test_a_local_package_named_like_a_dependency_is_never_imported(tmp_path: Path):
    """cryptography is imported once encryption is on, after the user's module is:
    a ``cryptography/`` of the current directory must not be the one imported."""
    project = tmp_path / "project"
    (project / "cryptography").mkdir(parents=True)
    (project / "cryptography" / "__init__.py").write_text(FAKE_FCNTL)
    (project / "greetings.py").write_text(FLOWS)
    script = entry_point(tmp_path / "bin")
    key = "k1:" + base64.b64encode(b"k" * 32).decode()

    done = await run_in(project, script, "run", "greetings:Greet", "--args", '{"name": "al"}',
                        QWIT_DATA_DIR=str(tmp_path / "data"), QWIT_ENCRYPTION_KEYS=key)  # fmt: skip
    assert not (project / "cryptography" / "IMPORTED").exists(), "the local package was imported"
    assert done.code == 0, done.err
    assert json.loads(done.out)["greeting"] == "hello al"
    assert "ignoring cryptography in the current directory: 'cryptography' belongs to" in done.err


async def test_naming_a_local_module_that_a_standard_one_shadows_is_a_usage_error(
    tmp_path: Path,
):
    project = tmp_path / "project"
    project.mkdir()
    (project / "json.py").write_text(FLOWS)
    (project / "rich").mkdir()
    (project / "rich" / "__init__.py").write_text(FLOWS)
    script = entry_point(tmp_path / "bin")

    done = await run_in(project, script, "graph", "json:Greet")
    assert done.code == 2, done.err
    assert "the current directory's json.py can't be imported as 'json'" in done.err
    assert "that name belongs to Python's standard library; rename it" in done.err

    done = await run_in(project, script, "worker", "rich")
    assert done.code == 2, done.err
    assert "the current directory's rich can't be imported as 'rich'" in done.err
    assert "that name belongs to the module at" in done.err


async def test_local_modules_are_still_found(tmp_path: Path):
    project = tmp_path / "project"
    (project / "shop").mkdir(parents=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "flows.py").write_text(FLOWS)
    script = entry_point(tmp_path / "bin")
    done = await run_in(project, script, "graph", "shop.flows:Greet")
    assert done.code == 0, done.err
    assert "local.hello" in done.out
