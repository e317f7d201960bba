"""Test and Save against a real OpenSSH sshd: success, pinning, and each classified failure
produced for real (bad password, wrong key, closed port, unresolvable and silent hosts, a
changed host key, a missing and a read-only remote directory)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from push_agent import connections, runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import MESSAGES, Category

from .conftest import SshdLab, SshdServer, free_port


def test_connection(agent: Agent, name: str, **kw: object) -> runs.Outcome:
    return asyncio.run(runs.test_connection(agent, name, **kw))  # type: ignore[arg-type]


test_connection.__test__ = False  # type: ignore[attr-defined]


def assert_failure(outcome: runs.Outcome, category: Category, *cause_words: str) -> None:
    assert not outcome.ok
    assert outcome.failure is not None, outcome
    assert outcome.failure.category is category, outcome.failure
    assert outcome.failure.message == MESSAGES[category]
    for word in cause_words:
        assert word in outcome.failure.cause, outcome.failure.cause


def test_password_test_passes_probes_and_pins_on_accept(
    agent: Agent,
    sshd: SshdServer,
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
    upload_dir: Path,
) -> None:
    connections.add(agent, sshd_connection(), sshd_lab.password)
    first = test_connection(agent, "sis")
    assert first.ok and first.fingerprint == sshd.fingerprint()
    assert first.needs_confirmation and not first.pinned
    assert list(upload_dir.iterdir()) == []  # the probe file was removed
    # Not confirmed yet: a transfer is refused as an unconfirmed fingerprint.
    blocked = asyncio.run(runs.run_connection(agent, "sis"))
    assert_failure(blocked, Category.NEW_FINGERPRINT, "not been confirmed", sshd.fingerprint())
    confirmed = test_connection(agent, "sis", accept=sshd.fingerprint())
    assert confirmed.ok and confirmed.pinned
    assert agent.state.get("sis")["pinned_fingerprint"] == sshd.fingerprint()  # type: ignore[index]


def test_wrong_password_is_authentication_failed(
    agent: Agent, sshd_connection: Callable[..., Connection]
) -> None:
    connections.add(agent, sshd_connection(), "not-the-password")
    assert_failure(test_connection(agent, "sis"), Category.AUTHENTICATION, "rejected")


def test_wrong_key_is_authentication_failed(
    agent: Agent, sshd_connection: Callable[..., Connection], make_key: Callable[..., Path]
) -> None:
    # A real key that is not in the server's authorized_keys.
    connections.add(agent, sshd_connection(auth="key"))
    stranger = make_key("ed25519", 0, "stranger")
    target = connections.key_path(agent, "sis")
    target.write_bytes(stranger.read_bytes())
    target.chmod(0o600)
    Path(f"{target}.pub").write_bytes(Path(f"{stranger}.pub").read_bytes())
    assert_failure(test_connection(agent, "sis"), Category.AUTHENTICATION, "rejected")


def test_closed_port_is_port_refused(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    port = free_port()
    connections.add(agent, sshd_connection(port=port), sshd_lab.password)
    assert_failure(test_connection(agent, "sis"), Category.PORT_REFUSED, f"127.0.0.1:{port}")


def test_invalid_name_is_host_unreachable_without_dns(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    connections.add(agent, sshd_connection(host="sftp.example.invalid"), sshd_lab.password)
    assert_failure(test_connection(agent, "sis"), Category.UNREACHABLE, "does not resolve")


def test_silent_socket_is_host_unreachable(
    make_agent: Callable[..., Agent],
    sshd_lab: SshdLab,
    sshd_connection: Callable[..., Connection],
) -> None:
    agent = make_agent(connect_timeout=1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts into the backlog, never answers
        port = silent.getsockname()[1]
        connections.add(agent, sshd_connection(port=port), sshd_lab.password)
        outcome = test_connection(agent, "sis")
    assert_failure(outcome, Category.UNREACHABLE, "sent no SSH greeting")


def test_missing_directory_is_transfer_failed(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    connections.add(agent, sshd_connection(remote_dir="/missing"), sshd_lab.password)
    assert_failure(test_connection(agent, "sis"), Category.TRANSFER, "/missing does not exist")


def test_read_only_directory_is_transfer_failed(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    connections.add(agent, sshd_connection(remote_dir="/readonly"), sshd_lab.password)
    outcome = test_connection(agent, "sis")
    assert_failure(outcome, Category.TRANSFER, "no permission to write", "/readonly")
    assert list((sshd_lab.chroot / "readonly").iterdir()) == []
    # A failing test never counts as a passing one.
    assert agent.state.get("sis")["test_passed_at"] is None  # type: ignore[index]


def test_changed_host_key_is_new_fingerprint_and_blocks_until_confirmed(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection]
) -> None:
    server = sshd_lab.server("host_a")
    old = server.fingerprint()
    connections.add(agent, sshd_connection(port=server.port), sshd_lab.password)
    assert test_connection(agent, "sis", accept=old).pinned
    assert asyncio.run(runs.run_connection(agent, "sis")).ok

    server.restart("host_b")
    new = server.fingerprint()
    assert new != old
    failed = asyncio.run(runs.run_connection(agent, "sis"))
    assert_failure(failed, Category.NEW_FINGERPRINT, new, old)
    # Plain re-tests keep failing; status names the new fingerprint and the block.
    assert_failure(test_connection(agent, "sis"), Category.NEW_FINGERPRINT, new)
    entry = runs.status(agent)[0]
    assert entry["verified_fingerprint"] == old and entry["seen_fingerprint"] == new
    assert entry["blocked"] and new in entry["blocked"]
    assert not asyncio.run(runs.run_connection(agent, "sis")).ok
    # The operator confirms the new key: transfers resume.
    assert test_connection(agent, "sis", accept=new).pinned
    assert asyncio.run(runs.run_connection(agent, "sis")).ok
    assert runs.status(agent)[0]["blocked"] is None


@pytest.mark.parametrize("verify", [False])
def test_without_verification_any_host_key_is_accepted(
    agent: Agent, sshd_lab: SshdLab, sshd_connection: Callable[..., Connection], verify: bool
) -> None:
    server = sshd_lab.server("host_a")
    connections.add(
        agent, sshd_connection(port=server.port, verify_fingerprint=verify), sshd_lab.password
    )
    assert test_connection(agent, "sis").ok
    server.restart("host_b")
    assert asyncio.run(runs.run_connection(agent, "sis")).ok
