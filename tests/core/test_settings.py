"""Settings: one object from TOML, defaults that work in a checkout, clear refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import INGESTCTL, REPO

from ingest_core.errors import ConfigError
from ingest_core.settings import load_settings


def test_defaults_work_in_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INGEST_CONFIG", raising=False)
    s = load_settings()
    assert s.source == "built-in defaults"
    assert (s.server.host, s.server.port) == ("127.0.0.1", 2222)
    assert s.data_root == tmp_path / "var"
    assert s.log_dir == tmp_path / "logs"
    assert s.server.host_key_dir == tmp_path / "keys"
    assert s.control_db_url == f"sqlite:///{tmp_path / 'var' / 'control.db'}"
    assert s.sis_db_url == f"sqlite:///{tmp_path / 'var' / 'sis.db'}"
    assert s.schedule.timezone == "America/New_York"
    assert (s.schedule.loader_time, s.schedule.pool_time) == ("03:00", "00:00")
    assert s.keys.min_rsa_bits == 4096 and s.keys.accept_ed25519 is False
    assert s.ips.max_per_account == 4


def test_file_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ingest.toml").write_text("[server]\nport = 2300\n")
    env_file = tmp_path / "env.toml"
    env_file.write_text("[server]\nport = 2400\n")
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[server]\nport = 2500\n")
    monkeypatch.delenv("INGEST_CONFIG", raising=False)
    assert load_settings().server.port == 2300
    monkeypatch.setenv("INGEST_CONFIG", str(env_file))
    assert load_settings().server.port == 2400
    assert load_settings(explicit).server.port == 2500


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "ingest.toml"
    conf.parent.mkdir()
    conf.write_text('data_root = "../data"\n[server]\nhost_key_dir = "hostkeys"\n')
    s = load_settings(conf)
    assert s.data_root == tmp_path / "data"
    assert s.server.host_key_dir == tmp_path / "etc" / "hostkeys"


def test_every_section_can_be_set(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        'sis_db_url = "postgresql+psycopg:///sis"\n'
        "[keys]\nmin_rsa_bits = 8192\naccept_ed25519 = true\n"
        "[ips]\nmax_per_account = 2\n"
        '[schedule]\ntimezone = "Australia/Sydney"\nloader_time = "02:30"\n'
        '[smtp]\nhost = "127.0.0.1"\nrecipients = ["ops@example.edu"]\n'
    )
    s = load_settings(conf)
    assert s.sis_db_url == "postgresql+psycopg:///sis"
    assert s.keys.min_rsa_bits == 8192 and s.keys.accept_ed25519
    assert s.ips.max_per_account == 2
    assert s.zone.key == "Australia/Sydney" and s.schedule.loader_time == "02:30"
    assert s.smtp.recipients == ["ops@example.edu"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 'abc'\n", "server.port: expected a whole number"),
        ("[server]\nport = 70000\n", "server.port: expected a TCP port"),
        ("[server]\nprot = 22\n", "server.prot: unknown setting"),
        ("colour = 'blue'\n", "colour: unknown setting"),
        ("[schedule]\ntimezone = 'Mars/Olympus'\n", "schedule.timezone: expected an IANA"),
        ("[schedule]\nloader_time = '3am'\n", "schedule.loader_time: expected a 24-hour time"),
        ("[keys]\naccept_ed25519 = 'yes'\n", "keys.accept_ed25519: expected true or false"),
        ("[keys]\nmin_rsa_bits = 1024\n", "keys.min_rsa_bits: expected at least 2048"),
        ("[ips]\nmax_per_account = 0\n", "ips.max_per_account: expected a number from 1"),
        ("[server]\nevent_loop = 'trio'\n", 'server.event_loop: expected "auto", "uvloop"'),
        ("server = 5\n", "[server]: expected a table"),
        ("control_db_url = 'mysql://x'\n", "control_db_url: expected a sqlite"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    message = str(info.value)
    assert message.startswith(str(conf)), message
    assert expected in message
    assert "\n" not in message


def test_cli_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[server]\nport = 'abc'\n")
    for args in (
        ["--config", str(conf), "account", "list"],
        ["--config", str(tmp_path / "missing.toml"), "account", "list"],
    ):
        result = subprocess.run([*INGESTCTL, *args], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (
        "server.port"
        in subprocess.run(
            [*INGESTCTL, "--config", str(conf), "account", "list"], capture_output=True, text=True
        ).stderr
    )


def test_a_setting_named_source_in_a_section_is_read(tmp_path: Path) -> None:
    conf = tmp_path / "pool.toml"
    conf.write_text('[pool]\nsource = "query"\nquery_url = "sqlite:///x.db"\nquery = "select 1"\n')
    assert load_settings(conf).pool.source == "query"
    top = tmp_path / "top.toml"
    top.write_text('source = "x"\n')
    with pytest.raises(ConfigError, match="source: unknown setting"):
        load_settings(top)
