"""`ingestctl` run from another folder finds the service's registry or refuses; it never makes
a new, empty one there.

The system-wide config (/etc/sis-ingest/ingest.toml) is replaced by a temporary file through
$INGEST_SYSTEM_CONFIG: these tests never read or write the real /etc.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import INGESTCTL, REPO, free_port, write_config

from ingest_core.db import close_all, open_control_db
from ingest_core.journal import record_events
from ingest_core.settings import (
    CONFIG_ENV,
    SYSTEM_CONFIG,
    SYSTEM_CONFIG_ENV,
    load_settings,
    system_config_path,
)


def refusal(db: Path | str) -> str:
    return (
        f"ingestctl: no sis-ingest registry at {db}; run `ingestctl init` there or pass --config\n"
    )


def ingestctl_in(cwd: Path, *args: str, system_config: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, in ``cwd``, with the system config at ``system_config``."""
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    env.update({"PYTHONPATH": str(REPO), SYSTEM_CONFIG_ENV: str(system_config)})
    return subprocess.run(
        [*INGESTCTL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture
def service(tmp_path: Path) -> Path:
    """A deployed service's config (absolute folders), initialized, with one account."""
    root = tmp_path / "srv"
    root.mkdir()
    config = write_config(
        root / "ingest.toml",
        f'data_root = "{root / "data"}"\nlog_dir = "{root / "logs"}"\n\n[server]\n'
        f'port = {free_port()}\nhost_key_dir = "{root / "keys"}"\n',
    )
    from ingest_core.registry import Registry

    Registry(load_settings(config), actor="test").create_account("uni_a")
    close_all()
    return config


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A folder with no ingest.toml: an operator's home, say."""
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def test_from_another_folder_commands_are_refused_and_nothing_is_created(
    elsewhere: Path, tmp_path: Path
) -> None:
    no_system = tmp_path / "etc" / "ingest.toml"  # does not exist
    for args in (
        ["account", "list"],
        ["account", "create", "x1"],
        ["activity", "x1"],
        ["hostkey", "show"],
        ["serve"],
        ["server"],
    ):
        result = ingestctl_in(elsewhere, *args, system_config=no_system)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr == refusal(elsewhere / "var" / "control.db"), args
        assert result.stdout == ""
        assert list(elsewhere.iterdir()) == [], args  # no ./var, no ./keys, no ./logs
    # `ingestctl keygen` writes a client's key pair: no registry needed
    made = ingestctl_in(elsewhere, "keygen", "id_uni", system_config=no_system)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in elsewhere.iterdir()) == ["id_uni", "id_uni.pub"]
    # `ingestctl init` is how a registry comes to be, and then the others work there
    assert ingestctl_in(elsewhere, "init", system_config=no_system).returncode == 0
    listed = ingestctl_in(elsewhere, "account", "list", system_config=no_system)
    assert listed.returncode == 0 and "no accounts yet" in listed.stdout


def test_from_another_folder_the_system_config_is_found(
    service: Path, elsewhere: Path, tmp_path: Path
) -> None:
    listed = ingestctl_in(elsewhere, "account", "list", "--json", system_config=service)
    assert listed.returncode == 0, listed.stderr
    assert [a["name"] for a in json.loads(listed.stdout)] == ["uni_a"]
    created = ingestctl_in(elsewhere, "account", "create", "x1", system_config=service)
    assert created.returncode == 0, created.stderr
    assert (service.parent / "data" / "accounts" / "x1").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_a_local_ingest_toml_comes_before_the_system_one(
    service: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = write_config(elsewhere / "ingest.toml", 'data_root = "here"\n')
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv(SYSTEM_CONFIG_ENV, str(service))
    assert load_settings().source == "ingest.toml"
    local.unlink()
    assert load_settings().source == str(service)
    monkeypatch.delenv(SYSTEM_CONFIG_ENV)
    assert system_config_path() == SYSTEM_CONFIG == Path("/etc/sis-ingest/ingest.toml")


def test_config_is_accepted_after_the_subcommand(service: Path, elsewhere: Path) -> None:
    none = elsewhere / "no-such.toml"
    for args in (
        ["--config", str(service), "account", "list", "--json"],
        ["account", "list", "--json", "--config", str(service)],
        ["account", "--config", str(service), "list", "--json"],
    ):
        result = ingestctl_in(elsewhere, *args, system_config=none)
        assert result.returncode == 0, (args, result.stderr)
        assert [a["name"] for a in json.loads(result.stdout)] == ["uni_a"]
    made = ingestctl_in(
        elsewhere, "account", "create", "late", "--config", str(service), system_config=none
    )
    assert made.returncode == 0, made.stderr
    assert (service.parent / "data" / "accounts" / "late").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_postgresql_registry_exists_once_migrated(pg_url: str, tmp_path: Path) -> None:
    from ingestctl.main import control_db_exists

    assert not control_db_exists(pg_url)  # an empty database is no registry
    config = write_config(
        tmp_path / "pg.toml", f'data_root = "data"\ncontrol_db_url = "{pg_url}"\n'
    )
    refused = ingestctl_in(
        tmp_path, "--config", str(config), "account", "list", system_config=config
    )
    assert refused.returncode == 2
    assert refused.stderr == refusal(pg_url)  # the URL, as given (no password in it)
    open_control_db(pg_url)
    close_all()
    assert control_db_exists(pg_url)
    listed = ingestctl_in(
        tmp_path, "--config", str(config), "account", "list", system_config=config
    )
    assert listed.returncode == 0, listed.stderr
    gone = pg_url.rsplit("/", 1)[0] + "/no_such_database_here"
    assert not control_db_exists(gone)


def test_a_reader_that_stops_early_is_not_an_error(config_file: Path) -> None:
    """`ingestctl ... --json | head -c 1` on an output far larger than a pipe holds: no
    "Broken pipe" message, exit 0."""
    subprocess.run(
        [*INGESTCTL, "--config", str(config_file), "account", "create", "acct"],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    event = {"event": "file.download", "account": "acct", "name": "sis_loader.log", "bytes": 1}
    record_events(
        open_control_db(load_settings(config_file).control_db_url),
        [{**event, "timestamp": f"2026-12-01T00:00:{i % 60:02d}Z"} for i in range(5000)],
        "node-1",
    )
    command = (
        f"set -o pipefail; {' '.join(INGESTCTL)} --config {config_file} "
        "activity acct --limit 5000 --json | head -c 1"
    )
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.stderr == ""
    assert result.returncode == 0
