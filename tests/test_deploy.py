"""docker-compose.yml can't run here (no Docker engine): check its structure,
its agreement with the README and the Dockerfile, and run its setup script
against a real dev server with the same `temporal` CLI the admin-tools image has."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

import qwit
from qwit.temporal import DevServer, find_temporal_cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_compose_has_the_stack():
    assert set(SERVICES) >= {"postgresql", "temporal", "temporal-ui", "qwit-worker"}
    assert "qwit-postgres" in COMPOSE["volumes"], "PostgreSQL data must persist in a volume"
    assert any(v.startswith("qwit-postgres:") for v in SERVICES["postgresql"]["volumes"])


def test_every_image_is_pinned():
    built = {s["image"] for s in SERVICES.values() if "build" in s}
    for name, service in SERVICES.items():
        image = service.get("image")
        if "build" in service or image in built:
            continue  # built from this checkout
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"\d+(\.\d+)+", tag), f"{name}: {image} is not pinned"
    versions = {
        SERVICES[s]["image"].split(":")[1]
        for s in ("temporal", "temporal-schema", "temporal-setup")
    }
    assert len(versions) == 1, "server and admin-tools must share a version"
    base = (ROOT / "Dockerfile").read_text().splitlines()[1]
    assert re.fullmatch(r"FROM python:\d+\.\d+\.\d+-slim-\w+", base), base


def test_worker_service_serves_the_order_sample():
    worker = SERVICES["qwit-worker"]
    assert worker["build"] == "."
    command = worker["command"]
    assert command[0] == "qwit-worker"
    for module in command[1:]:
        registered = qwit.temporal.QwitPlugin(importlib.import_module(module)).registry
        assert "payments.charge" in registered.steps
    env = worker["environment"]
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert env["QWIT_TASK_QUEUE"] == "qwit"
    # it must get time to finish steps in flight (the worker's graceful shutdown is 30 s)
    assert int(worker["stop_grace_period"].rstrip("s")) > 30


def test_scripts_and_configs_it_mounts_exist():
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
        command = service.get("command", [])
        for part in command:
            if part.startswith("/qwit/"):
                assert (ROOT / "deploy/temporal" / part.removeprefix("/qwit/")).is_file()
    dynamic = SERVICES["temporal"]["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    assert (ROOT / "deploy/temporal/dynamicconfig" / Path(dynamic).name).is_file()


def test_readme_agrees_with_compose():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up --build" in readme
    # HOST_IP:HOST_PORT:CONTAINER_PORT: the host port is the one before last
    ui_port = SERVICES["temporal-ui"]["ports"][0].split(":")[-2]
    grpc_port = SERVICES["temporal"]["ports"][0].split(":")[-2]
    assert f"http://localhost:{ui_port}" in readme
    assert f"localhost:{grpc_port}" in readme
    assert " ".join(SERVICES["qwit-worker"]["command"]) in readme


@pytest.mark.parametrize("runs", [2])
async def test_namespace_script_registers_search_attributes(runs: int, tmp_path: Path):
    cli_dir = tmp_path / "bin"
    cli_dir.mkdir()
    (cli_dir / "temporal").symlink_to(find_temporal_cli())
    async with DevServer(search_attributes=()) as server:
        env = {
            **os.environ,
            "PATH": f"{cli_dir}:{os.environ['PATH']}",
            "TEMPORAL_ADDRESS": server.address,
        }
        for _ in range(runs):  # the script must be safe to run again
            proc = subprocess.run(
                ["sh", str(ROOT / "deploy/temporal/create-namespace.sh")],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
        listed = subprocess.run(
            ["temporal", "operator", "search-attribute", "list", "-n", "default"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    assert "QwitFlow" in listed and "QwitStatus" in listed
