"""Fixtures for the server tests: a real server process per module, real client commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import server_harness
from server_harness import RunningServer


@pytest.fixture(scope="module")
def alpha_key(make_key: Callable[..., Path]) -> Path:
    return make_key("rsa", 4096, "alpha")


@pytest.fixture(scope="module")
def beta_key(make_key: Callable[..., Path]) -> Path:
    return make_key("rsa", 4096, "beta")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, alpha_key: Path, beta_key: Path
) -> Iterator[RunningServer]:
    """A server shared by one test module, with accounts alpha and beta on 127.0.0.1."""
    # The defender is off here: these modules fail logins on purpose from 127.0.0.1. So is the
    # rate of new connections per address: loopback clients run one after another faster than
    # 10 a second (test_ssh_audit.py and test_connection_rate.py test that limit).
    running = server_harness.start_server(
        tmp_path_factory.mktemp("server"),
        {"defender": {"enabled": False}, "limits": {"connection_rate_per_address": 0}},
    )
    server_harness.add_account(running, "alpha", alpha_key)
    server_harness.add_account(running, "beta", beta_key)
    yield running
    running.stop()
