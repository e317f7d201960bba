"""Two nodes behind a real HAProxy running deploy/haproxy.cfg: what a client and an operator
see through the balancer (README "Several nodes")."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import server_harness
from haproxy_harness import (
    BALANCER_ADDRESS,
    SHIPPED_CONFIG,
    banner_or_closed,
    check_config,
    healthz,
    kill_tree,
)
from two_nodes import NOT_ALLOWED, Cluster

from ingest_core.folders import UPLOAD_TEMP_PREFIX, account_folder

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

MIB = 1024 * 1024


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def temp_files_of(cluster: Cluster, node: str, account: str = "alpha") -> list[Path]:
    """The temporary upload files ``node`` is writing (or left) in the account's folder."""
    return [
        path
        for path in shared_folder(cluster, account).iterdir()
        if path.name.startswith(f"{UPLOAD_TEMP_PREFIX}{node}-")
    ]


def shared_folder(cluster: Cluster, account: str = "alpha") -> Path:
    return account_folder(cluster.settings("node1"), account).root


def test_shipped_config_is_valid() -> None:
    result = check_config(SHIPPED_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gate_sees_the_client_address_not_the_balancer(
    cluster: Cluster, alpha_key: Path, tmp_path: Path
) -> None:
    source = tmp_path / "gate.txt"
    source.write_bytes(b"through the balancer\n")
    before = cluster.logins()
    result = server_harness.sftp_batch(
        cluster.front, alpha_key, "alpha", f"put {source} gate.txt\n", bind="127.0.0.1"
    )
    assert result.returncode == 0, result.stderr
    served = cluster.node_that_served(before)
    node = cluster.nodes[served]
    node.wait_for_event("file.received", name="gate.txt", address="127.0.0.1")
    assert (shared_folder(cluster) / "gate.txt").read_bytes() == b"through the balancer\n"
    for each in cluster.nodes.values():  # the balancer's address is never what is judged
        assert not [e for e in each.events() if e.get("address") == BALANCER_ADDRESS]

    # A client on no allowlist is closed before the banner, by the node that got it.
    assert banner_or_closed(BALANCER_ADDRESS, cluster.front.port, NOT_ALLOWED) is None
    server_harness.wait_until(
        lambda: any(
            e.get("address") == NOT_ALLOWED
            for each in cluster.nodes.values()
            for e in each.events("connection.refused")
        ),
        what="a connection.refused line for 127.0.0.2",
    )
    done = subprocess.run(
        ["sftp", "-b", "-", *cluster.front.sftp_command(alpha_key, "alpha", NOT_ALLOWED)[1:]],
        input="ls\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0


def test_connections_per_address_are_capped_across_nodes(cluster: Cluster) -> None:
    source = "127.0.0.3"
    held: list = []
    try:
        results: list = [None] * 25
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i, banner_or_closed(BALANCER_ADDRESS, cluster.front.port, source)
                )
            )
            for i in range(25)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        held = [sock for sock in results if sock is not None]
        # Each node alone would take 10 from one address: 20 in all without the balancer.
        assert len(held) == 10
        # Once the rate window has passed, only the count refuses more while 10 are open.
        # Pacing, not an assertion: HAProxy weighs the previous second into conn_rate(1s), so
        # after two seconds the per-second rule cannot be what refuses the next ones.
        time.sleep(2.2)
        for _ in range(3):
            assert banner_or_closed(BALANCER_ADDRESS, cluster.front.port, source) is None
        current = {name: int(row["scur"]) for name, row in cluster.haproxy.servers().items()}
        assert sum(current.values()) == 10
        assert all(count > 0 for count in current.values()), current  # spread over both
    finally:
        for sock in held:
            sock.close()
    time.sleep(2.2)  # let the per-second window pass: a closed slot is free again
    again = banner_or_closed(BALANCER_ADDRESS, cluster.front.port, source)
    assert again is not None
    again.close()


def test_new_connections_per_address_are_rate_limited(cluster: Cluster) -> None:
    source = "127.0.0.4"
    admitted = 0
    started = time.monotonic()
    for _ in range(25):
        sock = banner_or_closed(BALANCER_ADDRESS, cluster.front.port, source)
        if sock is not None:
            admitted += 1
            sock.close()
    elapsed = time.monotonic() - started
    # At most 10 in any second (refused attempts count too), never all 25.
    assert 10 <= admitted <= 10 * (1 + int(elapsed)), (admitted, elapsed)
    assert admitted < 25


def test_kill_9_mid_upload_and_the_retry_lands_on_the_other_node(
    cluster: Cluster, alpha_key: Path, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    server_harness.write_random(source, 64 * MIB)
    before = cluster.logins()
    sftp = server_harness.paramiko_sftp(cluster.front, alpha_key, bind="127.0.0.1")
    killed = cluster.node_that_served(before)
    opened: list = []
    try:
        with open(source, "rb") as data:
            remote = sftp.open("big.bin", "wb")
            remote.set_pipelined(True)
            remote.write(data.read(16 * MIB))
            remote.flush()
            kill_tree(cluster.nodes[killed].process.pid)  # type: ignore[union-attr]
            # Straight away, before the health check can notice: new sessions (held open, so
            # that leastconn prefers the dead node) are refused there and redispatched.
            before = cluster.logins()
            for _ in range(3):
                fresh = server_harness.paramiko_sftp(cluster.front, alpha_key, bind="127.0.0.1")
                fresh.listdir(".")
                opened.append(fresh)
            server_harness.wait_until(
                lambda: (
                    cluster.logins()[cluster.other(killed)] == before[cluster.other(killed)] + 3
                ),
                what="3 logins on the other node",
            )
            with pytest.raises(Exception):  # noqa: B017 - paramiko's own or OSError
                remote.write(data.read(16 * MIB))
                remote.close()
        sftp.close()
        assert not (shared_folder(cluster) / "big.bin").exists()

        before = cluster.logins()
        retry = server_harness.sftp_batch(
            cluster.front, alpha_key, "alpha", f"put {source} big.bin\n", bind="127.0.0.1"
        )
        assert retry.returncode == 0, retry.stderr
        assert cluster.node_that_served(before) == cluster.other(killed)
        assert sha256(shared_folder(cluster) / "big.bin") == sha256(source)

        # The killed node's partial file is still there; the other node has one in flight.
        leftovers = temp_files_of(cluster, killed)
        assert leftovers, "the killed node left no temporary file"
        flying = server_harness.paramiko_sftp(cluster.front, alpha_key, bind="127.0.0.1")
        opened.append(flying)
        in_flight = flying.open("flying.bin", "wb")
        in_flight.write(b"x" * MIB)
        in_flight.flush()
        assert temp_files_of(cluster, cluster.other(killed))
        cluster.restore(killed)  # its start-up removes its own leftovers, and only those
        assert not any(path.exists() for path in leftovers)
        assert temp_files_of(cluster, cluster.other(killed))
        in_flight.write(b"y" * MIB)
        in_flight.close()
        assert (shared_folder(cluster) / "flying.bin").read_bytes() == b"x" * MIB + b"y" * MIB
    finally:
        for each in [sftp, *opened]:
            each.close()
        cluster.restore(killed)


def test_a_draining_node_gets_no_new_sessions(
    cluster: Cluster, alpha_key: Path, tmp_path: Path
) -> None:
    before = cluster.logins()
    held = server_harness.paramiko_sftp(cluster.front, alpha_key, bind="127.0.0.5")
    draining = cluster.node_that_served(before)
    other = cluster.other(draining)
    node = cluster.nodes[draining]
    part = os.urandom(MIB)
    try:
        upload = held.open("drained.bin", "wb")
        upload.write(part)
        upload.flush()
        assert healthz(*cluster.admin(draining)) == 200
        node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        server_harness.wait_until(
            lambda: healthz(*cluster.admin(draining)) == 503, what="/healthz 503"
        )
        row = cluster.haproxy.wait_for(draining, up=False)
        assert row["check_status"] == "L7STS" and row["check_code"] == "503", row

        before = cluster.logins()
        for _ in range(4):  # new sessions all go to the other node
            session = server_harness.paramiko_sftp(cluster.front, alpha_key, bind="127.0.0.5")
            session.listdir(".")
            session.close()
        server_harness.wait_until(
            lambda: cluster.logins()[other] == before[other] + 4, what="4 logins on the other"
        )
        assert cluster.logins()[draining] == before[draining]

        upload.write(part)  # the session in flight finishes on the draining node
        upload.close()
        held.close()
        assert (shared_folder(cluster) / "drained.bin").read_bytes() == part + part
        assert node.process.wait(60) == 0  # type: ignore[union-attr]
    finally:
        held.close()
        cluster.restore(draining)


def test_activity_is_the_same_from_either_node(
    cluster: Cluster, alpha_key: Path, tmp_path: Path
) -> None:
    """Depends on the activity journal in the control DB (``ingestctl activity`` reading it)."""
    source = tmp_path / "journal.txt"
    source.write_bytes(b"journal\n")
    result = server_harness.sftp_batch(
        cluster.front, alpha_key, "alpha", f"put {source} journal.txt\n", bind="127.0.0.1"
    )
    assert result.returncode == 0, result.stderr
    seen = {}
    for name, node in cluster.nodes.items():
        out = node.ingestctl("activity", "alpha", "--json", "--limit", "0").stdout
        events = json.loads(out)
        seen[name] = [e for e in events if e.get("name") == "journal.txt"]
    assert seen["node1"], "node1's `ingestctl activity` does not show the upload"
    assert seen["node1"] == seen["node2"]


@contextlib.contextmanager
def loader_daemons(cluster: Cluster, at: datetime, *, precheck: bool) -> Iterator[None]:
    """``ingestctl loader daemon`` on both nodes (loads at ``at``, UTC), stopped afterwards."""
    daemons = []
    try:
        for name, node in cluster.nodes.items():
            raw = {**cluster.raw[name]}
            raw["schedule"] = {"timezone": "UTC", "loader_time": f"{at:%H:%M}",
                               "pool_time": f"{at + timedelta(hours=12):%H:%M}"}  # fmt: skip
            raw["loader"] = {"precheck": precheck}
            config = server_harness.write_config(node.workdir / "loader.toml", raw)
            daemons.append(
                subprocess.Popen(
                    [*server_harness.INGESTCTL, "--config", str(config), "loader", "daemon"],
                    cwd=node.workdir,
                    stdout=subprocess.DEVNULL,
                    stderr=open(node.workdir / "loader.stderr", "ab"),  # noqa: SIM115
                    env={**os.environ, "PYTHONPATH": str(server_harness.REPO)},
                )
            )
        yield
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()


def test_each_upload_gets_one_received_line_whichever_node_took_it(
    cluster: Cluster, alpha_key: Path, tmp_path: Path
) -> None:
    """Both nodes run the loader with its pre-check: each arrival, recorded in the journal by
    the node that received it, is checked once (one RECEIVED line), never twice."""
    from sample_files import write_people

    from ingest_core.folder_log import read_lines

    settings = cluster.settings("node1")
    sample = write_people(tmp_path / "sample.txt", 5)
    cluster.nodes["node1"].ingestctl(
        "spec", "approve", "alpha", str(sample), "--as", "staff.txt", "--key", "UUUID"
    )
    folder = account_folder(settings, "alpha")
    before_staff = [line for line in read_lines(folder) if " RECEIVED staff.txt " in line]
    served = []
    with loader_daemons(cluster, _next_minute(margin=3600), precheck=True):
        for number in range(4):
            upload = write_people(tmp_path / f"staff-{number}.txt", 6 + number)
            logins = cluster.logins()
            result = server_harness.sftp_batch(
                cluster.front, alpha_key, "alpha", f"put {upload} staff.txt\n", bind="127.0.0.1"
            )
            assert result.returncode == 0, result.stderr
            served.append(cluster.node_that_served(logins))

            def checked(count: int = len(before_staff) + number + 1) -> bool:
                lines = read_lines(folder)
                return len([ln for ln in lines if " RECEIVED staff.txt " in ln]) >= count

            server_harness.wait_until(checked, timeout=30, what="the RECEIVED line")
        time.sleep(3)  # time for a second (wrong) line from the other node's pre-check
    # (Arrivals of earlier tests, never checked while no loader ran, get their lines too.)
    received = [line for line in read_lines(folder) if " RECEIVED staff.txt " in line]
    assert len(received) == len(before_staff) + 4, received
    assert set(served) == {"node1", "node2"}, served  # leastconn spreads sequential sessions
    # `ingestctl status` reads the last upload from the journal: the same on either node,
    # whichever node took the upload.
    statuses = {}
    for name, node in cluster.nodes.items():
        run = node.ingestctl("status", "alpha", "--json")
        assert run.returncode == 0, run.stderr
        statuses[name] = json.loads(run.stdout)
    (staff,) = [row for row in statuses["node1"] if row["spec"] == "staff.txt"]
    assert staff["last_upload_address"] == "127.0.0.1", staff
    assert statuses["node1"] == statuses["node2"]


def _next_minute(margin: float) -> datetime:
    """The first whole UTC minute at least ``margin`` seconds from now."""
    soon = datetime.now(UTC) + timedelta(seconds=margin)
    return soon.replace(second=0, microsecond=0) + timedelta(minutes=1)


@pytest.mark.slow
def test_both_loaders_at_the_same_minute_load_each_account_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Depends on exactly-once nightly jobs across nodes (a claim per job and night)."""
    from sample_files import write_people

    from ingest_core.folder_log import read_lines
    from ingest_core.registry import Registry

    settings = cluster.settings("node1")
    registry = Registry(settings, actor="test-harness")
    accounts = ["gamma", "delta"]
    for account in accounts:
        registry.create_account(account)
        sample = write_people(tmp_path / f"{account}-sample.txt", 5)
        cluster.nodes["node1"].ingestctl(
            "spec", "approve", account, str(sample), "--as", "people.txt", "--key", "UUUID"
        )
        folder = account_folder(settings, account)
        temp = folder.upload_temp("test")
        write_people(temp, 7)
        temp.rename(folder.root / "people.txt")

    at = _next_minute(margin=10)
    with loader_daemons(cluster, at, precheck=False):

        def both_done() -> bool:
            from ingest_core.structured_log import read_events

            return all(
                any(e.get("event") == "job_done" and e.get("job") == "loader.load"
                    for e in read_events(node.log_dir, "loader"))
                for node in cluster.nodes.values()
            )  # fmt: skip

        wait = (at - datetime.now(UTC)).total_seconds() + 60
        assert datetime.now(UTC) < at, "the loader daemons started after the scheduled minute"
        server_harness.wait_until(both_done, timeout=wait, what="both nightly runs")
    for account in accounts:
        lines = read_lines(account_folder(settings, account))
        loaded = [line for line in lines if " LOADED " in line]
        assert len(loaded) == 1, lines
        assert not [line for line in lines if " NO FILE " in line], lines
