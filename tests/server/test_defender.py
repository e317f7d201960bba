"""The brute-force defender: bans after failed logins, drops banned addresses, unban, restart."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_harness import RunningServer, add_account, sftp_batch, start_server


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, make_key: Callable[..., Path]
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("defended"),
        {
            "defender": {
                "score_unknown_user": 5,
                "score_bad_key": 2,
                "threshold": 6,
                "window_seconds": 600,
                "ban_seconds": 600,
            }
        },
    )
    add_account(running, "guard", make_key("rsa", 4096, "guard"), ips=("127.0.0.4", "127.0.0.5"))
    yield running
    running.stop()


def dropped_before_banner(server: RunningServer, source: str) -> bool:
    with socket.create_connection(
        (server.host, server.port), timeout=10, source_address=(source, 0)
    ) as sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def bans(server: RunningServer) -> list[str]:
    return [b["address"] for b in json.loads(server.ingestctl("defender", "list", "--json").stdout)]


def test_ban_unban_and_ban_survives_restart(
    guarded: RunningServer, make_key: Callable[..., Path]
) -> None:
    good = make_key("rsa", 4096, "guard")
    wrong = make_key("rsa", 4096, "alpha")
    assert not dropped_before_banner(guarded, "127.0.0.4")
    for _ in range(2):  # unknown user: 5 points each, threshold 6
        assert sftp_batch(guarded, wrong, "nosuchuser", "ls\n", bind="127.0.0.4").returncode
    ban = guarded.wait_for_event("defender.ban", address="127.0.0.4")
    assert ban["score"] == 10
    assert dropped_before_banner(guarded, "127.0.0.4")
    assert sftp_batch(guarded, good, "guard", "ls\n", bind="127.0.0.4").returncode != 0
    assert "127.0.0.4" in bans(guarded)
    assert "127.0.0.4" in guarded.ingestctl("defender", "list").stdout
    refused = guarded.events("connection.refused")
    assert refused[-1]["reason"] == "banned by the defender"

    guarded.restart()
    assert dropped_before_banner(guarded, "127.0.0.4")

    out = guarded.ingestctl("defender", "unban", "127.0.0.4").stdout
    assert "no longer banned" in out
    assert bans(guarded) == []
    assert sftp_batch(guarded, good, "guard", "ls\n", bind="127.0.0.4").returncode == 0
    again = guarded.ingestctl("defender", "unban", "127.0.0.4", check=False)
    assert again.returncode == 1 and "not banned" in again.stderr


def test_several_keys_in_one_connection_count_once(
    guarded: RunningServer, make_key: Callable[..., Path]
) -> None:
    wrong1 = make_key("rsa", 4096, "alpha")
    wrong2 = make_key("rsa", 4096, "beta")
    for attempt in range(3):  # 2 points per failed connection, threshold 6
        cmd = guarded.sftp_command(wrong1, "guard", bind="127.0.0.5")
        result = sftp_batch(
            guarded, wrong1, "guard", "ls\n", bind="127.0.0.5", extra=("-i", str(wrong2))
        )
        assert result.returncode != 0, cmd
        if attempt < 2:
            assert "127.0.0.5" not in bans(guarded)
    guarded.wait_for_event("defender.ban", address="127.0.0.5", score=6)
    failures = [e for e in guarded.events("auth.failure") if e["address"] == "127.0.0.5"]
    assert len({e["fingerprint"] for e in failures}) == 2  # both keys were tried
    guarded.ingestctl("defender", "unban", "127.0.0.5")
