"""The activity journal's writer and retention, on real SQLite files and a real PostgreSQL:
rows with the node id, a budget per client, odd names that every backend takes, drops
counted while the DB is unreachable (received files kept and written once it is back), and
the bounded prune."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from server_harness import wait_until

from ingest_core.db import DefenderFailure, JournalEvent, open_control_db, utcnow
from ingest_core.journal import (
    BUDGET_BURST,
    JournalWriter,
    account_events,
    prune_journal,
    record_events,
)
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, read_events


def stamp(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def received(name: str, size: int = 3) -> dict[str, object]:
    return {
        "event": "file.received",
        "timestamp": stamp(utcnow()),
        "account": "uni",
        "address": "127.0.0.1",
        "name": name,
        "bytes": size,
        "sha256": "ab" * 32,
    }


def test_log_events_become_rows_with_the_node(settings: Settings) -> None:
    db = open_control_db(settings.control_db_url)
    audit = get_logger(settings.log_dir, "server")
    writer = JournalWriter(settings.control_db_url, "node-x", audit).start()
    try:
        writer.record({"event": "auth.success", "account": "uni", "address": "127.0.0.1",
                       "timestamp": stamp(utcnow()), "fingerprint": "SHA256:abc"})  # fmt: skip
        writer.record(received("a.txt"))
        writer.record({"event": "worker.started", "account": "uni"})  # not journaled
    finally:
        writer.stop()
    events = account_events(db, "uni", 0)
    assert [e["event"] for e in events] == ["auth.success", "file.received"]
    assert {e["node"] for e in events} == {"node-x"}
    assert events[1]["name"] == "a.txt" and events[1]["bytes"] == 3
    assert events[1]["sha256"] == "ab" * 32
    with db.session() as session:
        row = session.query(JournalEvent).filter_by(kind="file.received").one()
    assert json.loads(row.detail) == {"name": "a.txt", "bytes": 3, "sha256": "ab" * 32}
    assert row.account == "uni" and row.checked_at is None


def test_one_clients_flood_is_held_to_its_budget_and_the_drops_are_counted(
    settings: Settings,
) -> None:
    db = open_control_db(settings.control_db_url)
    audit = get_logger(settings.log_dir, "server")
    writer = JournalWriter(settings.control_db_url, "node-x", audit).start()
    flood = 1000
    try:
        for i in range(flood):  # a different name each time: the log's collapsing misses it
            writer.record({"event": "file.download", "account": "uni", "address": "127.0.0.9",
                           "timestamp": stamp(utcnow()), "name": f"f{i}", "bytes": 1})  # fmt: skip
        for i in range(3):  # received files are never over budget
            writer.record(received(f"kept{i}.txt"))
    finally:
        writer.stop()
    events = account_events(db, "uni", 0)
    downloads = [e for e in events if e["event"] == "file.download"]
    assert BUDGET_BURST <= len(downloads) < flood
    assert sum(e["event"] == "file.received" for e in events) == 3
    (dropped,) = [
        e for e in read_events(settings.log_dir, "server") if e["event"] == "journal.dropped"
    ]
    assert dropped["rows"] == flood - len(downloads)
    assert dropped["reasons"] == {"over one client's budget": flood - len(downloads)}


def test_retention_removes_old_rows_in_batches(settings: Settings) -> None:
    db = open_control_db(settings.control_db_url)
    now = utcnow()
    old = [
        received(f"old{i}.txt") | {"timestamp": stamp(now - timedelta(days=91))} for i in range(5)
    ]
    new = [received("new.txt") | {"timestamp": stamp(now - timedelta(days=89))}]
    assert record_events(db, [*old, *new], "node-x") == 6
    with db.session.begin() as session:
        session.add(DefenderFailure(address="192.0.2.1", at=now - timedelta(seconds=700), points=3))
        session.add(DefenderFailure(address="192.0.2.1", at=now - timedelta(seconds=10), points=3))
    removed = prune_journal(db, 90, 600, now=now, batch=2)  # three batches for five rows
    assert removed == {"journal_rows": 5, "defender_failures": 1}
    assert [e["name"] for e in account_events(db, "uni", 0)] == ["new.txt"]
    with db.session() as session:
        assert session.query(DefenderFailure).count() == 1


def psql(sql: str) -> None:
    subprocess.run(["psql", "-d", "postgres", "-qc", sql], check=True, capture_output=True)


@pytest.mark.postgres
def test_while_the_db_is_unreachable_rows_are_dropped_but_received_files_wait(
    pg_url: str, tmp_path: Path
) -> None:
    db = open_control_db(pg_url)
    database = pg_url.rsplit("/", 1)[-1]
    audit = get_logger(tmp_path / "logs", "server")
    writer = JournalWriter(pg_url, "node-x", audit, queue_limit=5).start()
    psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
    try:
        for i in range(20):
            writer.record({"event": "auth.failure", "account": "uni", "address": "127.0.0.1",
                           "timestamp": stamp(utcnow()), "reason": f"r{i}"})  # fmt: skip
        writer.record(received("during-outage.txt"))
        wait_until(
            lambda: any(e["event"] == "journal.unavailable"
                        for e in read_events(tmp_path / "logs", "server")),
            what="the writer to notice the DB is gone",
        )  # fmt: skip
    finally:
        psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    wait_until(
        lambda: any(e["event"] == "file.received" for e in account_events(db, "uni", 0)),
        what="the received file's row once the DB is back",
    )
    writer.record({"event": "session.end", "account": "uni", "address": "127.0.0.1",
                   "timestamp": stamp(utcnow())})  # fmt: skip
    writer.stop()
    kinds = [e["event"] for e in account_events(db, "uni", 0)]
    assert kinds.count("file.received") == 1 and kinds[-1] == "session.end"
    assert kinds.count("auth.failure") < 20  # dropped, not kept
    logged = read_events(tmp_path / "logs", "server")
    assert any(e["event"] == "journal.resumed" for e in logged)
    dropped = sum(e["rows"] for e in logged if e["event"] == "journal.dropped")
    assert dropped == 20 - kinds.count("auth.failure")


@pytest.mark.postgres
def test_names_no_column_could_hold_are_kept_in_the_detail(pg_url: str, tmp_path: Path) -> None:
    db = open_control_db(pg_url)
    long_user = "u" * 200 + "\x00"
    odd_name = "bad\udcffname\x00\u2028.txt"  # not UTF-8, a NUL, a line separator
    events = [
        {"event": "auth.failure", "account": long_user, "address": "127.0.0.1",
         "timestamp": stamp(utcnow()), "reason": "unknown account"},
        received(odd_name),
    ]  # fmt: skip
    assert record_events(db, events, "node-x") == 2
    (row,) = account_events(db, "uni", 0)
    assert row["name"] == odd_name
    with db.session() as session:
        failure = session.query(JournalEvent).filter_by(kind="auth.failure").one()
    assert failure.account == "u" * 32
    assert json.loads(failure.detail)["user"] == long_user
