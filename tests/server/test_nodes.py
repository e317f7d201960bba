"""Nodes sharing a data root: whose temporary uploads are removed when, leftovers and the
quota, /healthz (serving, control DB unreachable, draining after SIGTERM), and the guard that
keeps a SQLite control DB to one node. Real server processes, real clients, real SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from server_harness import (
    add_account,
    free_port,
    login,
    paramiko_sftp,
    start_server,
    temp_files,
    wait_until,
)

from ingest_core import nodes
from ingest_core.db import ClusterNode, open_control_db
from ingest_core.folders import (
    node_tag,
    remove_uploads_of,
    upload_temp_files,
    upload_writer,
)
from ingest_core.settings import settings_from_mapping

OLD = time.time() - 25 * 3600  # past the 24 h rule


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=20) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def psql(sql: str) -> None:
    subprocess.run(["psql", "-d", "postgres", "-qc", sql], check=True, capture_output=True)


def leftover(folder: Path, name: str, size: int = 10, mtime: float | None = None) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


# -- names ---------------------------------------------------------------------------------


def test_temporary_names_carry_a_safe_node_id_and_the_writing_process(tmp_path: Path) -> None:
    assert node_tag("node-1.example") == "node-1.example"
    assert node_tag("bad name/ü") == "bad_name__"
    assert node_tag("..") == "__" and node_tag("x" * 80) == "x" * 64
    assert upload_writer(".ingest-upload-a-12-5-0badcafe") == ("a-12", 5)
    assert upload_writer(".ingest-upload-test") is None
    assert upload_writer("data.csv") is None

    # Node "a"'s process 12 is not node "a-12"'s process 5, whose name starts the same.
    settings = settings_from_mapping(
        {"data_root": "var", "log_dir": "logs", "cluster": {"node_id": "a"}}, tmp_path, "test"
    )
    folder = settings.data_root / "accounts" / "acct"
    folder.mkdir(parents=True)
    mine = leftover(folder, ".ingest-upload-a-12-00ff")
    other = leftover(folder, ".ingest-upload-a-12-5-00ff")
    assert remove_uploads_of(settings, 12) == 1
    assert not mine.exists() and other.exists()
    assert list(upload_temp_files(settings)) == [other]


# -- leftovers ------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_node_removes_its_own_leftovers_at_start_and_only_dead_nodes_others(
    tmp_path: Path, pg_url: str, alpha_key: Path
) -> None:
    running = start_server(
        tmp_path / "node-a",
        {"control_db_url": pg_url, "cluster": {"node_id": "node-a"}},
        launch=False,
    )
    add_account(running, "alpha", alpha_key)
    db = open_control_db(pg_url)
    now = datetime.now(UTC)
    with db.session.begin() as session:
        session.add(ClusterNode(node_id="node-b", host="b", started_at=now, seen_at=now))
        gone = now - timedelta(hours=1)
        session.add(ClusterNode(node_id="node-c", host="c", started_at=gone, seen_at=gone))
    folder = running.folder("alpha")
    mine = leftover(folder, ".ingest-upload-node-a-4242-0abc")  # fresh: still removed
    live_stalled = leftover(folder, ".ingest-upload-node-b-77-0abc", mtime=time.time() - 7200)
    live_ancient = leftover(folder, ".ingest-upload-node-b-78-0abc", mtime=OLD)
    dead_fresh = leftover(folder, ".ingest-upload-node-c-99-0abc")
    never_seen = leftover(folder, ".ingest-upload-node-d-99-0abc")
    unknown = leftover(folder, ".ingest-upload-unknown")  # whose? only the 24 h rule

    running.restart()
    try:
        assert running.events("server.started")[-1]["own_leftover_uploads_removed"] == 1
        assert running.wait_for_event("node.leftovers_removed")["count"] == 3
        assert temp_files(folder) == sorted([live_stalled.name, unknown.name])
        assert not (mine.exists() or live_ancient.exists() or dead_fresh.exists())
        assert not never_seen.exists()
        with db.session() as session:
            row = session.get(ClusterNode, "node-a")
            assert row is not None and not row.draining
            assert datetime.now(UTC) - row.seen_at < timedelta(minutes=5)
    finally:
        assert running.stop() == 0


def test_leftovers_do_not_count_against_the_quota(tmp_path: Path, alpha_key: Path) -> None:
    quota = 1_000_000
    running = start_server(
        tmp_path / "srv",
        {
            "limits": {"account_quota_bytes": quota, "connection_rate_per_address": 0},
            "cluster": {"node_id": "here"},
            "server": {"workers": 2},
        },
        launch=False,
    )
    add_account(running, "alpha", alpha_key)
    folder = running.folder("alpha")
    canary = leftover(folder, ".ingest-upload-gone-1-00")
    running.restart()
    try:
        running.wait_for_event("node.leftovers_removed")  # the first sweep is over
        assert not canary.exists()
        # Leftovers of a node that died and of a killed pool publisher, three times the quota,
        # there before the account's usage is first measured (and the next sweep is minutes
        # away).
        leftover(folder, ".ingest-upload-gone-2-0abc", 2_000_000)
        leftover(folder, ".ingest-pool-0abc", 1_000_000)
        sftp = paramiko_sftp(running, alpha_key)
        try:
            with sftp.open("first.csv", "wb") as handle:
                handle.write(b"a" * 900_000)
                temps = temp_files(folder)
            # An upload in flight: the node and the worker process that writes it.
            workers = {e["pid"] for e in running.events("worker.started")}
            mine = [upload_writer(n) for n in temps if not n.startswith(".ingest-upload-gone")]
            assert len(mine) == 1 and mine[0] is not None
            assert mine[0][0] == "here" and mine[0][1] in workers
            assert (folder / "first.csv").stat().st_size == 900_000
            with pytest.raises(OSError), sftp.open("second.csv", "wb") as handle:
                handle.write(b"b" * 200_000)  # the quota itself still holds
        finally:
            sftp.close()
        assert not (folder / "second.csv").exists()
    finally:
        assert running.stop() == 0


# -- /healthz -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_healthz_is_json_200_while_serving_and_503_while_the_control_db_is_unreachable(
    tmp_path: Path, pg_url: str
) -> None:
    admin = free_port()
    running = start_server(
        tmp_path / "srv",
        {
            "control_db_url": pg_url,
            "admin": {"port": admin},
            "cluster": {"node_id": "node-1"},
            "server": {"workers": 2},
        },
    )
    database = pg_url.rsplit("/", 1)[-1]
    try:
        running.wait_for_event("admin.started")
        wait_until(lambda: healthz(admin)[0] == 200, what="/healthz 200")
        code, body = healthz(admin)
        assert code == 200
        assert body == {
            "node": "node-1",
            "status": "serving",
            "listening": True,
            "draining": False,
            "workers_ready": 2,
            "workers_total": 2,
            "sessions": 0,
            "control_db": "ok",
            "problems": [],
        }

        psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")
        try:
            wait_until(lambda: healthz(admin)[0] == 503, what="/healthz 503")
            code, body = healthz(admin)
            assert code == 503 and body["status"] == "not serving"
            assert body["control_db"].startswith("control DB unreachable")
            assert body["problems"] == [body["control_db"]]
            assert body["workers_ready"] == 2 and not body["draining"]
            assert database not in json.dumps(body)  # nothing of the URL
        finally:
            psql(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        wait_until(lambda: healthz(admin)[0] == 200, what="/healthz 200 again")
    finally:
        assert running.stop() == 0


def test_sigterm_turns_healthz_503_at_once_while_a_session_finishes_its_upload(
    tmp_path: Path, alpha_key: Path
) -> None:
    admin = free_port()
    running = start_server(
        tmp_path / "srv",
        {
            "admin": {"port": admin},
            "cluster": {"node_id": "draining-node"},
            "limits": {"connection_rate_per_address": 0},
            # New connections are still taken this long after SIGTERM; the test's new login
            # comes within it.
            "server": {"workers": 2, "drain_seconds": 6.0, "shutdown_grace": 10.0},
        },
        launch=False,
    )
    add_account(running, "alpha", alpha_key)
    running.restart()
    assert running.process is not None
    db = open_control_db(running.settings().control_db_url)
    data = os.urandom(300_000)
    sftp = paramiko_sftp(running, alpha_key)
    try:
        running.wait_for_event("admin.started")
        assert healthz(admin)[0] == 200
        handle = sftp.open("during-drain.csv", "wb")
        handle.write(data[:100_000])
        handle.flush()

        running.process.send_signal(signal.SIGTERM)
        wait_until(lambda: healthz(admin)[0] == 503, what="/healthz 503 after SIGTERM")
        code, body = healthz(admin)
        assert code == 503 and body["status"] == "draining" and body["draining"] is True
        assert body["sessions"] >= 1

        def row_draining() -> bool:
            with db.session() as session:
                row = session.get(ClusterNode, "draining-node")
                return row is not None and row.draining

        wait_until(row_draining, what="cluster_nodes.draining")
        newcomer = login(running, alpha_key)  # still accepted while the balancer notices
        assert newcomer.is_authenticated()
        newcomer.close()

        handle.write(data[100_000:])
        handle.close()  # the upload completes after SIGTERM
    finally:
        sftp.close()
    assert running.stop() == 0
    assert (running.folder("alpha") / "during-drain.csv").read_bytes() == data
    assert temp_files(running.folder("alpha")) == []
    assert not (running.workdir / "var" / "nodes" / "draining-node").exists()


# -- SQLite: one node ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["server", "serve"])
def test_sqlite_node_refuses_a_data_root_another_node_uses_and_starts_when_it_is_old(
    tmp_path: Path, command: str
) -> None:
    running = start_server(tmp_path / "srv", {"cluster": {"node_id": "second"}}, launch=False)
    marker = running.workdir / "var" / "nodes" / "first"
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    refused = running.ingestctl(command, check=False)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert re.search(r"node 'first' used the data root .* s ago", lines[0])
    assert "PostgreSQL" in lines[0] and "its own data_root" in lines[0]
    assert not (marker.parent / "second").exists()

    if command == "serve":
        return
    old = time.time() - 2 * nodes.MARKER_FRESH_SECONDS
    os.utime(marker, (old, old))
    folder = running.workdir / "var" / "accounts" / "alpha"
    folder.mkdir()
    theirs = leftover(folder, ".ingest-upload-first-5-0abc")
    running.restart()
    try:
        assert (marker.parent / "second").exists()
        # With SQLite there is no other node: another node id's leftover goes at once.
        running.wait_for_event("node.leftovers_removed", count=1)
        assert not theirs.exists()
    finally:
        assert running.stop() == 0
    assert not (marker.parent / "second").exists()
    assert marker.exists()


@pytest.mark.postgres
def test_a_heartbeat_keeps_a_node_alive_and_silence_makes_it_dead(
    tmp_path: Path, pg_url: str
) -> None:
    def node(name: str) -> Any:
        raw = {"data_root": "var", "control_db_url": pg_url, "cluster": {"node_id": name}}
        return settings_from_mapping(raw, tmp_path, "test")

    first, second = node("first"), node("second")
    db = open_control_db(pg_url)
    nodes.register_node(db, first)
    nodes.register_node(db, second)
    assert nodes.live_nodes(db, first) == {"first", "second"}
    silent = datetime.now(UTC) - timedelta(seconds=nodes.DEAD_AFTER_SECONDS + 60)
    with db.session.begin() as session:
        session.get(ClusterNode, "second").seen_at = silent
    assert nodes.live_nodes(db, first) == {"first"}
    nodes.heartbeat(db, second)
    assert nodes.live_nodes(db, first) == {"first", "second"}
    assert list(nodes.fresh_markers(first)) == ["second"]  # the heartbeat touched its marker
