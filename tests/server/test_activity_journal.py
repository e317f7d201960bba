"""`ingestctl activity` reads the control DB's journal: two real server processes (two nodes:
own node id and port, one PostgreSQL control DB, one data root, the same host keys) record
what their clients did, and every node shows the same rows with the node that served each.
The upload path never waits for the journal, and the listener prunes expired rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from server_harness import (
    RunningServer,
    add_account,
    sftp_batch,
    start_node,
    start_server,
    wait_until,
)

from ingest_core.db import open_control_db, utcnow
from ingest_core.journal import account_events, record_events


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    shared = tmp_path / "shared"
    nodes: list[RunningServer] = []
    try:
        for name in ("node-a", "node-b"):
            nodes.append(start_node(tmp_path, name, pg_url, shared))
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            assert node.stop() == 0


def journal(node: RunningServer, account: str) -> list[dict[str, Any]]:
    return account_events(open_control_db(node.settings().control_db_url), account, 0)


@pytest.mark.postgres
def test_every_node_shows_the_same_activity_with_the_node_column(
    two_nodes: tuple[RunningServer, RunningServer],
    make_key: Callable[..., Path],
    tmp_path: Path,
) -> None:
    node_a, node_b = two_nodes
    key = make_key("rsa", 4096, "alpha")
    add_account(node_a, "alpha", key)
    sent: dict[str, bytes] = {}
    for node, name in ((node_a, "via-a.txt"), (node_b, "via-b.txt")):
        sent[name] = f"uploaded through {name}\n".encode()
        (tmp_path / name).write_bytes(sent[name])
        sftp_batch(node, key, "alpha", f"put {tmp_path / name}\n", check=True)
    wait_until(
        lambda: [e["event"] for e in journal(node_a, "alpha")].count("session.end") == 2,
        what="both sessions' ends in the journal",
    )

    from_a = json.loads(node_a.ingestctl("activity", "alpha", "--json").stdout)
    from_b = json.loads(node_b.ingestctl("activity", "alpha", "--json").stdout)
    assert from_a == from_b
    by_node: dict[str, list[str]] = {}
    for event in from_a:
        by_node.setdefault(event["node"], []).append(event["event"])
    assert by_node == {
        "node-a": ["auth.success", "file.received", "session.end"],
        "node-b": ["auth.success", "file.received", "session.end"],
    }
    for event in (e for e in from_a if e["event"] == "file.received"):
        data = sent[event["name"]]
        assert event["bytes"] == len(data)
        assert event["sha256"] == hashlib.sha256(data).hexdigest()
        assert event["node"] == ("node-a" if event["name"] == "via-a.txt" else "node-b")
    table = node_b.ingestctl("activity", "alpha").stdout.splitlines()
    assert table[0].split()[:3] == ["WHEN", "NODE", "EVENT"]
    assert any("node-a" in line and "via-a.txt" in line for line in table)
    assert any("node-b" in line and "via-b.txt" in line for line in table)
    # The JSON logs each hold only their own node's events: the journal is what joins them.
    assert [e["name"] for e in node_a.events("file.received")] == ["via-a.txt"]
    assert len(node_b.ingestctl("activity", "alpha", "--limit", "2").stdout.splitlines()) == 3


@pytest.mark.postgres
def test_uploads_do_not_wait_for_the_journal_and_expired_rows_are_pruned(
    tmp_path: Path, pg_url: str, make_key: Callable[..., Path]
) -> None:
    db = open_control_db(pg_url)  # migrated: an expired row is there before the server starts
    expired = {"event": "session.end", "account": "alpha", "address": "127.0.0.1",
               "timestamp": (utcnow() - timedelta(days=91)).isoformat()}  # fmt: skip
    record_events(db, [expired], "node-old")
    node = start_node(tmp_path, "node-a", pg_url, tmp_path / "shared")
    try:
        wait_until(lambda: journal(node, "alpha") == [], what="the listener's prune")
        assert node.events("journal.pruned")[-1]["journal_rows"] == 1
        key = make_key("rsa", 4096, "alpha")
        add_account(node, "alpha", key)
        (tmp_path / "held.txt").write_text("the journal is locked\n")
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as holder:
            # Nobody can write (or read) the journal until this transaction ends.
            holder.execute("LOCK TABLE journal_events IN ACCESS EXCLUSIVE MODE")
            result = sftp_batch(node, key, "alpha", f"put {tmp_path / 'held.txt'}\n")
            assert result.returncode == 0, result.stderr
            stored = node.settings().data_root / "accounts" / "alpha" / "held.txt"
            assert stored.read_text() == "the journal is locked\n"
            node.wait_for_event("file.received", name="held.txt")
            rows = holder.execute("SELECT count(*) FROM journal_events").fetchone()
            assert rows == (0,)  # the upload completed without its row
            assert node.process is not None and node.process.poll() is None
            holder.rollback()
        wait_until(
            lambda: any(e["event"] == "file.received" for e in journal(node, "alpha")),
            what="the received file's row once the journal is free",
        )
        (row,) = [e for e in journal(node, "alpha") if e["event"] == "file.received"]
        assert row["name"] == "held.txt" and row["node"] == "node-a"
    finally:
        assert node.stop() == 0


def test_one_node_on_sqlite_with_worker_processes_journals_their_sessions(
    tmp_path: Path, make_key: Callable[..., Path]
) -> None:
    node = start_server(
        tmp_path / "single",
        {"server": {"workers": 2}, "cluster": {"node_id": "solo"},
         "limits": {"connection_rate_per_address": 0}},
    )  # fmt: skip
    try:
        key = make_key("rsa", 4096, "alpha")
        add_account(node, "alpha", key)
        (tmp_path / "w.txt").write_text("from a worker\n")
        sftp_batch(node, key, "alpha", f"put {tmp_path / 'w.txt'}\n", check=True)
        wait_until(
            lambda: "session.end" in [e["event"] for e in journal(node, "alpha")],
            what="the worker's session in the journal",
        )
        shown = json.loads(node.ingestctl("activity", "alpha", "--json").stdout)
        assert [(e["event"], e["node"]) for e in shown] == [
            ("auth.success", "solo"),
            ("file.received", "solo"),
            ("session.end", "solo"),
        ]
        assert shown[1]["sha256"] == hashlib.sha256(b"from a worker\n").hexdigest()
    finally:
        assert node.stop() == 0
