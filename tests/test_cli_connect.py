"""Where the command line finds Temporal and keeps its state."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qwit._cli import cli
from qwit._cli._connect import Lock, address_configured, data_dir
from qwit.temporal._devserver import free_port


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    for name in ("TEMPORAL_ADDRESS", "TEMPORAL_PROFILE", "QWIT_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    # no config file of the user's own
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_data_dir_per_user_or_as_set(no_env, tmp_path):
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "qwit"
    no_env.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "qwit"
    no_env.setenv("QWIT_DATA_DIR", str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine"


def test_an_address_comes_from_env_a_profile_or_the_option(no_env, tmp_path):
    assert not address_configured(None)
    assert address_configured("127.0.0.1:7233")
    no_env.setenv("TEMPORAL_ADDRESS", "temporal:7233")
    assert address_configured(None)
    no_env.delenv("TEMPORAL_ADDRESS")
    config = tmp_path / "temporal.toml"
    config.write_text('[profile.staging]\naddress = "staging:7233"\n')
    no_env.setenv("TEMPORAL_CONFIG_FILE", str(config))
    assert not address_configured(None)  # the default profile gives none
    no_env.setenv("TEMPORAL_PROFILE", "staging")
    assert address_configured(None)


def test_the_state_lock_is_exclusive(tmp_path: Path):
    first, second = Lock(tmp_path / "run.db.lock"), Lock(tmp_path / "run.db.lock")
    assert first.acquire()
    assert not second.acquire(wait=0.2)
    first.release()
    assert second.acquire()
    second.release()


def test_an_unreachable_temporal_fails_the_request_with_1(no_env):
    address = f"127.0.0.1:{free_port()}"
    for args in (["status", "f-1"], ["list"], ["cancel", "f-1"], ["react", "f-1", "retry"]):
        result = CliRunner().invoke(cli, [*args, "--address", address])
        assert result.exit_code == 1, (args, result.output)
        assert f"can't connect to Temporal at {address}" in result.output


def test_a_malformed_address_or_dsn_is_a_usage_error_in_one_line(no_env, monkeypatch):
    for args in (["status", "f-1"], ["list"], ["react", "f-1", "retry"]):
        for address in ("foo:bar", "127.0.0.1", "localhost", "a:b:c", "h:70000"):
            result = CliRunner().invoke(cli, [*args, "--address", address])
            assert result.exit_code == 2, (args, address, result.output)
            assert f"the Temporal address {address} is not HOST:PORT" in result.output
            assert "Traceback" not in result.output
    # a port missing from Temporal's env config, for a command and the worker
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1")
    for args in (["status", "f-1"], ["worker", "tests.verbose_flows"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert "the Temporal address 127.0.0.1 is not HOST:PORT" in result.output
    monkeypatch.delenv("TEMPORAL_ADDRESS")
    result = CliRunner().invoke(cli, ["worker", "tests.verbose_flows", "--backend", "postgres"])
    assert result.exit_code == 2, result.output
    assert "needs the database to serve: set QWIT_POSTGRES_DSN" in result.output
    monkeypatch.setenv("QWIT_POSTGRES_DSN", "notadsn")
    for args in (["status", "f-1"], ["list"], ["cancel", "f-1"]):
        result = CliRunner().invoke(cli, [*args, "--backend", "postgres"])
        assert result.exit_code == 2, (args, result.output)
        assert "QWIT_POSTGRES_DSN is not a PostgreSQL DSN" in result.output
