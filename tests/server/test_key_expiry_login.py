"""An expired client key ([keys] max_age_days) is refused at login like any wrong key, while a
fresh key of the same account logs in; the audit log says why, and ``ingestctl status`` shows
the account needs attention. A real server process, paramiko and OpenSSH clients, real keys."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import paramiko
import pytest
import server_harness
from server_harness import RunningServer, add_account, sftp_batch
from sqlalchemy import update

from ingest_core.db import AccountKey, open_control_db, utcnow
from ingest_core.registry import Registry


def _connect(server: RunningServer, key: Path, user: str = "alpha") -> paramiko.Transport:
    transport = paramiko.Transport((server.host, server.port))
    transport.start_client(timeout=20)
    try:
        transport.auth_publickey(user, paramiko.Ed25519Key.from_private_key_file(str(key)))
    except BaseException:
        transport.close()
        raise
    return transport


@pytest.fixture(scope="module")
def keys(make_key: Callable[..., Path]) -> dict[str, Path]:
    return {label: make_key("ed25519", 256, f"expiry-{label}") for label in ("old", "new", "x")}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]
) -> Iterator[RunningServer]:
    running = server_harness.start_server(
        tmp_path_factory.mktemp("server"),
        {
            "defender": {"enabled": False},
            "limits": {"connection_rate_per_address": 0},
            "keys": {"accept_ed25519": True, "max_age_days": 365},
        },
    )
    add_account(running, "alpha", keys["old"])
    Registry(running.settings(), actor="test").add_key(
        "alpha", Path(f"{keys['new']}.pub").read_text(encoding="utf-8")
    )
    control = open_control_db(running.settings().control_db_url)
    with control.session() as session:
        session.execute(
            update(AccountKey)
            .where(AccountKey.comment == "test-expiry-old")
            .values(added_at=utcnow() - timedelta(days=366))
        )
        session.commit()
    yield running
    running.stop()


def test_an_expired_key_is_refused_and_a_fresh_one_logs_in(
    server: RunningServer, keys: dict[str, Path]
) -> None:
    with pytest.raises(paramiko.AuthenticationException) as expired:
        _connect(server, keys["old"])
    with pytest.raises(paramiko.AuthenticationException) as unknown:
        _connect(server, keys["x"])  # a key nobody registered: the same answer
    assert expired.type is unknown.type
    assert str(expired.value) == str(unknown.value)

    event = server.wait_for_event("auth.failure", reason="key expired")
    assert event["account"] == "alpha" and event["fingerprint"].startswith("SHA256:")

    transport = _connect(server, keys["new"])
    try:
        sftp = paramiko.SFTPClient.from_transport(transport)
        assert sftp is not None
        sftp.listdir(".")
    finally:
        transport.close()
    server.wait_for_event("auth.success", account="alpha")


def test_openssh_sees_an_ordinary_authentication_failure(
    server: RunningServer, keys: dict[str, Path]
) -> None:
    refused = sftp_batch(server, keys["old"], "alpha", "ls\n")
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr
    assert "expired" not in refused.stderr
    assert sftp_batch(server, keys["new"], "alpha", "ls\n").returncode == 0


def test_status_says_the_key_expired(server: RunningServer) -> None:
    run = server.ingestctl("status", "--json")
    (row,) = json.loads(run.stdout)
    assert (row["account"], row["state"], row["needs_attention"]) == ("alpha", "key expired", True)
    assert (row["oldest_key_expiry"], row["oldest_key_age_days"]) == ("expired", 366)
    assert server.ingestctl("status", "--check", check=False).returncode == 1
    listed = json.loads(server.ingestctl("key", "list", "alpha", "--json").stdout)
    assert sorted(k["expiry"] for k in listed) == ["expired", "ok"]
