"""The push agent against our own ingest server: key auth with the agent's generated key, the
IP gate, the read-only result log, and a real upload landing in the account folder (the
server and the 'alpha' connection are fixtures of conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from server_harness import RunningServer

from push_agent import connections, runs
from push_agent.agent import Agent
from push_agent.connections import Connection
from push_agent.failures import Category

from .test_failures_sshd import assert_failure, test_connection

pytestmark = pytest.mark.slow


def test_key_auth_test_and_upload_into_the_account_folder(
    agent: Agent, ingest_server: RunningServer, alpha: Callable[..., Connection]
) -> None:
    alpha()
    outcome = test_connection(agent, "alpha")
    assert outcome.ok, outcome.failure
    fingerprint = outcome.fingerprint
    assert test_connection(agent, "alpha", accept=fingerprint).pinned
    run = asyncio.run(runs.run_connection(agent, "alpha"))
    assert run.ok, run.failure
    folder = ingest_server.folder("alpha")
    assert (folder / "sis_hr_user_info.txt").read_bytes() == b"uuuid\tfirst_name\r\nU1\tAda\r\n"
    # Neither the probe nor the upload's temporary name is left behind.
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".push")]
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_disallowed_address_is_host_unreachable(
    agent: Agent, alpha: Callable[..., Connection]
) -> None:
    # The server drops a client from an address not on the account's list before its SSH
    # greeting: from the sender's side that is a firewall, which hosted services file under
    # "host can't be reached ... add the IPs to your IP Whitelist".
    alpha(bind_address="127.0.0.2")
    outcome = test_connection(agent, "alpha")
    assert_failure(outcome, Category.UNREACHABLE, "before the SSH greeting", "IP address")


def test_read_only_log_can_be_fetched_but_not_replaced(
    agent: Agent, ingest_server: RunningServer, alpha: Callable[..., Connection], tmp_path: Path
) -> None:
    log = ingest_server.folder("alpha") / "sis_loader.log"
    log.write_bytes(b"2026-11-23 03:00 LOADED 1 rows\n")
    local = tmp_path / "fetched" / "sis_loader.log"
    alpha(pool_remote="sis_loader.log", pool_local=str(local))
    assert test_connection(agent, "alpha").ok
    fingerprint = agent.state.get("alpha")["seen_fingerprint"]  # type: ignore[index]
    assert test_connection(agent, "alpha", accept=fingerprint).pinned
    run = asyncio.run(runs.run_connection(agent, "alpha"))
    assert run.ok, run.failure
    assert local.read_bytes() == log.read_bytes()
    # Sending a file under the log's name is refused by the server: a classified failure.
    alpha(remote_name="sis_loader.log", pool_remote=None, pool_local=None)
    assert test_connection(agent, "alpha", accept=fingerprint).ok
    refused = asyncio.run(runs.run_connection(agent, "alpha"))
    assert_failure(refused, Category.TRANSFER, "sis_loader.log")
    assert log.read_bytes() == b"2026-11-23 03:00 LOADED 1 rows\n"


def test_key_not_registered_is_authentication_failed(
    agent: Agent, ingest_server: RunningServer, alpha: Callable[..., Connection]
) -> None:
    alpha()
    connections.generate_key(agent, "alpha", regenerate=True)  # the server has the old key
    assert_failure(test_connection(agent, "alpha"), Category.AUTHENTICATION, "rejected")
