"""An account's session limit and quota hold across nodes: two real server processes (own
node ids and ports, one PostgreSQL control DB, one data root) count each other's sessions
and reservations (``account_holdings``), so a client spread over both nodes by a balancer
gets no more than on one node, and another account is not affected."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from server_harness import (
    RunningServer,
    add_account,
    paramiko_sftp,
    sftp_batch,
    start_node,
    wait_until,
)

from ingest_core.db import AccountHolding, open_control_db
from ingest_core.folders import account_folder

pytestmark = pytest.mark.postgres

SESSIONS = 2
QUOTA = 40_000_000
BETA_ADDRESS = "127.0.0.3"


@pytest.fixture
def two_nodes(
    tmp_path: Path, pg_url: str, make_key: Callable[..., Path]
) -> Iterator[tuple[list[RunningServer], Path, Path]]:
    """Nodes a and b, accounts alpha and beta (beta from its own address) on both."""
    shared = tmp_path / "shared"
    nodes: list[RunningServer] = []
    try:
        for name in ("node-a", "node-b"):
            limits = {"max_sessions_per_account": SESSIONS, "account_quota_bytes": QUOTA}
            settings = {"server": {"workers": 2}, "limits": limits}
            nodes.append(start_node(tmp_path, name, pg_url, shared, settings))
        alpha, beta = make_key("rsa", 4096, "alpha"), make_key("rsa", 4096, "beta")
        add_account(nodes[0], "alpha", alpha)
        add_account(nodes[0], "beta", beta, ips=(BETA_ADDRESS,))
        yield nodes, alpha, beta
    finally:
        for node in nodes:
            node.stop()


def _opens(node: RunningServer, key: Path, user: str = "alpha", bind: str | None = None) -> bool:
    try:
        paramiko_sftp(node, key, user, bind=bind).close()
    except paramiko.ChannelException:
        return False
    return True


def test_sessions_per_account_count_on_every_node(two_nodes) -> None:
    (a, b), alpha, beta = two_nodes
    held = [paramiko_sftp(a, alpha), paramiko_sftp(b, alpha)]  # the limit, one on each node
    try:
        for node in (a, b):
            with pytest.raises(paramiko.ChannelException):
                paramiko_sftp(node, alpha)
        refused = sftp_batch(b, alpha, "alpha", "ls\n", extra=("-o", "LogLevel=INFO"))
        assert "too many sessions for this account: at most 2 at once" in refused.stderr
        for node in (a, b):  # another account is not affected
            assert _opens(node, beta, "beta", bind=BETA_ADDRESS)
        held.pop(0).close()  # node a's session ends: node b may take its place
        wait_until(lambda: _opens(b, alpha), 20, "node a's session slot, taken on node b")
    finally:
        for sftp in held:
            sftp.close()


def test_the_quota_counts_uploads_in_flight_on_every_node(two_nodes, tmp_path: Path) -> None:
    """An upload held open on node a has reserved most of the quota: the same account's
    upload on node b is refused before the folder passes the quota; node a's completes."""
    (a, b), alpha, beta = two_nodes
    block = b"h" * 32 * 1024
    blocks = 30_000_000 // len(block)  # 30 MB of the 40 MB quota
    first = paramiko_sftp(a, alpha)
    second = paramiko_sftp(b, alpha)
    try:
        on_a = first.open("on-a.bin", "wb")
        for _ in range(blocks):  # still open: its reservation stands
            on_a.write(block)
        on_a.flush()
        with (
            pytest.raises(OSError, match="account quota exceeded"),
            second.open("on-b.bin", "wb") as on_b,
        ):
            for _ in range(blocks):
                on_b.write(block)
        on_a.close()
        assert first.stat("on-a.bin").st_size == blocks * len(block)
        folder = account_folder(a.settings(), "alpha").root
        stored = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        assert stored <= QUOTA
        # beta's folder has its own quota, on either node
        beta_sftp = paramiko_sftp(b, beta, "beta", bind=BETA_ADDRESS)
        with beta_sftp, beta_sftp.open("beta.bin", "wb") as handle:
            handle.write(b"b" * 1_000_000)
    finally:
        for sftp in (first, second):
            with contextlib.suppress(Exception):
                sftp.close()


def test_a_stopped_node_holds_nothing(two_nodes, pg_url: str) -> None:
    (a, b), alpha, _ = two_nodes
    held = paramiko_sftp(a, alpha)
    db = open_control_db(pg_url)

    def rows() -> list[tuple[str, str, int]]:
        with db.session() as session:
            return [
                (r.account, r.node_id, r.sessions)
                for r in session.query(AccountHolding).order_by(AccountHolding.node_id)
            ]

    try:
        wait_until(lambda: rows() == [("alpha", "node-a", 1)], 20, "node a's row")
    finally:
        held.close()
    wait_until(lambda: rows() == [], 20, "the row gone with the session")
    held = paramiko_sftp(a, alpha)
    wait_until(lambda: rows() == [("alpha", "node-a", 1)], 20, "node a's row again")
    a.stop()  # a graceful stop clears what the node held
    wait_until(lambda: rows() == [], 20, "node a's rows cleared at stop")
    assert _opens(b, alpha) and _opens(b, alpha)
