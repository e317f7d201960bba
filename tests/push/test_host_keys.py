"""The agent and the operator agree on fingerprints: against our own server, which has two host
keys (Ed25519 and RSA), the agent is offered the Ed25519 key that ``ingestctl hostkey show``
lists first, a confirmed fingerprint of either key works, and only a fingerprint of neither is
refused as a new fingerprint. ``connection test`` prints each key's type beside it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable

import asyncssh
import pytest
from server_harness import RunningServer

from push_agent import runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import MESSAGES, Category

from .test_failures_sshd import test_connection

pytestmark = pytest.mark.slow

Cli = Callable[..., subprocess.CompletedProcess[str]]


def operator_keys(server: RunningServer) -> list[tuple[str, str]]:
    """(type, fingerprint) in the order ``ingestctl hostkey show`` hands them to a client."""
    shown = json.loads(server.ingestctl("hostkey", "show", "--json").stdout)
    return [(k["algorithm"], k["fingerprint"]) for k in shown]


@pytest.fixture
def keys(ingest_server: RunningServer) -> dict[str, str]:
    """The server's fingerprints by type; the operator's listing starts with Ed25519."""
    listed = operator_keys(ingest_server)
    assert [t for t, _ in listed] == ["ssh-ed25519", "ssh-rsa"]
    return dict(listed)


def neither_fingerprint() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").get_fingerprint("sha256")


def same_server_note(rsa: str, ed25519: str) -> str:
    return (
        f"the server has more than one host key: you confirmed its RSA key {rsa}, this "
        f"connection was first offered its Ed25519 key {ed25519}. That is not a changed key: "
        f"asked for its RSA key, the same server proved it holds the key you confirmed, so "
        f"{rsa} is pinned and every transfer checks it."
    )


def test_host_key_preference_is_openssh_order() -> None:
    from push_agent.transfer import HOST_KEY_ALGORITHMS, host_key_algorithms

    assert host_key_algorithms()[:1] == ["ssh-ed25519"]
    assert host_key_algorithms()[-3:] == ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    # Asking for "any key but the RSA one" drops all three RSA signature algorithms.
    assert host_key_algorithms({"ssh-rsa"}) == [
        a for a in host_key_algorithms() if a not in ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")
    ]
    assert not any("cert" in a for a in HOST_KEY_ALGORITHMS)


def test_agent_is_offered_the_ed25519_key_the_operator_lists_first(
    agent: Agent, alpha: Callable[..., Connection], keys: dict[str, str]
) -> None:
    alpha()
    first = test_connection(agent, "alpha")
    assert first.ok, first.failure
    assert first.fingerprint == keys["ssh-ed25519"]  # not the RSA key
    assert first.key_type == "ssh-ed25519"
    assert first.host_key == f"ssh-ed25519 {keys['ssh-ed25519']}"
    assert first.needs_confirmation and first.other_host_keys == []


def test_confirming_the_ed25519_fingerprint_pins_it_and_transfers(
    agent: Agent,
    ingest_server: RunningServer,
    alpha: Callable[..., Connection],
    keys: dict[str, str],
) -> None:
    alpha()
    ed25519 = keys["ssh-ed25519"]
    # The client was handed the first line of `ingestctl hostkey show` and confirms it at once.
    confirmed = test_connection(agent, "alpha", accept=ed25519)
    assert confirmed.ok and confirmed.pinned, confirmed.failure
    assert confirmed.host_key == f"ssh-ed25519 {ed25519}"
    assert confirmed.note is None and confirmed.other_host_keys == []
    row = agent.state.get("alpha")
    assert row is not None and row["pinned_fingerprint"] == ed25519
    run = asyncio.run(runs.run_connection(agent, "alpha"))
    assert run.ok, run.failure
    assert run.host_key == f"ssh-ed25519 {ed25519}"
    assert (ingest_server.folder("alpha") / "sis_hr_user_info.txt").exists()


def test_confirming_the_rsa_fingerprint_works_too(
    agent: Agent, alpha: Callable[..., Connection], keys: dict[str, str]
) -> None:
    alpha()
    rsa, ed25519 = keys["ssh-rsa"], keys["ssh-ed25519"]
    confirmed = test_connection(agent, "alpha", accept=rsa)
    assert confirmed.ok and confirmed.pinned, confirmed.failure
    # The session went on over the RSA key: the server signed its key exchange with it.
    assert confirmed.fingerprint == rsa
    assert confirmed.host_key == f"ssh-rsa {rsa}"
    assert confirmed.other_host_keys == [f"ssh-ed25519 {ed25519}"]
    assert confirmed.note == same_server_note(rsa, ed25519)
    row = agent.state.get("alpha")
    assert row is not None
    assert row["pinned_fingerprint"] == rsa and row["seen_fingerprint"] == rsa
    # Pinned to the RSA key, runs and re-tests keep working, and nothing reads as a change.
    run = asyncio.run(runs.run_connection(agent, "alpha"))
    assert run.ok, run.failure
    assert run.host_key == f"ssh-rsa {rsa}"
    again = test_connection(agent, "alpha")
    assert again.ok and again.pinned and again.note == same_server_note(rsa, ed25519)
    assert runs.status(agent)[0]["blocked"] is None


def test_fingerprint_of_neither_key_is_refused_as_new(
    agent: Agent,
    ingest_server: RunningServer,
    alpha: Callable[..., Connection],
    keys: dict[str, str],
) -> None:
    alpha()
    rsa, ed25519 = keys["ssh-rsa"], keys["ssh-ed25519"]
    stranger = neither_fingerprint()
    cause = (
        f"127.0.0.1:{ingest_server.port} presented the host key ssh-ed25519 {ed25519}, but the "
        f"confirmed fingerprint is {stranger}, which is none of the server's host keys "
        f"(it also offered ssh-rsa {rsa})"
    )
    refused = test_connection(agent, "alpha", accept=stranger)
    assert not refused.ok and not refused.pinned
    assert refused.failure is not None
    assert refused.failure.category is Category.NEW_FINGERPRINT
    assert refused.failure.message == MESSAGES[Category.NEW_FINGERPRINT]
    assert refused.failure.message == "New fingerprint detected."
    assert refused.failure.cause == cause
    row = agent.state.get("alpha")
    assert row is not None and row["pinned_fingerprint"] is None
    assert row["seen_fingerprint"] == ed25519

    # A pin of neither key (the server's keys were replaced) blocks transfers the same way.
    agent.state.update("alpha", pinned_fingerprint=stranger, test_passed_at=agent.now())
    landed = ingest_server.folder("alpha") / "sis_hr_user_info.txt"
    landed.unlink(missing_ok=True)  # the server is shared by this module's tests
    blocked = asyncio.run(runs.run_connection(agent, "alpha"))
    assert not blocked.ok and blocked.failure is not None
    assert blocked.failure.category is Category.NEW_FINGERPRINT
    assert blocked.failure.cause == cause
    assert not landed.exists()
    entry = runs.status(agent)[0]
    assert entry["blocked"] == (
        f"the server now presents {ed25519}: confirm it with "
        f"'ingest-push connection test alpha --accept {ed25519}'"
    )


def test_connection_test_prints_the_key_type_beside_the_fingerprint(
    push_cli: Cli,
    ingest_server: RunningServer,
    alpha: Callable[..., Connection],
    keys: dict[str, str],
) -> None:
    alpha()
    rsa, ed25519 = keys["ssh-rsa"], keys["ssh-ed25519"]
    first = push_cli("connection", "test", "alpha")
    assert first.returncode == 0, first.stderr
    assert first.stdout == (
        "test of alpha passed\n"
        f"  fingerprint: ssh-ed25519 {ed25519}\n"
        "  attempts: 1\n"
        f"  fingerprint NOT confirmed (ssh-ed25519 {ed25519}): after checking it, run "
        f"'ingest-push connection test alpha --accept {ed25519}'; transfers wait until then\n"
    )

    as_json = json.loads(push_cli("connection", "test", "alpha", "--json").stdout)
    assert as_json["key_type"] == "ssh-ed25519" and as_json["fingerprint"] == ed25519
    assert as_json["host_key"] == f"ssh-ed25519 {ed25519}"

    with_rsa = push_cli("connection", "test", "alpha", "--accept", rsa)
    assert with_rsa.returncode == 0, with_rsa.stderr
    assert with_rsa.stdout == (
        "test of alpha passed\n"
        f"  fingerprint: ssh-rsa {rsa}\n"
        "  attempts: 1\n"
        f"  fingerprint confirmed: ssh-rsa {rsa}; transfers may start\n"
        f"  note: {same_server_note(rsa, ed25519)}\n"
    )

    with_ed25519 = push_cli("connection", "test", "alpha", "--accept", ed25519)
    assert with_ed25519.returncode == 0, with_ed25519.stderr
    assert with_ed25519.stdout == (
        "test of alpha passed\n"
        f"  fingerprint: ssh-ed25519 {ed25519}\n"
        "  attempts: 1\n"
        f"  fingerprint confirmed: ssh-ed25519 {ed25519}; transfers may start\n"
    )

    stranger = neither_fingerprint()
    refused = push_cli("connection", "test", "alpha", "--accept", stranger)
    assert refused.returncode == 1
    assert refused.stdout == (
        "test of alpha FAILED\n"
        "New fingerprint detected.\n"
        f"Cause: 127.0.0.1:{ingest_server.port} presented the host key ssh-ed25519 {ed25519}, "
        f"but the confirmed fingerprint is {stranger}, which is none of the server's host keys "
        f"(it also offered ssh-rsa {rsa})\n"
    )
