"""Against the real sshd: an export with no data or cut short fails the run (nothing sent, the
since date stays) unless the connection says otherwise; ``connection add`` refuses a host with
a port in it and a malformed database URL, and warns about a glob that matches nothing; the
password of a database URL is kept in secrets/, not in state.db; the pool file and the log are
not readable by other users; the shipped example config and systemd unit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingest_core.errors import ConfigError
from push_agent import connections, runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import MESSAGES, Category
from push_agent.settings import AgentLogSettings, AgentSettings, load_agent_settings

from .conftest import REPO, SSH_USER, SmtpSink, SshdLab, SshdServer, ready, smtp_settings

Cli = Callable[..., subprocess.CompletedProcess[str]]
TRANSFER_FAILED = MESSAGES[Category.TRANSFER]
ALLOW_EMPTY = "allow it with 'ingest-push connection edit sis --allow-empty'"
EMPTY_COMMAND = (
    "the export command produced no data (0 bytes), so nothing was sent; if an empty file is "
    f"normal for this connection, {ALLOW_EMPTY}"
)
HEADER_ONLY_QUERY = (
    "the export query returned no rows (the file would hold only its header), so nothing was "
    f"sent; if no rows is normal for this connection, {ALLOW_EMPTY}"
)


def run(agent: Agent, name: str = "sis") -> runs.Outcome:
    return asyncio.run(runs.run_connection(agent, name))


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def since(agent: Agent, name: str = "sis") -> str:
    return runs.since_for(agent, connections.get(agent, name)).text


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- point 2: empty and truncated exports -----------------------------------------------------


def test_command_with_no_output_fails_the_run_and_sends_nothing(
    push_cli: Cli, sshd: SshdServer, sshd_lab: SshdLab, upload_dir: Path
) -> None:
    ok(push_cli(
        "connection", "add", "sis", "--host", "127.0.0.1", "--port", str(sshd.port),
        "--path", "/upload", "--user", SSH_USER, "--frequency", "daily 02:00",
        "--command", "/bin/true", "--remote-name", "sis_hr_user_info.txt",
        "--since", "2026-01-15", "--password-stdin", input=sshd_lab.password + "\n",
    ))  # fmt: skip
    ok(push_cli("connection", "test", "sis", "--accept", sshd.fingerprint()))

    failed = push_cli("run", "sis")
    assert failed.returncode == 1
    assert failed.stdout == f"run of sis FAILED\n{TRANSFER_FAILED}\nCause: {EMPTY_COMMAND}\n"
    assert list(upload_dir.iterdir()) == []
    (status,) = json.loads(ok(push_cli("status", "--json")).stdout)
    assert status["since"] == "2026-01-15"  # the since date did not move
    assert status["last_success"] is None and status["last_failure_cause"] == EMPTY_COMMAND

    # A connection whose empty file is normal sends it.
    edited = ok(push_cli("connection", "edit", "sis", "--allow-empty"))
    assert edited.stdout == "connection sis edited: allow_empty\n"
    ok(push_cli("run", "sis"))
    assert (upload_dir / "sis_hr_user_info.txt").read_bytes() == b""


def test_scheduled_empty_export_is_recorded_and_mailed_like_any_failure(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    smtp_sink: SmtpSink,
    upload_dir: Path,
) -> None:
    agent = make_agent(smtp=smtp_settings(smtp_sink.port))
    blank = f"{sys.executable} -c \"print(); print('  ')\""  # only blank lines
    conn = sshd_connection(source_command=blank, notify=["ops@example.test"])
    ready(agent, conn, sshd_lab.password)
    smtp_sink.messages.clear()

    async def scheduled() -> runs.Outcome:
        with runs.connection_lock(agent, "sis"):
            return await runs.run_locked(agent, "sis", "scheduled")

    outcome = asyncio.run(scheduled())
    cause = EMPTY_COMMAND.replace("(0 bytes)", "(only blank lines)")
    assert outcome.failure is not None and outcome.failure.cause == cause
    assert list(upload_dir.iterdir()) == []
    assert since(agent) == "2026-01-15"
    (mail,) = smtp_sink.messages
    assert mail["subject"] == "[ingest-push] sis: scheduled transfer failed (transfer)"
    assert cause in str(mail["body"]).replace("\r\n", "\n")
    (row,) = [r for r in agent.state.history("sis") if r["trigger"] == "scheduled"]
    assert row["ok"] is False and row["cause"] == cause


def test_query_with_a_header_and_no_rows_fails_unless_allowed(
    agent: Agent,
    sshd_connection: Callable[..., Connection],
    sshd_lab: SshdLab,
    upload_dir: Path,
    tmp_path: Path,
) -> None:
    db = tmp_path / "sis.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table people (uuuid text, changed text)")
        conn.execute("insert into people values ('U1', '2025-06-01')")
    query = "select uuuid from people where changed >= :since"
    conn = sshd_connection(
        source_kind="query", source_command=None, source_url=f"sqlite:///{db}",
        source_query=query, header=True,
    )  # fmt: skip
    ready(agent, conn, sshd_lab.password)
    failed = run(agent)
    assert failed.failure is not None and failed.failure.category is Category.TRANSFER
    assert failed.failure.cause == HEADER_ONLY_QUERY
    assert list(upload_dir.iterdir()) == []
    assert since(agent) == "2026-01-15"

    connections.edit(agent, "sis", {"header": False})
    no_header = run(agent)
    assert no_header.failure is not None
    assert no_header.failure.cause == HEADER_ONLY_QUERY.replace("only its header", "nothing")

    connections.edit(agent, "sis", {"header": True, "allow_empty": True})
    assert run(agent).ok
    assert (upload_dir / "sis_hr_user_info.txt").read_bytes() == b"uuuid\r\n"


def test_a_file_with_fewer_lines_than_the_share_of_the_last_transfer_is_not_sent(
    agent: Agent,
    sshd_connection: Callable[..., Connection],
    sshd_lab: SshdLab,
    upload_dir: Path,
    tmp_path: Path,
) -> None:
    source = tmp_path / "sis_hr_user_info.txt"
    full = "uuuid\r\n" + "".join(f"U{i}\r\n" for i in range(9))  # 10 lines
    source.write_text(full, newline="")
    conn = sshd_connection(
        source_kind="file", source_path=str(source), source_command=None, min_line_share=0.5
    )
    ready(agent, conn, sshd_lab.password)
    assert run(agent).ok  # the first transfer: nothing to compare with yet
    assert connections.get(agent, "sis").last_sent_lines == 10

    source.write_text("uuuid\r\nU0\r\nU1\r\nU2", newline="")  # 4 lines, the last unterminated
    cut = run(agent)
    assert cut.failure is not None and cut.failure.category is Category.TRANSFER
    assert cut.failure.cause == (
        "the file to send has 4 lines, fewer than 50% of the 10 lines of the last successful "
        "transfer, so it looks cut short and nothing was sent; if it is complete, lower the "
        "share or turn the check off with 'ingest-push connection edit sis --min-line-share 0'"
    )
    assert (upload_dir / "sis_hr_user_info.txt").read_bytes() == full.encode()

    source.write_text("uuuid\r\nU0\r\nU1\r\nU2\r\nU3\r\n", newline="")  # 5 lines: half
    assert run(agent).ok
    assert connections.get(agent, "sis").last_sent_lines == 5
    # An empty file is refused by its own rule, with the share check off too.
    connections.edit(agent, "sis", {"min_line_share": 0.0})
    source.write_bytes(b"")
    empty = run(agent)
    assert empty.failure is not None
    assert empty.failure.cause == (
        f"the local file {source} holds no data (0 bytes), so nothing was sent; if an empty "
        f"file is normal for this connection, {ALLOW_EMPTY}"
    )


def test_min_line_share_is_set_and_checked_on_the_command_line(push_cli: Cli) -> None:
    added = ok(push_cli(
        "connection", "add", "sis", "--host", "sftp.example.test", "--path", "/",
        "--user", "u", "--frequency", "daily 02:00", "--command", "/bin/echo x",
        "--remote-name", "x.txt", "--min-line-share", "80%", "--password-stdin", input="pw\n",
    ))  # fmt: skip
    assert added.stderr == ""
    shown = json.loads(ok(push_cli("connection", "show", "sis", "--json")).stdout)
    assert shown["min_line_share"] == 0.8 and shown["allow_empty"] is False
    bad = push_cli("connection", "edit", "sis", "--min-line-share", "1.5")
    assert bad.returncode == 1
    assert bad.stderr == (
        "ingest-push: '1.5' is not a line share; accepted: 0 (off) to 1 or 0% to 100%, "
        "e.g. 0.5 for half the lines of the last successful transfer\n"
    )


# -- point 4: connection add refuses what can never work ---------------------------------------


def _add(push_cli: Cli, *options: str) -> subprocess.CompletedProcess[str]:
    return push_cli(
        "connection", "add", "sis", "--path", "/upload", "--user", SSH_USER,
        "--frequency", "daily 02:00", "--password-stdin", *options, input="pw\n",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (
            "127.0.0.1:22",
            "'127.0.0.1:22' has a port in it: give the host alone (--host 127.0.0.1) "
            "and the port with --port 22",
        ),
        (
            "sftp.example.edu:2222",
            "'sftp.example.edu:2222' has a port in it: give the host alone "
            "(--host sftp.example.edu) and the port with --port 2222",
        ),
        (
            "[::1]:2222",
            "'[::1]:2222' has a port in it: give the host alone (--host ::1) "
            "and the port with --port 2222",
        ),
        ("[::1]", "'[::1]': give an IPv6 address without brackets (--host ::1)"),
        (
            "sftp://sftp.example.edu",
            "'sftp://sftp.example.edu' is not a host: give the host name alone (no sftp://), "
            "the port with --port and the folder with --path",
        ),
    ],
)
def test_a_host_with_a_port_in_it_is_refused(push_cli: Cli, host: str, expected: str) -> None:
    refused = _add(push_cli, "--host", host, "--file", "/etc/hostname")
    assert refused.returncode == 1
    assert refused.stderr == f"ingest-push: {expected}\n"
    assert ok(push_cli("connection", "list")).stdout.startswith("no connections")


def test_an_ipv6_address_is_accepted_and_listed_in_brackets(push_cli: Cli) -> None:
    ok(_add(push_cli, "--host", "::1", "--port", "2222", "--file", "/etc/hostname"))
    listed = ok(push_cli("connection", "list")).stdout
    assert f"{SSH_USER}@[::1]:2222" in listed


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "notaurl",
            "the --db-url is not a database URL; accepted: "
            "postgresql+psycopg://user:password@host/dbname or sqlite:////path/to/file.db",
        ),
        (
            "postgres://reporter@db/sis",
            "the --db-url names the database type 'postgres', which this agent does not know; "
            "accepted: postgresql+psycopg://user:password@host/dbname or "
            "sqlite:////path/to/file.db",
        ),
    ],
)
def test_a_malformed_database_url_is_refused(push_cli: Cli, url: str, expected: str) -> None:
    refused = _add(
        push_cli, "--host", "127.0.0.1", "--query", "select 1", "--db-url", url,
        "--remote-name", "x.txt",
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr == f"ingest-push: {expected}\n"
    assert ok(push_cli("connection", "list")).stdout.startswith("no connections")


def test_a_glob_that_matches_nothing_today_is_saved_with_a_warning(
    push_cli: Cli, tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    added = ok(_add(push_cli, "--host", "127.0.0.1", "--file", "exports/sis_*.txt"))
    pattern = exports / "sis_*.txt"  # made absolute: the daemon runs in another folder
    assert added.stderr == (
        f"warning: no file matches {pattern} today: the connection is saved, but its runs "
        "fail until a file matches\n"
    )
    shown = ok(push_cli("connection", "show", "sis")).stdout
    assert f"source_path         {pattern}\n" in shown
    (exports / "sis_1.txt").write_text("uuuid\n")
    edited = ok(push_cli("connection", "edit", "sis", "--file", str(exports / "*.txt")))
    assert edited.stderr == ""


# -- point 8: secrets and file modes ----------------------------------------------------------


def test_the_database_password_is_kept_in_secrets_not_in_the_state_file(
    push_cli: Cli, agent_settings: AgentSettings, make_agent: Callable[..., Agent]
) -> None:
    password = "S3cret-db-pw"
    url = f"postgresql+psycopg://reporter:{password}@127.0.0.1:5432/sis"
    ok(_add(
        push_cli, "--host", "127.0.0.1", "--query", "select 1", "--db-url", url,
        "--remote-name", "x.txt",
    ))  # fmt: skip
    state = agent_settings.state_dir
    stored = b"".join(p.read_bytes() for p in state.glob("state.db*"))
    assert b"reporter@127.0.0.1:5432/sis" in stored  # the URL is there, without its password
    assert password.encode() not in stored
    secret = state / "secrets" / "sis.db-password"
    assert secret.read_text() == password
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    shown = ok(push_cli("connection", "show", "sis")).stdout
    assert "postgresql+psycopg://reporter:***@127.0.0.1:5432/sis" in shown
    assert password not in shown
    # The query runs with the whole URL.
    agent = make_agent()
    assert connections.get(agent, "sis").source_url == url

    # A new password is a change (shown only as changed); none in the URL removes the file.
    edited = ok(push_cli("connection", "edit", "sis", "--db-url", url.replace(password, "n3w")))
    assert edited.stdout == "connection sis edited: database password\n"
    assert secret.read_text() == "n3w"
    ok(push_cli("connection", "edit", "sis", "--db-url", url.replace(f":{password}", "")))
    assert not secret.exists()
    ok(push_cli("connection", "delete", "sis"))


def test_a_password_an_older_state_file_holds_moves_to_secrets(
    agent: Agent, sshd_connection: Callable[..., Connection]
) -> None:
    url = "postgresql+psycopg://reporter:old-clear-pw@db.example.test/sis"
    conn = sshd_connection(
        source_kind="query", source_command=None, source_url=None, source_query="select 1"
    )
    connections.add(agent, dataclasses.replace(conn, source_url="sqlite:///x.db"), "pw")
    agent.state.update("sis", source_url=url)  # as an older version stored it
    assert connections.get(agent, "sis").source_url == url
    state = agent.settings.state_dir
    assert b"old-clear-pw" not in b"".join(p.read_bytes() for p in state.glob("state.db*"))
    assert (state / "secrets" / "sis.db-password").read_text() == "old-clear-pw"
    assert agent.state.get("sis")["source_url"] == (  # type: ignore[index]
        "postgresql+psycopg://reporter@db.example.test/sis"
    )


def test_pool_file_and_logs_are_not_readable_by_other_users(
    umask_022: None,
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    tmp_path: Path,
) -> None:
    agent = make_agent()
    local = tmp_path / "incoming" / "applicant_pool.txt"
    conn = sshd_connection(
        source_kind="none", source_command=None, remote_name=None,
        pool_remote="/pool/applicant_pool.txt", pool_local=str(local),
    )  # fmt: skip
    ready(agent, conn, sshd_lab.password)
    assert run(agent).ok
    assert local.read_bytes() == b"U1001\r\nU1002\r\nU1003\r\n"
    assert stat.S_IMODE(local.stat().st_mode) == 0o640
    assert stat.S_IMODE(local.parent.stat().st_mode) == 0o750
    logs = agent.settings.log_dir
    assert stat.S_IMODE(logs.stat().st_mode) == 0o750
    assert stat.S_IMODE((logs / "push-agent.jsonl").stat().st_mode) == 0o640


def test_logs_an_older_version_left_readable_are_tightened(
    umask_022: None, make_agent: Callable[..., Agent], agent_settings: AgentSettings
) -> None:
    logs = agent_settings.log_dir
    logs.mkdir(mode=0o755)
    (logs / "push-agent.jsonl").write_text("")
    (logs / "push-agent.jsonl.1").write_text("")
    assert stat.S_IMODE((logs / "push-agent.jsonl").stat().st_mode) == 0o644
    make_agent()
    assert stat.S_IMODE(logs.stat().st_mode) == 0o750
    for name in ("push-agent.jsonl", "push-agent.jsonl.1"):
        assert stat.S_IMODE((logs / name).stat().st_mode) == 0o640


# -- point 10: rotation, the example config, the systemd unit ---------------------------------


def test_push_agent_log_rotates_as_logs_says(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(logs=AgentLogSettings(max_bytes=4096, backups=2))
    for i in range(200):
        agent.log.info("filler", number=i, text="x" * 40)
    logs = agent.settings.log_dir
    names = sorted(p.name for p in logs.iterdir() if p.name.startswith("push-agent.jsonl"))
    assert names == ["push-agent.jsonl", "push-agent.jsonl.1", "push-agent.jsonl.2"]
    assert (logs / "push-agent.jsonl").stat().st_size < 4096 + 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[logs]\nmax_bytes = 'big'\n", "logs.max_bytes: expected a whole number >= 0"),
        ("[logs]\nrepeat_window_seconds = 5\n", "logs.repeat_window_seconds: unknown setting"),
        ("source = 'elsewhere'\n", "source: unknown setting"),
    ],
)
def test_bad_logs_settings_are_one_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "ingest-push.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_agent_settings(conf)
    assert str(info.value).startswith(f"{conf}: {expected}")


EXAMPLE = REPO / "deploy" / "ingest-push.example.toml"
# Production paths in the example (the systemd unit's folders); every other value a default.
EXAMPLE_PATHS = {"state_dir": "/var/lib/ingest-push", "log_dir": "/var/log/ingest-push"}


def test_example_config_loads_and_lists_every_setting_with_its_default() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    loaded = load_agent_settings(EXAMPLE)  # every value in it is valid
    assert str(loaded.state_dir) == EXAMPLE_PATHS["state_dir"]
    assert str(loaded.log_dir) == EXAMPLE_PATHS["log_dir"]
    defaults = AgentSettings()
    for f in dataclasses.fields(AgentSettings):
        if f.name == "source":
            continue
        assert f.name in raw, f"{f.name} missing from the example"
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                assert g.name in raw[f.name], f"{f.name}.{g.name} missing from the example"
                assert raw[f.name][g.name] == getattr(value, g.name), f"{f.name}.{g.name}"
        elif f.name not in EXAMPLE_PATHS:
            assert raw[f.name] == value, f"{f.name}: example {raw[f.name]!r}, default {value!r}"


def test_systemd_unit_runs_the_daemon_as_its_own_user(tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "ingest-push.service").read_text()
    lines = [line.strip() for line in unit.splitlines() if line and not line.startswith("#")]
    assert "User=ingest-push" in lines and "Group=ingest-push" in lines
    assert "ExecStart=/opt/sis-ingest/.venv/bin/ingest-push daemon" in lines
    assert "Environment=INGEST_PUSH_CONFIG=/etc/ingest-push/ingest-push.toml" in lines
    example = tomllib.loads(EXAMPLE.read_text())
    assert f"StateDirectory={Path(example['state_dir']).name}" in lines
    assert f"LogsDirectory={Path(example['log_dir']).name}" in lines
    assert "UMask=0027" in lines and not any(x.startswith("OnCalendar") for x in lines)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    copy = tmp_path / "ingest-push.service"  # with a program that exists here
    copy.write_text(unit.replace("/opt/sis-ingest/.venv/bin/ingest-push", shutil.which("true")))  # type: ignore[arg-type]
    checked = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [
        line
        for line in (checked.stdout + checked.stderr).splitlines()
        if "ingest-push.service" in line and "user" not in line.lower()
    ]
    assert problems == []
