"""``[server] workers`` > 1: the listener admits, worker processes run the sessions.

Limits and defender scores are kept by the listener, so they count across all workers; a
worker that dies has its connections released and is restarted.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from server_harness import (
    RunningServer,
    add_account,
    login,
    sftp_batch,
    start_server,
    temp_files,
    wait_until,
)

from ingest_core.folders import upload_writer


@pytest.fixture
def pooled(tmp_path: Path, alpha_key: Path) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path / "srv",
        {
            "server": {"workers": 2},
            "limits": {"max_connections_per_address": 2},
            "defender": {"score_bad_key": 2, "threshold": 6, "ban_seconds": 600},
        },
    )
    add_account(running, "alpha", alpha_key, ips=("127.0.0.1", "127.0.0.6"))
    yield running
    running.stop()


def worker_pids(running: RunningServer) -> set[int]:
    return {e["pid"] for e in running.events("worker.started")}


def dropped_before_banner(running: RunningServer) -> bool:
    with socket.create_connection((running.host, running.port), timeout=10) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def test_connection_limit_counts_across_workers(pooled: RunningServer, alpha_key: Path) -> None:
    before = len(pooled.events("auth.success"))
    held = [login(pooled, alpha_key) for _ in range(2)]
    try:
        # The client hears "logged in" a moment before the worker writes its log line.
        wait_until(lambda: len(pooled.events("auth.success")) >= before + 2, 10, "two logins")
        logins = pooled.events("auth.success")[before:]
        assert len({e["pid"] for e in logins}) == 2  # one session on each worker
        assert dropped_before_banner(pooled)  # a third, on either worker, is over the limit
        event = pooled.wait_for_event("connection.refused", address="127.0.0.1")
        assert "too many connections" in event["reason"]
    finally:
        for transport in held:
            transport.close()
    # The workers report the ends; the listener admits again.
    wait_until(lambda: not dropped_before_banner(pooled), 10, "admitted again")


def test_defender_scores_failures_from_every_worker(
    pooled: RunningServer, make_key, alpha_key: Path
) -> None:
    wrong = make_key("rsa", 4096, "stranger")
    for _ in range(3):  # a wrong key: 2 points each, threshold 6
        assert sftp_batch(pooled, wrong, "alpha", "ls\n", bind="127.0.0.6").returncode != 0
    ban = pooled.wait_for_event("defender.ban", address="127.0.0.6")
    assert ban["score"] == 6
    failures = [e for e in pooled.events("auth.failure") if e["address"] == "127.0.0.6"]
    assert {e["pid"] for e in failures} == worker_pids(pooled)  # split over both workers
    assert ban["pid"] == pooled.events("server.started")[-1]["pid"]  # banned by the listener
    assert sftp_batch(pooled, alpha_key, "alpha", "ls\n", bind="127.0.0.6").returncode != 0


def test_a_killed_worker_is_replaced_and_its_connections_released(
    pooled: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    held = [login(pooled, alpha_key) for _ in range(2)]  # the address's whole allowance
    try:
        first = worker_pids(pooled)
        in_flight = paramiko.SFTPClient.from_transport(held[-1])
        assert in_flight is not None
        handle = in_flight.open("in-flight.bin", "wb")  # kept open: not committed
        handle.write(b"x" * 600_000)
        (temp,) = temp_files(pooled.folder("alpha"))
        # The worker serving it: its pid is in the temporary name (node-pid-random).
        writer = upload_writer(temp)
        assert writer is not None
        victim = writer[1]
        assert victim in first
        os.kill(victim, signal.SIGKILL)
        exited = pooled.wait_for_event("worker.exited", worker_pid=victim)
        assert exited["restarting"] is True
        # Its upload died with it: the temporary file goes now, not at the next start.
        pooled.wait_for_event("worker.uploads_removed", worker_pid=victim, count=1)
        assert temp_files(pooled.folder("alpha")) == []
        wait_until(lambda: len(worker_pids(pooled)) == 3, 30, "a new worker")
        assert len(worker_pids(pooled) - first) == 1
        # The dead worker's session no longer counts: one more login fits.
        (tmp_path / "after.txt").write_text("after the crash\n")
        command = f"put {tmp_path / 'after.txt'}\n"
        sftp_batch(pooled, alpha_key, "alpha", command, check=True)
        assert (pooled.folder("alpha") / "after.txt").read_text() == "after the crash\n"
    finally:
        for transport in held:
            transport.close()
    assert pooled.stop() == 0


def test_workers_drain_and_exit_when_the_listener_is_killed(
    pooled: RunningServer, alpha_key: Path, tmp_path: Path
) -> None:
    """kill -9 of the listener: its workers see the channel close, end their sessions and
    exit (no orphans serving on), and a new server takes the port at once."""
    held = login(pooled, alpha_key)
    workers = worker_pids(pooled)
    assert pooled.process is not None
    pooled.process.kill()
    pooled.process.wait(10)
    for pid in workers:
        pooled.wait_for_event("worker.stopped", timeout=20, pid=pid)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as stat:  # exited, not yet reaped by anyone
            return stat.read().split(") ")[1].startswith("Z")

    wait_until(lambda: all(gone(pid) for pid in workers), 20, "workers gone")
    held.close()
    pooled.process = None
    pooled.restart()
    (tmp_path / "again.txt").write_text("after the listener died\n")
    sftp_batch(pooled, alpha_key, "alpha", f"put {tmp_path / 'again.txt'}\n", check=True)
    assert (pooled.folder("alpha") / "again.txt").read_text() == "after the listener died\n"


def test_a_stuck_worker_is_killed_and_replaced(tmp_path: Path, alpha_key: Path) -> None:
    """A worker whose event loop stops answering (SIGSTOP here) is killed after
    ``worker_heartbeat_timeout`` and replaced; new sessions go to the others meanwhile."""
    running = start_server(
        tmp_path / "srv", {"server": {"workers": 2, "worker_heartbeat_timeout": 2.0}}
    )
    try:
        add_account(running, "alpha", alpha_key)
        first = worker_pids(running)
        stuck = min(first)
        os.kill(stuck, signal.SIGSTOP)
        event = running.wait_for_event("worker.unresponsive", timeout=20, worker_pid=stuck)
        assert event["silent_seconds"] >= 2.0
        running.wait_for_event("worker.exited", timeout=20, worker_pid=stuck)
        wait_until(lambda: len(worker_pids(running)) == 3, 30, "a replacement worker")
        for i in range(3):
            (tmp_path / f"s{i}.txt").write_text("served\n")
            sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / f's{i}.txt'}\n", check=True)
        served_by = {e["pid"] for e in running.events("file.received")}
        assert stuck not in served_by and served_by <= worker_pids(running)
    finally:
        assert running.stop() == 0


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_a_replacement_that_hangs_while_starting_is_killed_and_replaced(
    tmp_path: Path, alpha_key: Path
) -> None:
    """A new worker that never says ready (stopped here before it could) is killed after
    ``worker_heartbeat_timeout`` like a stuck one, and replaced; the server serves on."""
    running = start_server(
        tmp_path / "srv", {"server": {"workers": 2, "worker_heartbeat_timeout": 2.0}}
    )
    try:
        add_account(running, "alpha", alpha_key)
        assert running.process is not None
        before = children(running.process.pid)
        os.kill(min(worker_pids(running)), signal.SIGKILL)
        wait_until(lambda: bool(children(running.process.pid) - before), 10, "a replacement")
        (hung,) = children(running.process.pid) - before
        os.kill(hung, signal.SIGSTOP)  # long before its imports are done
        event = running.wait_for_event("worker.unresponsive", timeout=20, worker_pid=hung)
        assert event["starting"] is True
        running.wait_for_event("worker.exited", timeout=20, worker_pid=hung)
        wait_until(lambda: len(worker_pids(running)) == 3, 30, "a working replacement")
        assert hung not in worker_pids(running)  # it never got as far as "started"
        (tmp_path / "ok.txt").write_text("served\n")
        sftp_batch(running, alpha_key, "alpha", f"put {tmp_path / 'ok.txt'}\n", check=True)
    finally:
        assert running.stop() == 0


def test_workers_that_cannot_start_stop_the_server_with_one_line(tmp_path: Path) -> None:
    """Replacements that fail to start three times in a row are the install or the machine,
    not a session: the server stops with a one-line reason and a non-zero exit instead of
    admitting connections that no worker would take."""
    running = start_server(tmp_path / "srv", {"server": {"workers": 2}})
    try:
        running.host_key_dir.rename(tmp_path / "srv" / "keys.moved")  # loaded at each start
        os.kill(min(worker_pids(running)), signal.SIGKILL)
        assert running.process is not None
        code = running.process.wait(60)
        running.process = None
    finally:
        running.stop()
    assert code == 1
    lines = (tmp_path / "srv" / "server.stderr").read_text().strip().splitlines()
    assert lines[-1].startswith("ingestctl: server workers failed to start 3 times in a row")
    # Each failed start said why, in one line (no traceback), there and in the server log.
    assert not any(line.startswith("Traceback") for line in lines)
    failed = running.events("worker.failed")
    assert len(failed) == 3 and all("no host keys in" in e["error"] for e in failed)
    exits = running.events("worker.exited")
    assert [e["restarting"] for e in exits][-1] is False
    running.wait_for_event("server.stopped")
    assert all(not p.exists() for p in (Path(f"/proc/{pid}") for pid in worker_pids(running)))
