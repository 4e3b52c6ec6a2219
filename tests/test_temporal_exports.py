"""What the command line takes from ``qwit.temporal``: public names only; and a
dev server with a database keeps its files private without touching the
process's umask."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import qwit.temporal
from qwit.temporal import DevServer

CLI = Path(__file__).resolve().parents[1] / "qwit" / "_cli"


def test_qwit_temporal_exports_what_the_cli_needs():
    from qwit.temporal import ENCODING, KEY_ID_METADATA, QWIT_FLOW, QWIT_STATUS

    assert (QWIT_FLOW.name, QWIT_STATUS.name) == ("QwitFlow", "QwitStatus")
    assert ENCODING == b"binary/encrypted" and KEY_ID_METADATA == "encryption-key-id"
    for name in ("ENCODING", "KEY_ID_METADATA", "QWIT_FLOW", "QWIT_STATUS"):
        assert name in qwit.temporal.__all__


def test_the_cli_imports_no_private_module_of_qwit_temporal():
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module if node.level == 0 else "qwit." + node.module
                assert not module.startswith("qwit.temporal._"), (path.name, module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("qwit.temporal._"), (path.name, alias.name)


def test_the_cli_leaves_the_process_umask_alone():
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            assert name != "umask", path.name


async def test_a_dev_server_with_a_database_creates_its_files_0600(tmp_path: Path):
    db = tmp_path / "temporal.db"
    previous = os.umask(0o022)
    try:
        async with DevServer(db_filename=db):
            assert os.umask(0o022) == 0o022  # this process's umask is untouched
        files = sorted(tmp_path.iterdir())
        assert db in files
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
        assert all(mode == 0o600 for mode in modes.values()), modes
    finally:
        os.umask(previous)
