"""A full local disk (a real small tmpfs), the failure mail after two different failures, the
mail of a confirmed fingerprint, the pool pickup recorded apart from the upload, what
``status`` says of an old failure, the "created" mail of a command export, and a state file
made by the previous version of the agent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from conftest import fill_disk

from push_agent import cli, connections, daemon, runs
from push_agent.agent import Agent, open_agent
from push_agent.connections import Connection
from push_agent.failures import MESSAGES, Category
from push_agent.settings import AgentSettings

from .conftest import REPO, FakeClock, SmtpSink, SshdLab, SshdServer, ready, smtp_settings
from .test_crash_and_daemon import MIB, Proxy, proxy_factory  # noqa: F401

# -- a full local disk -----------------------------------------------------------------------


@pytest.fixture
def disk_agent(
    agent_settings: AgentSettings, small_disk: Path, tmp_path: Path
) -> Iterator[tuple[Agent, Path]]:
    """An agent whose state folder and log live on a 3 MB tmpfs, and its config file."""
    settings = dataclasses.replace(
        agent_settings, state_dir=small_disk / "state", log_dir=small_disk / "logs"
    )
    config = tmp_path / "small.toml"
    config.write_text(
        f'state_dir = "{settings.state_dir}"\nlog_dir = "{settings.log_dir}"\n'
        f'timezone = "{settings.timezone}"\nconnect_timeout = 5.0\nretries = 0\n',
        encoding="utf-8",
    )
    agent = open_agent(settings)
    yield agent, config
    agent.close()


def push(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "push_agent.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_filling_the_local_disk_names_the_full_disk_as_the_cause(
    disk_agent: tuple[Agent, Path],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    agent, config = disk_agent
    # 8 MB through tr into the work folder of a 3 MB disk: "tr: write error".
    command = "sh -c 'yes abcdefghij | head -c 8000000 | tr a b'"
    conn = sshd_connection(source_command=command, verify_fingerprint=False)
    ready(agent, conn, sshd_lab.password)
    since = runs.since_for(agent, connections.get(agent, "sis")).text
    done = push(config, "run", "sis")
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout
    lines = done.stdout.splitlines()
    assert lines[:2] == ["run of sis FAILED", MESSAGES[Category.LOCAL_DISK]]
    assert lines[2].startswith(f"Cause: the local disk holding {agent.settings.work_dir} is full")
    assert "tr: write error" in lines[2]  # what the command said comes after, in brackets
    [failed] = [r for r in agent.state.history("sis") if r["trigger"] == "manual"]
    assert failed["category"] == "local-disk-full"
    assert runs.since_for(agent, connections.get(agent, "sis")).text == since
    assert list(agent.settings.work_dir.iterdir()) == []


def test_full_disk_under_the_state_is_one_line_and_changes_nothing(
    disk_agent: tuple[Agent, Path],
    small_disk: Path,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    agent, config = disk_agent
    ready(agent, sshd_connection(verify_fingerprint=False), sshd_lab.password)
    agent.close()
    assert push(config, "status").returncode == 0  # the state file closed cleanly
    state = agent.settings.state_file
    before = digest(state)
    filler = fill_disk(small_disk)
    for args in (("run", "sis"), ("status",), ("history", "sis")):
        done = push(config, *args)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr and done.stdout == ""
        [line] = done.stderr.splitlines()
        assert line.startswith(
            f"ingest-push: the disk holding the agent's state folder {agent.settings.state_dir} "
            "is full ("
        ), line
        assert "nothing was changed; free some space there" in line
    filler.unlink()
    assert digest(state) == before
    shown = push(config, "history", "sis")
    assert shown.returncode == 0 and "manual" not in shown.stdout  # no run was recorded


# -- the mail after two different failures ---------------------------------------------------


def test_failure_mail_and_status_report_the_first_failure_and_every_attempt(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd: SshdServer,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    proxy_factory: Callable[[int], Proxy],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-11-02T12:00:00+00:00"))
    agent = make_agent(now=clock, smtp=smtp_settings(smtp_sink.port), retries=1, retry_backoff=0.01)
    proxy = proxy_factory(sshd.port)
    payload = tmp_path / "big.bin"
    payload.write_bytes(os.urandom(3 * MIB))
    conn = sshd_connection(
        port=proxy.port, source_kind="file", source_path=str(payload), source_command=None,
        remote_name="big.bin", verify_fingerprint=False, notify=["ops@example.test"],
    )  # fmt: skip
    ready(agent, conn, sshd_lab.password)  # proxy connection 1
    smtp_sink.messages.clear()
    # The upload's connection drops after 1 MiB and the port closes: the retry is refused.
    proxy.plan = {2: ("cut", MIB)}
    clock.at("2026-11-03T07:00:00+00:00")  # 02:00 EST
    [outcome] = asyncio.run(daemon.tick(agent))
    assert [f.category for f in outcome.attempt_failures] == [
        Category.TRANSFER,
        Category.PORT_REFUSED,
    ]
    [mail] = smtp_sink.messages
    assert "scheduled transfer failed (transfer)" in str(mail["subject"])
    body = str(mail["body"]).replace("\r\n", "\n")
    assert MESSAGES[Category.TRANSFER] in body and MESSAGES[Category.PORT_REFUSED] not in body
    assert "Cause: connection interrupted" in body
    assert "Every attempt (2):\n  1. transfer: connection interrupted" in body
    assert f"  2. port-refused: 127.0.0.1:{proxy.port} refused the TCP connection" in body

    entry = runs.status(agent)[0]
    assert entry["last_failure_message"] == MESSAGES[Category.TRANSFER]
    assert [a["category"] for a in entry["last_failure_attempts"]] == ["transfer", "port-refused"]
    capsys.readouterr()
    cli.cmd_status(cli.build_parser().parse_args(["status"]), agent)
    shown = capsys.readouterr().out
    assert "attempt 1" in shown and "connection interrupted" in shown
    assert re.search(rf"attempt 2 +port-refused: 127\.0\.0\.1:{proxy.port} refused", shown)


# -- the fingerprint confirmation mail ----------------------------------------------------


def test_confirming_a_server_fingerprint_is_mailed_like_a_change(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-07-04T15:30:00+00:00"))
    agent = make_agent(now=clock, smtp=smtp_settings(smtp_sink.port))
    server = sshd_lab.server("host_a")
    first_key = server.fingerprint()
    ready(agent, sshd_connection(port=server.port, notify=["ops@example.test"]), sshd_lab.password)
    _created, pinned = smtp_sink.messages
    assert pinned["subject"] == "[ingest-push] connection sis edited"
    assert f"confirmed server fingerprint: (none) -> ssh-ed25519 {first_key}" in str(pinned["body"])
    assert "By:   root" in str(pinned["body"])

    server.restart("host_b")
    new_key = server.fingerprint()
    refused = asyncio.run(runs.run_connection(agent, "sis"))
    assert refused.failure is not None and refused.failure.category is Category.NEW_FINGERPRINT
    assert len(smtp_sink.messages) == 2  # a manual run that fails is shown, not mailed
    clock.at("2026-07-05T09:00:00+00:00")
    confirmed = asyncio.run(runs.test_connection(agent, "sis", accept=new_key))
    assert confirmed.pinned
    changed = smtp_sink.messages[2]
    assert changed["to"] == ["ops@example.test"]
    body = str(changed["body"])
    assert f"confirmed server fingerprint: {first_key} -> ssh-ed25519 {new_key}" in body
    assert "Sunday 2026-07-05 05:00:00 EDT" in body
    # Testing again with the same key confirmed changes nothing: no mail.
    assert asyncio.run(runs.test_connection(agent, "sis")).ok
    assert len(smtp_sink.messages) == 3


# -- the pool pickup, recorded apart ---------------------------------------------------------


def test_missing_pool_file_is_its_own_failure_and_the_upload_still_moves_the_since_date(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-03-01T12:00:00+00:00"))
    agent = make_agent(now=clock, smtp=smtp_settings(smtp_sink.port))
    published = sshd_lab.chroot / "pool" / f"tomorrow-{os.getpid()}.txt"
    local = tmp_path / "incoming" / "pool.txt"
    conn = sshd_connection(
        pool_remote=f"/pool/{published.name}", pool_local=str(local), verify_fingerprint=False,
        notify=["ops@example.test"],
    )  # fmt: skip
    ready(agent, conn, sshd_lab.password)
    smtp_sink.messages.clear()
    try:
        clock.at("2026-03-02T07:00:00+00:00")  # 02:00 EST
        [outcome] = asyncio.run(daemon.tick(agent))
        assert outcome.ok and outcome.failure is None
        assert (upload_dir / "sis_hr_user_info.txt").read_text() == "id,since\n1,2026-01-15\n"
        assert outcome.pool_failure is not None
        assert outcome.pool_failure.category is Category.POOL_MISSING
        assert f"/pool/{published.name} does not exist" in outcome.pool_failure.cause
        assert runs.since_for(agent, connections.get(agent, "sis")).text == "2026-03-02"
        pool_row, upload_row = agent.state.history("sis")[:2]
        assert upload_row["ok"] is True and upload_row["part"] is None
        assert pool_row["ok"] is False and pool_row["part"] == "pool"
        assert pool_row["message"] == MESSAGES[Category.POOL_MISSING]
        [mail] = smtp_sink.messages
        assert "pool file pickup failed (pool-missing)" in str(mail["subject"])
        assert "The upload of the same run succeeded" in str(mail["body"])
        assert MESSAGES[Category.POOL_MISSING] in str(mail["body"])
        entry = runs.status(agent)[0]
        assert entry["last_failure_of"] == "pool file pickup"
        assert entry["last_failure_message"] == MESSAGES[Category.POOL_MISSING]
        assert not entry["last_failure_older"]

        # Published by the next night: picked up, and the upload sends only the new day.
        published.write_bytes(b"U1\r\n")
        clock.at("2026-03-03T07:00:00+00:00")
        [later] = asyncio.run(daemon.tick(agent))
        assert later.ok and later.pool_failure is None and later.since == "2026-03-02"
        assert local.read_bytes() == b"U1\r\n"
        assert len(smtp_sink.messages) == 1
        # The failure is history now: status says so.
        entry = runs.status(agent)[0]
        assert entry["last_failure_of"] == "pool file pickup" and entry["last_failure_older"]
        capsys.readouterr()
        cli.cmd_status(cli.build_parser().parse_args(["status"]), agent)
        shown = capsys.readouterr().out
        assert "(pool file pickup), older than the last success" in shown
    finally:
        published.unlink(missing_ok=True)


def test_status_says_a_failure_is_older_than_the_last_success(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-03-01T12:00:00+00:00"))
    agent = make_agent(now=clock)
    server = sshd_lab.server()
    ready(agent, sshd_connection(port=server.port, verify_fingerprint=False), sshd_lab.password)
    server.stop()
    clock.at("2026-03-02T12:00:00+00:00")
    assert not asyncio.run(runs.run_connection(agent, "sis")).ok

    def status_text() -> str:
        capsys.readouterr()
        cli.cmd_status(cli.build_parser().parse_args(["status"]), agent)
        return capsys.readouterr().out

    assert "2026-03-02T07:00:00-05:00 (manual run)\n" in status_text()  # current: no note
    server.start()
    clock.at("2026-03-03T12:00:00+00:00")
    assert asyncio.run(runs.run_connection(agent, "sis")).ok
    shown = status_text()
    assert (
        "last failure          2026-03-02T07:00:00-05:00 (manual run), older than the last "
        "success: the connection has worked since"
    ) in shown


# -- the "created" mail lists the settings that apply ----------------------------------------


def test_created_mail_of_a_command_export_lists_no_query_settings(
    make_agent: Callable[..., Agent],
    smtp_sink: SmtpSink,
    sshd_connection: Callable[..., Connection],
) -> None:
    agent = make_agent(smtp=smtp_settings(smtp_sink.port))
    to = ["ops@example.test"]
    connections.add(agent, sshd_connection("cmd", notify=to), "pw")
    query = sshd_connection(
        "qry", source_kind="query", source_command=None, source_url="sqlite:///x.db",
        source_query="select 1", notify=to,
    )  # fmt: skip
    connections.add(agent, query, "pw")
    command_mail, query_mail = (str(m["body"]) for m in smtp_sink.messages)
    assert "source_command:" in command_mail and "remote_name:" in command_mail
    for setting in ("delimiter:", "header:", "row_terminator:", "quoting:"):
        assert setting not in command_mail
        assert setting in query_mail


# -- a state file made by the previous version -----------------------------------------------

PREVIOUS_SCHEMA = """
CREATE TABLE connections (
    name VARCHAR(64) NOT NULL, host VARCHAR(255) NOT NULL, port INTEGER NOT NULL,
    remote_dir TEXT NOT NULL, username VARCHAR(255) NOT NULL, auth VARCHAR(16) NOT NULL,
    frequency VARCHAR(64) NOT NULL, source_kind VARCHAR(16) NOT NULL, source_path TEXT,
    source_command TEXT, source_url TEXT, source_query TEXT, delimiter VARCHAR(8) NOT NULL,
    header BOOLEAN NOT NULL, row_terminator VARCHAR(8) NOT NULL, quoting VARCHAR(16) NOT NULL,
    remote_name TEXT, pool_remote TEXT, pool_local TEXT, verify_fingerprint BOOLEAN NOT NULL,
    since_initial VARCHAR(10) NOT NULL, notify TEXT NOT NULL, bind_address VARCHAR(64),
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, test_passed_at DATETIME,
    pinned_fingerprint VARCHAR(128), seen_fingerprint VARCHAR(128),
    schedule_anchor DATETIME NOT NULL, PRIMARY KEY (name)
);
CREATE TABLE runs (
    id INTEGER NOT NULL, connection VARCHAR(64) NOT NULL, "trigger" VARCHAR(16) NOT NULL,
    started_at DATETIME NOT NULL, finished_at DATETIME, ok BOOLEAN, since VARCHAR(10),
    remote_file TEXT, bytes INTEGER, attempts INTEGER, category VARCHAR(32), message TEXT,
    cause TEXT, fingerprint VARCHAR(128), PRIMARY KEY (id)
);
CREATE INDEX ix_runs_connection ON runs (connection);
INSERT INTO connections VALUES ('old', '127.0.0.1', 22, '/upload', 'u', 'password', 'daily 02:00',
    'command', NULL, 'echo hi', NULL, NULL, ',', 1, 'crlf', 'minimal', 'x.txt', NULL, NULL, 0,
    '2026-01-01', '[]', NULL, '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000',
    '2026-01-01 00:00:00.000000', NULL, NULL, '2026-01-01 00:00:00.000000');
INSERT INTO runs VALUES (1, 'old', 'manual', '2026-01-02 07:00:00.000000',
    '2026-01-02 07:00:05.000000', 1, '2026-01-01', '/upload/x.txt', 3, 1, NULL, NULL, NULL, NULL);
INSERT INTO runs VALUES (2, 'old', 'manual', '2026-01-03 07:00:00.000000', NULL, NULL,
    '2026-01-02', NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"""


def test_a_state_file_of_the_previous_version_opens_and_its_stopped_run_is_finished(
    agent_settings: AgentSettings,
) -> None:
    agent_settings.state_dir.mkdir(parents=True)
    with sqlite3.connect(agent_settings.state_file) as db:
        db.executescript(PREVIOUS_SCHEMA)
    clock = FakeClock(datetime.fromisoformat("2026-01-03T12:00:00+00:00"))
    agent = open_agent(agent_settings, now=clock)
    try:
        columns = {r[1] for r in sqlite3.connect(agent_settings.state_file).execute(
            "PRAGMA table_info(runs)")}  # fmt: skip
        assert {"part", "restarts", "remote_temps", "attempt_causes"} <= columns
        assert runs.since_for(agent, connections.get(agent, "old")).text == "2026-01-02"
        # The run the previous version stopped in (killed) is recorded failed, with a cause.
        [outcome] = asyncio.run(daemon.recover_interrupted(agent))
        assert outcome.failure is not None
        assert outcome.failure.category is Category.AGENT_STOPPED
        stopped = agent.state.get_run(2)
        assert stopped is not None and stopped["ok"] is False and stopped["finished_at"]
        assert "the agent stopped during the run started 2026-01-03 02:00:00 EST" in str(
            stopped["cause"]
        )
        assert runs.status(agent)[0]["last_failure_message"] == MESSAGES[Category.AGENT_STOPPED]
    finally:
        agent.close()
    # Opened again: nothing more to add.
    open_agent(agent_settings).close()
