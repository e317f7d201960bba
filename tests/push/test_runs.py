"""Transfers against the real sshd: the "since" date across a failure and the next success,
pool pickup, replacing a file atomically, retries, the one-run-at-a-time lock, and the manual
export that touches no state; plus the byte-exact SQL query export."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ingest_core.errors import Refused
from push_agent import connections, runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import Category
from push_agent.state import connections as connections_table
from push_agent.state import runs as runs_table

from .conftest import FakeClock, SshdLab, ready

SINCE_COMMAND = f"{sys.executable} -c \"print('id,since'); print('1,{{since}}')\""


def run(agent: Agent, name: str = "sis") -> runs.Outcome:
    return asyncio.run(runs.run_connection(agent, name))


def snapshot(agent: Agent) -> list[Any]:
    with agent.state.engine.connect() as db:
        return [
            [tuple(r) for r in db.execute(select(connections_table)).all()],
            [tuple(r) for r in db.execute(select(runs_table)).all()],
        ]


def test_since_date_survives_a_failure_and_moves_on_the_next_success(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
) -> None:
    clock = FakeClock(datetime.fromisoformat("2026-03-01T12:00:00+00:00"))
    agent = make_agent(now=clock)
    server = sshd_lab.server()
    ready(agent, sshd_connection(port=server.port, source_command=SINCE_COMMAND), sshd_lab.password)
    sent = upload_dir / "sis_hr_user_info.txt"

    first = run(agent)  # before any success: the initial date
    assert first.ok and first.since == "2026-01-15"
    assert sent.read_text() == "id,since\n1,2026-01-15\n"

    server.stop()
    clock.at("2026-03-02T12:00:00+00:00")
    failed = run(agent)
    assert failed.failure is not None and failed.failure.category is Category.PORT_REFUSED
    assert failed.since == "2026-03-01"
    assert runs.since_for(agent, connections.get(agent, "sis")).text == "2026-03-01"

    server.start()
    clock.at("2026-03-03T12:00:00+00:00")
    resumed = run(agent)  # sends from the last success again, not from the failed attempt
    assert resumed.ok and resumed.since == "2026-03-01"
    assert sent.read_text() == "id,since\n1,2026-03-01\n"
    assert runs.since_for(agent, connections.get(agent, "sis")).text == "2026-03-03"
    entry = runs.status(agent)[0]
    assert entry["last_success"] == clock()
    assert entry["last_failure_message"].startswith("Port was refused.")
    # Deleted and created again: the first transfer follows the last successful date.
    connections.delete(agent, "sis")
    again = sshd_connection(port=server.port, since_initial="2025-01-01")
    connections.add(agent, again, sshd_lab.password)
    assert runs.since_for(agent, again).text == "2026-03-03"


def test_upload_replaces_the_remote_file_atomically(
    agent: Agent,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    tmp_path: Path,
) -> None:
    source = tmp_path / "out"
    source.mkdir()
    (source / "old.csv").write_text("old\n")
    newest = source / "new.csv"
    newest.write_text("newest\n")
    os.utime(source / "old.csv", (1, 1))
    conn = sshd_connection(source_kind="file", source_path=str(source / "*.csv"), remote_name=None)
    ready(agent, conn, sshd_lab.password)
    (upload_dir / "new.csv").write_text("yesterday's file, longer than today's\n")
    outcome = run(agent)
    assert outcome.ok and outcome.remote_file == "/upload/new.csv" and outcome.bytes == 7
    assert sorted(p.name for p in upload_dir.iterdir()) == ["new.csv"]  # no temp left
    assert (upload_dir / "new.csv").read_text() == "newest\n"


def test_pool_pickup_downloads_to_a_temp_name_then_renames(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection], tmp_path: Path
) -> None:
    local = tmp_path / "incoming" / "applicant_pool.txt"
    conn = sshd_connection(
        source_kind="none",
        source_command=None,
        remote_name=None,
        pool_remote="/pool/applicant_pool.txt",
        pool_local=str(local),
    )
    ready(agent, conn, sshd_lab.password)
    outcome = run(agent)
    assert outcome.ok and outcome.pool_file == str(local)
    assert local.read_bytes() == b"U1001\r\nU1002\r\nU1003\r\n"
    assert [p.name for p in local.parent.iterdir()] == ["applicant_pool.txt"]
    # A missing pool file is a failure of its own and leaves the last good copy alone.
    connections.edit(agent, "sis", {"pool_remote": "/pool/missing.txt"})
    assert asyncio.run(runs.test_connection(agent, "sis")).ok
    missing = run(agent)
    assert missing.failure is not None and missing.failure.category is Category.POOL_MISSING
    assert "/pool/missing.txt does not exist" in missing.failure.cause
    assert local.read_bytes() == b"U1001\r\nU1002\r\nU1003\r\n"


def test_manual_export_writes_the_file_and_touches_no_state(
    agent: Agent,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    tmp_path: Path,
) -> None:
    ready(agent, sshd_connection(source_command=SINCE_COMMAND), sshd_lab.password)
    assert run(agent).ok
    since = runs.since_for(agent, connections.get(agent, "sis")).text
    before = snapshot(agent)
    out = tmp_path / "manual.csv"
    path, used = runs.export_connection(agent, "sis", out)
    assert path == out and used.text == since
    assert out.read_text() == f"id,since\n1,{since}\n"
    assert snapshot(agent) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".manual")] == []


def test_export_command_gets_since_in_its_environment(
    agent: Agent, sshd_connection: Callable[..., Connection], tmp_path: Path
) -> None:
    command = f"{sys.executable} -c \"import os; print(os.environ['INGEST_PUSH_SINCE'])\""
    connections.add(agent, sshd_connection(source_command=command), "unused")
    runs.export_connection(agent, "sis", tmp_path / "x")
    assert (tmp_path / "x").read_text() == "2026-01-15\n"
    failing = f"{sys.executable} -c \"import sys; sys.exit('no database')\""
    connections.edit(agent, "sis", {"source_command": failing})
    with pytest.raises(Refused, match="exited with status 1 \\(no database\\)"):
        runs.export_connection(agent, "sis", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_query_export_matches_the_spec_byte_for_byte(
    agent: Agent, sshd_connection: Callable[..., Connection], tmp_path: Path
) -> None:
    db = tmp_path / "sis.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table people (uuuid text, first_name text, changed text)")
        conn.executemany(
            "insert into people values (?, ?, ?)",
            [("U1", "Ada", "2026-01-01"), ("U2", "Bo", "2026-02-01"), ("U3", None, "2026-03-01")],
        )
    query = "select uuuid, first_name from people where changed >= :since order by uuuid"
    connections.add(
        agent,
        sshd_connection(
            source_kind="query",
            source_command=None,
            source_url=f"sqlite:///{db}",
            source_query=query,
            delimiter="\t",
            row_terminator="crlf",
            quoting="none",
            since_initial="2026-01-15",
        ),
        "unused",
    )
    runs.export_connection(agent, "sis", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == b"uuuid\tfirst_name\r\nU2\tBo\r\nU3\t\r\n"
    connections.edit(
        agent, "sis", {"header": False, "delimiter": "|", "row_terminator": "lf", "quoting": "all"}
    )
    runs.export_connection(agent, "sis", tmp_path / "out2.txt")
    assert (tmp_path / "out2.txt").read_bytes() == b'"U2"|"Bo"\n"U3"|""\n'


def test_transient_failures_are_retried_with_backoff_permanent_ones_are_not(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    agent = make_agent(retries=2, retry_backoff=0.01)
    server = sshd_lab.server()
    ready(agent, sshd_connection(port=server.port), sshd_lab.password)
    server.stop()
    refused = run(agent)
    assert refused.failure is not None and refused.failure.category is Category.PORT_REFUSED
    assert refused.attempts == 3
    server.start()
    connections.edit(agent, "sis", {"remote_dir": "/readonly"})
    agent.state.update("sis", test_passed_at=agent.now())  # as if tested before the change
    denied = run(agent)
    assert denied.failure is not None and denied.failure.category is Category.TRANSFER
    assert denied.attempts == 1


def test_never_two_runs_of_one_connection_at_once(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    ready(agent, sshd_connection(), sshd_lab.password)
    with runs.connection_lock(agent, "sis"), pytest.raises(Refused, match="busy"):
        run(agent)
    assert run(agent).ok


def test_no_transfer_before_a_passing_test(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection], upload_dir: Path
) -> None:
    connections.add(agent, sshd_connection(), sshd_lab.password)
    with pytest.raises(Refused, match="no passing test"):
        run(agent)
    assert list(upload_dir.iterdir()) == []


def test_interrupted_upload_is_a_transfer_failure_retried_and_cleaned_up(
    make_agent: Callable[..., Agent],
    sshd: Any,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
    tmp_path: Path,
) -> None:
    from .conftest import CuttingProxy

    payload = tmp_path / "big.txt"
    payload.write_bytes(os.urandom(3 * 1024 * 1024))
    # Connections 1 and 2 are cut after 1 MiB from the client, mid-upload; 3 goes through.
    proxy = CuttingProxy(sshd.port, 1024 * 1024, cut={1, 2})
    try:
        conn = sshd_connection(
            port=proxy.port, source_kind="file", source_path=str(payload), remote_name="big.txt",
            source_command=None, verify_fingerprint=False,
        )  # fmt: skip
        once = make_agent(retries=0)
        ready(once, conn, sshd_lab.password)
        # Test and Save used connection 1 (below the cut); reset the count to cut the uploads.
        proxy.count = 0
        failed = run(once)
        assert failed.failure is not None and failed.failure.category is Category.TRANSFER
        assert "interrupted" in failed.failure.cause and failed.attempts == 1
        assert not (upload_dir / "big.txt").exists()
        assert [p.name for p in upload_dir.iterdir() if p.name.endswith(".part")]

        retried = make_agent(retries=1, retry_backoff=0.01, state_dir=once.settings.state_dir)
        outcome = run(retried)
        assert outcome.ok and outcome.attempts == 2
        assert (upload_dir / "big.txt").read_bytes() == payload.read_bytes()
        assert [p.name for p in upload_dir.iterdir()] == ["big.txt"]  # stale temps removed
        events = (retried.settings.log_dir / "push-agent.jsonl").read_text()
        assert '"event": "attempt_failed"' in events
    finally:
        proxy.close()


def test_full_remote_disk_is_a_transfer_failure_naming_the_space(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection], tmp_path: Path
) -> None:
    import pwd
    import subprocess

    small = sshd_lab.chroot / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k,mode=0755", "tmpfs", str(small)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        small.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        user = pwd.getpwnam("ingestpush")
        os.chown(small, user.pw_uid, user.pw_gid)
        payload = tmp_path / "big.txt"
        payload.write_bytes(os.urandom(512 * 1024))
        conn = sshd_connection(
            remote_dir="/small", source_kind="file", source_path=str(payload),
            source_command=None, remote_name="big.txt",
        )  # fmt: skip
        ready(agent, conn, sshd_lab.password)  # the small probe file fits
        outcome = run(agent)
        assert outcome.failure is not None and outcome.failure.category is Category.TRANSFER
        assert "no space on the SFTP server" in outcome.failure.cause
        assert "524288 needed" in outcome.failure.cause
        assert list(small.iterdir()) == []  # the partial temporary file was removed
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
        small.rmdir()
