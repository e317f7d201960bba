"""Connection slots cannot leak: every admitted connection is released exactly once.

The failures are made for real against a real server process: a worker at its
file-descriptor limit (the handed-over socket is lost to MSG_CTRUNC), the listener at its
limit when it accepts, and workers killed with -9 while they hold sessions. Afterwards the
address's whole allowance is admitted again, and another account on another address still
logs in and lists (the server-wide total did not leak either).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import RunningServer, add_account, login, sftp_batch, start_server, wait_until

from ingest_server.gate import AdmittedConnections, ConnectionGate

ALLOWANCE = 3  # max_connections_per_address
TOTAL = ALLOWANCE + 1  # max_connections_total: alpha's whole allowance and one beta


def start(workdir: Path, alpha_key: Path, beta_key: Path, workers: int) -> RunningServer:
    running = start_server(
        workdir,
        {
            "server": {"workers": workers},
            "limits": {
                "max_connections_per_address": ALLOWANCE,
                "max_connections_total": TOTAL,
                "connection_rate_per_address": 1000.0,  # the rate limit is not under test
                "connection_burst": 1000,
            },
            "defender": {"enabled": False},  # dropped connections must not ban 127.0.0.1
        },
    )
    add_account(running, "alpha", alpha_key)
    add_account(running, "beta", beta_key, ips=("127.0.0.3",))
    return running


@pytest.fixture
def pooled(tmp_path: Path, alpha_key: Path, beta_key: Path) -> Iterator[RunningServer]:
    running = start(tmp_path / "srv", alpha_key, beta_key, workers=2)
    wait_until(lambda: len(running.events("worker.started")) == 2, 30, "two workers")
    yield running
    running.stop()


def dropped_before_banner(running: RunningServer) -> bool:
    """True if the server closes a new connection without a banner."""
    with socket.create_connection((running.host, running.port), timeout=20) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def live_workers(running: RunningServer) -> set[int]:
    assert running.process is not None
    pid = running.process.pid
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def exhaust_descriptors(pid: int) -> tuple[int, int]:
    """Lower ``pid``'s open-file limit to its lowest free descriptor number, so the next
    descriptor it opens fails with EMFILE; returns the limits to restore."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, old[1]))
    return old


def assert_full_allowance_and_other_account(
    running: RunningServer, alpha_key: Path, beta_key: Path
) -> None:
    """alpha's whole allowance logs in at once; the gate still refuses one more; beta (its
    own address) logs in and lists meanwhile, which needs the last slot of the total."""
    held = []
    try:
        for _ in range(ALLOWANCE):
            held.append(login(running, alpha_key))
        assert dropped_before_banner(running)  # one more than the allowance: still counted
        listed = sftp_batch(running, beta_key, "beta", "ls -la\n", bind="127.0.0.3", check=True)
        assert "sis_loader.log" in listed.stdout or listed.returncode == 0
    finally:
        for transport in held:
            transport.close()


def test_a_worker_out_of_descriptors_gives_every_slot_back(
    pooled: RunningServer, alpha_key: Path, beta_key: Path
) -> None:
    workers = live_workers(pooled)
    assert len(workers) == 2
    restore = {pid: exhaust_descriptors(pid) for pid in workers}
    try:
        # More hand-overs fail than the address's allowance: with one slot lost per failure
        # the address would be locked out for good.
        for _ in range(40):
            if len(pooled.events("connection.handover_failed")) > ALLOWANCE:
                break
            dropped_before_banner(pooled)  # (a socket that got through is served, then closed)
    finally:
        for pid, limits in restore.items():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    failed = pooled.events("connection.handover_failed")
    assert len(failed) > ALLOWANCE
    assert {e["pid"] for e in failed} <= workers
    assert all("too many open files" in e["reason"] for e in failed)
    assert live_workers(pooled) == workers  # no worker died of it
    assert_full_allowance_and_other_account(pooled, alpha_key, beta_key)


def test_workers_killed_holding_sessions_give_their_slots_back(
    pooled: RunningServer, alpha_key: Path, beta_key: Path
) -> None:
    held = [login(pooled, alpha_key) for _ in range(ALLOWANCE)]
    try:
        assert dropped_before_banner(pooled)  # the allowance is taken
        holders = {e["pid"] for e in pooled.events("auth.success")}
        assert holders == live_workers(pooled)  # sessions on both workers
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
        for pid in holders:
            pooled.wait_for_event("worker.exited", timeout=20, worker_pid=pid)
        wait_until(lambda: len(pooled.events("worker.started")) == 4, 60, "two replacements")
    finally:
        for transport in held:
            transport.close()
    assert_full_allowance_and_other_account(pooled, alpha_key, beta_key)


def test_the_listener_out_of_descriptors_serves_the_waiting_client_afterwards(
    tmp_path: Path, alpha_key: Path, beta_key: Path
) -> None:
    """EMFILE at accept: nothing is counted yet; the client waits in the backlog and is
    served once descriptors are free again (single process: listener and sessions)."""
    running = start(tmp_path / "srv", alpha_key, beta_key, workers=1)
    try:
        assert running.process is not None
        limits = exhaust_descriptors(running.process.pid)
        try:
            waiting = socket.create_connection((running.host, running.port), timeout=20)
            running.wait_for_event("accept.failed", timeout=20)
        finally:
            resource.prlimit(running.process.pid, resource.RLIMIT_NOFILE, limits)
        with waiting:
            assert waiting.recv(64).startswith(b"SSH-2.0-")
        assert_full_allowance_and_other_account(running, alpha_key, beta_key)
    finally:
        assert running.stop() == 0


# -- the bookkeeping itself, without a server ----------------------------------------------


class _Anyone:
    """A registry that allows every address and a defender that bans none."""

    def is_allowed_anywhere(self, address: str) -> bool:
        return True

    def is_banned(self, address: str) -> bool:
        return False


def test_each_connection_is_released_once_whoever_reports_it(tmp_path: Path) -> None:
    import asyncio

    from ingest_core.settings import LimitSettings

    limits = LimitSettings(max_connections_per_address=2, max_connections_total=3)
    gate = ConnectionGate(limits, _Anyone(), _Anyone())  # type: ignore[arg-type]
    admitted = AdmittedConnections(gate)

    async def admit(address: str) -> int | None:
        refusal = await gate.admit(address)
        return None if refusal else admitted.hold(address)

    async def scenario() -> None:
        first = await admit("127.0.0.1")
        second = await admit("127.0.0.1")
        assert first and second
        assert await admit("127.0.0.1") is None  # the allowance
        assert admitted.release(first)
        # The worker's report, its death and the session's end all say so: once counts.
        assert not admitted.release(first)
        assert not admitted.release(first)
        assert gate.per_address["127.0.0.1"] == 1 and gate.total == 1
        gate.release("127.0.0.9")  # never admitted: nothing goes below zero
        assert gate.total == 1 and "127.0.0.9" not in gate.per_address
        third = await admit("127.0.0.1")
        assert third is not None and len(admitted) == 2
        for number in (second, third, second, third):
            admitted.release(number)
        assert gate.total == 0 and not gate.per_address and len(admitted) == 0

    asyncio.run(scenario())
