"""The defender's scores are shared by every node: two real server processes (own node ids
and ports, one PostgreSQL control DB, one data root) add failed logins to one score per
address, so the ban comes after the same number of failures however a balancer spreads them;
a ban is refused on both; unban clears the score on both."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from server_harness import (
    RunningServer,
    add_account,
    dropped_before_banner,
    sftp_batch,
    start_node,
    wait_until,
)

from ingest_core.db import open_control_db
from ingest_server.defender import failure_score, list_bans

pytestmark = pytest.mark.postgres

ATTACKER = "127.0.0.7"


def test_failures_on_two_nodes_add_up_and_unban_clears_both(
    tmp_path: Path, pg_url: str, make_key: Callable[..., Path]
) -> None:
    shared = tmp_path / "shared"
    nodes: list[RunningServer] = []
    try:
        for name in ("node-a", "node-b"):  # the defender exactly as shipped
            nodes.append(start_node(tmp_path, name, pg_url, shared))
        settings = nodes[0].settings()
        db = open_control_db(pg_url)
        defender = settings.defender
        assert defender.score_unknown_user == defender.score_bad_key  # equal weights
        needed = math.ceil(defender.threshold / defender.score_bad_key)  # 5 with 3 and 15
        good = make_key("rsa", 4096, "guard")
        wrong = make_key("rsa", 4096, "alpha")
        add_account(nodes[0], "guard", good, ips=(ATTACKER,))

        def score() -> int:
            return failure_score(db, ATTACKER, defender.window_seconds)

        def banned() -> bool:
            return ATTACKER in [b.address for b in list_bans(settings)]

        for attempt in range(1, needed + 1):
            node = nodes[attempt % 2]  # round robin: b, a, b, a, b
            user = "guard" if attempt % 2 else "nosuchuser"  # a wrong key, an unknown name
            result = sftp_batch(node, wrong, user, "ls\n", bind=ATTACKER)
            assert result.returncode != 0
            assert "Permission denied (publickey)" in result.stderr, (attempt, result.stderr)
            if attempt < needed:
                expected = attempt * defender.score_bad_key
                wait_until(lambda: score() == expected, what=f"score {expected}")  # noqa: B023
                assert not banned()
        wait_until(banned, what="the ban at the threshold")
        assert score() == 0  # the ban wiped the address's failures
        for node in nodes:
            assert dropped_before_banner(node, ATTACKER)
            assert sftp_batch(node, good, "guard", "ls\n", bind=ATTACKER).returncode != 0
        assert any(e["address"] == ATTACKER for e in nodes[1].events("defender.ban"))

        assert "no longer banned" in nodes[0].ingestctl("defender", "unban", ATTACKER).stdout
        for node in nodes:
            assert not dropped_before_banner(node, ATTACKER)
            assert sftp_batch(node, good, "guard", "ls\n", bind=ATTACKER).returncode == 0
        # One more failure starts a fresh score on every node: no old points left anywhere.
        assert sftp_batch(nodes[1], wrong, "guard", "ls\n", bind=ATTACKER).returncode != 0
        wait_until(lambda: score() == defender.score_bad_key, what="one failure's points")
        assert not banned()
        assert not dropped_before_banner(nodes[0], ATTACKER)
    finally:
        for node in nodes:
            assert node.stop() == 0
