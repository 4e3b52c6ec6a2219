"""docker-compose.yml's exposure and versions (it can't run here: no Docker engine).

Every published port listens on the loopback interface unless the user says
otherwise (QWIT_BIND): Temporal's gRPC port and its web UI have no
authentication in this stack. The Temporal server and UI are those the tests
run, so that what the suite proves holds for the stack.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from qwit.temporal import find_temporal_cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
SERVICES: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)["services"]
README = (ROOT / "README.md").read_text()

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VARIABLE.sub(value, text)


def published(port: Any, env: dict[str, str]) -> tuple[str, str]:
    """(host ip, host port) of one entry of a service's ``ports``; ip "" is every interface."""
    if isinstance(port, dict):  # the long syntax
        return interpolate(str(port.get("host_ip", "")), env), str(port.get("published", ""))
    mapping = interpolate(str(port), env).split("/")[0]
    parts = mapping.rsplit(":", 2)
    if len(parts) == 3:
        return parts[0].strip("[]"), parts[1]
    if len(parts) == 2:
        return "", parts[0]
    return "", ""  # a container port alone: Docker picks a host port, on every interface


def all_ports() -> list[tuple[str, Any]]:
    return [(name, port) for name, s in SERVICES.items() for port in s.get("ports", [])]


def test_the_stack_publishes_temporal_and_its_ui():
    names = {name for name, _ in all_ports()}
    assert {"temporal", "temporal-ui"} <= names


@pytest.mark.parametrize(("service", "port"), all_ports())
def test_every_published_port_is_on_loopback_by_default(service: str, port: Any):
    ip, host_port = published(port, env={})
    assert ip == "127.0.0.1", f"{service} publishes {port!r} on {ip or 'every interface'}"
    assert host_port.isdigit(), f"{service}: {port!r} has no fixed host port"


@pytest.mark.parametrize(("service", "port"), all_ports())
def test_qwit_bind_exposes_them_on_purpose(service: str, port: Any):
    assert published(port, env={"QWIT_BIND": "0.0.0.0"})[0] == "0.0.0.0"
    assert published(port, env={"QWIT_BIND": ""})[0] == "127.0.0.1"  # set but empty: the default


def test_the_readme_says_how_to_expose_them():
    docker = README.split("## Docker", 1)[1].split("\n## ", 1)[0]
    assert "QWIT_BIND=0.0.0.0 docker compose up" in docker
    assert "127.0.0.1" in docker
    assert "QWIT_BIND" in COMPOSE_TEXT.split("services:", 1)[0]  # the file's own header says it


def test_interpolation_follows_compose():
    assert interpolate("${A:-x}:${B-y}:${C}:$$D", {"B": ""}) == "x::" + ":$D"
    assert interpolate("${A:-x}", {"A": "1"}) == "1"


def _versions() -> dict[str, str]:
    out = subprocess.run(
        [find_temporal_cli(), "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    found = re.search(r"Server (\d+\.\d+\.\d+), UI (\d+\.\d+\.\d+)", out)
    assert found, out
    return {"server": found.group(1), "ui": found.group(2)}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_temporal_versions_are_those_the_tests_run():
    tested = _versions()
    tag = {name: s["image"].rpartition(":")[2] for name, s in SERVICES.items() if "image" in s}
    for service in ("temporal", "temporal-schema", "temporal-setup"):
        assert _minor(tag[service]) == _minor(tested["server"]), (service, tag[service], tested)
    assert _minor(tag["temporal-ui"]) == _minor(tested["ui"]), (tag["temporal-ui"], tested)


def test_the_trace_viewer_is_an_optional_profile_the_worker_exports_to():
    jaeger = SERVICES["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    image, _, tag = jaeger["image"].rpartition(":")
    assert image == "jaegertracing/all-in-one"
    assert re.fullmatch(r"\d+\.\d+\.\d+", tag), "pinned, not latest"
    worker = SERVICES["qwit-worker"]["environment"]
    assert worker["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert interpolate(str(worker["QWIT_TRACING"]), {}) == "0"
    assert interpolate(str(worker["QWIT_TRACING"]), {"QWIT_TRACING": "1"}) == "1"
    assert "--profile tracing" in COMPOSE_TEXT and "--profile tracing" in README


def test_every_image_is_pinned():
    # Images built from this checkout (and the services that reuse them) are
    # the project's own: their tag says so, not a version kept twice.
    built = {s["image"] for s in SERVICES.values() if "build" in s}
    for name, service in SERVICES.items():
        if "image" in service and service["image"] not in built:
            assert re.search(r":\d[\w.-]*$", service["image"]), (name, service["image"])


def test_the_postgres_engine_is_an_optional_profile_on_the_same_postgresql():
    worker = SERVICES["qwit-postgres-worker"]
    assert worker["profiles"] == ["postgres"]
    assert worker["image"] == SERVICES["qwit-worker"]["image"]
    assert worker["command"][:3] == ["qwit-worker", "--backend", "postgres"]
    dsn = worker["environment"]["QWIT_POSTGRES_DSN"]
    assert "@postgresql:5432/" in dsn and not dsn.endswith("/temporal")  # not Temporal's own
    assert "postgresql" in worker["depends_on"]
    assert "--profile postgres" in COMPOSE_TEXT
