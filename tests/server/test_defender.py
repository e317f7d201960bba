"""The brute-force defender: bans after failed logins, drops banned addresses, unban, restart.

Its default weights are equal for an unknown user name and a wrong key, so the number of
failed connections before a ban tells nobody which account names exist.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_harness import (
    RunningServer,
    add_account,
    dropped_before_banner,
    sftp_batch,
    start_server,
)


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, make_key: Callable[..., Path]
) -> Iterator[RunningServer]:
    # Default weights (3 for an unknown user, 3 for a wrong key), a low threshold for speed.
    running = start_server(
        tmp_path_factory.mktemp("defended"),
        {"defender": {"threshold": 6, "window_seconds": 600, "ban_seconds": 600}},
    )
    add_account(running, "guard", make_key("rsa", 4096, "guard"), ips=("127.0.0.4", "127.0.0.5"))
    yield running
    running.stop()


def bans(server: RunningServer) -> list[str]:
    return [b["address"] for b in json.loads(server.ingestctl("defender", "list", "--json").stdout)]


def test_ban_unban_and_ban_survives_restart(
    guarded: RunningServer, make_key: Callable[..., Path]
) -> None:
    good = make_key("rsa", 4096, "guard")
    wrong = make_key("rsa", 4096, "alpha")
    assert not dropped_before_banner(guarded, "127.0.0.4")
    for _ in range(2):  # unknown user: 3 points each, threshold 6
        assert sftp_batch(guarded, wrong, "nosuchuser", "ls\n", bind="127.0.0.4").returncode
    ban = guarded.wait_for_event("defender.ban", address="127.0.0.4")
    assert ban["score"] == 6
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
    for attempt in range(2):  # 3 points per failed connection, threshold 6
        cmd = guarded.sftp_command(wrong1, "guard", bind="127.0.0.5")
        result = sftp_batch(
            guarded, wrong1, "guard", "ls\n", bind="127.0.0.5", extra=("-i", str(wrong2))
        )
        assert result.returncode != 0, cmd
        if attempt < 1:
            assert "127.0.0.5" not in bans(guarded)
    guarded.wait_for_event("defender.ban", address="127.0.0.5", score=6)
    failures = [e for e in guarded.events("auth.failure") if e["address"] == "127.0.0.5"]
    assert len({e["fingerprint"] for e in failures}) == 2  # both keys were tried
    guarded.ingestctl("defender", "unban", "127.0.0.5")


@pytest.fixture(scope="module")
def default_defender(
    tmp_path_factory: pytest.TempPathFactory, make_key: Callable[..., Path]
) -> Iterator[RunningServer]:
    """The defender exactly as shipped; three accounts, each on its own address."""
    running = start_server(tmp_path_factory.mktemp("default-defender"))
    add_account(running, "south", make_key("rsa", 4096, "guard"), ips=("127.0.0.3",))
    add_account(running, "east", make_key("rsa", 4096, "east"), ips=("127.0.0.6",))
    add_account(running, "west", None, ips=("127.0.0.2",))
    yield running
    running.stop()


def test_unknown_user_and_wrong_key_banned_after_the_same_number_of_connections(
    default_defender: RunningServer, make_key: Callable[..., Path]
) -> None:
    server = default_defender
    settings = server.settings().defender
    assert settings.score_unknown_user == settings.score_bad_key  # the shipped defaults
    needed = math.ceil(settings.threshold / settings.score_bad_key)  # 5 with 3 and 15
    wrong = make_key("rsa", 4096, "alpha")  # registered to nobody here
    tries = {
        "127.0.0.2": "nosuchuser",  # an allowed address (west's) guessing a name
        "127.0.0.3": "south",  # an allowed address trying a known account with a wrong key
    }
    for attempt in range(needed):
        for source, user in tries.items():
            result = sftp_batch(server, wrong, user, "ls\n", bind=source)
            # Each one got as far as authentication: no ban came earlier for either, and
            # the client's answer is the same whether the name exists or not.
            assert result.returncode != 0
            assert "Permission denied (publickey)" in result.stderr, (attempt, result.stderr)
    for source in tries:
        ban = server.wait_for_event("defender.ban", address=source)
        # The score says after how many failed connections: the same for both.
        assert ban["score"] == needed * settings.score_bad_key
        assert dropped_before_banner(server, source)
    assert sorted(bans(server)) == sorted(tries)
    # Another account on another address is not touched.
    east = make_key("rsa", 4096, "east")
    assert sftp_batch(server, east, "east", "ls\n", bind="127.0.0.6").returncode == 0
