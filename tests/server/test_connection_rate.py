"""limits.connection_rate_per_address: the token bucket per address (with a fake clock),
then a real server with two workers refusing a flood before the banner."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from server_harness import RunningServer, add_account, sftp_batch, start_server

from ingest_server.connection_rate import ConnectionRate

BURST = 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_per_address() -> None:
    clock = FakeClock()
    rate = ConnectionRate(10.0, 10, clock=clock)
    assert all(rate.allow("127.0.0.2") for _ in range(10))
    assert not rate.allow("127.0.0.2")
    assert rate.allow("127.0.0.3")  # another address has its own bucket
    clock.now += 0.1  # one new connection per 0.1 s
    assert rate.allow("127.0.0.2")
    assert not rate.allow("127.0.0.2")
    clock.now += 0.35
    assert [rate.allow("127.0.0.2") for _ in range(4)] == [True, True, True, False]


def test_refused_attempts_do_not_buy_time() -> None:
    clock = FakeClock()
    rate = ConnectionRate(2.0, 1, clock=clock)
    assert rate.allow("a")
    for _ in range(4):  # hammering while empty neither helps nor delays the next token
        clock.now += 0.1
        assert not rate.allow("a")
    clock.now += 0.1001  # 0.5 s after the first: one token again
    assert rate.allow("a")


def test_over_a_long_run_the_rate_holds() -> None:
    clock = FakeClock()
    rate = ConnectionRate(10.0, 10, clock=clock)
    allowed = 0
    for _ in range(1000):  # 1000 attempts in 10 s (100 a second)
        allowed += rate.allow("a")
        clock.now += 0.01
    assert allowed <= 10 + 10 * 10 + 1


def test_zero_turns_it_off() -> None:
    rate = ConnectionRate(0.0, 0)
    assert all(rate.allow("a") for _ in range(1000))
    assert len(rate) == 0


def test_idle_buckets_are_dropped_and_memory_is_capped() -> None:
    clock = FakeClock()
    rate = ConnectionRate(10.0, 10, clock=clock, max_addresses=100)
    for n in range(50):
        rate.allow(f"10.0.0.{n}")
    assert len(rate) == 50
    clock.now += 1.0  # a full refill time: those buckets are full, i.e. gone
    rate.allow("10.0.1.1")
    assert len(rate) == 1
    for n in range(1000):  # a flood from many addresses within one refill time
        rate.allow(f"10.1.{n // 256}.{n % 256}")
    assert len(rate) == 100


# -- against a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_rate(
    tmp_path_factory: pytest.TempPathFactory, make_key: Callable[..., Path]
) -> Iterator[RunningServer]:
    """Two workers; 3 new connections per address, then one per 100 s (none in this test)."""
    running = start_server(
        tmp_path_factory.mktemp("rate"),
        {
            "server": {"workers": 2},
            "limits": {"connection_rate_per_address": 0.01, "connection_burst": BURST},
            "defender": {"enabled": False},
        },
    )
    add_account(running, "flood", None, ips=("127.0.0.7",))
    add_account(running, "calm", make_key("rsa", 4096, "calm"), ips=("127.0.0.8",))
    yield running
    running.stop()


def got_banner(server: RunningServer, source: str) -> bool:
    """Connect from ``source``: True if the SSH banner came, False if dropped before it."""
    with socket.create_connection(
        (server.host, server.port), timeout=10, source_address=(source, 0)
    ) as sock:
        try:
            return sock.recv(64).startswith(b"SSH-")
        except ConnectionResetError:
            return False


def test_a_flood_from_one_address_is_refused_before_the_banner(
    slow_rate: RunningServer, make_key: Callable[..., Path]
) -> None:
    answered = [got_banner(slow_rate, "127.0.0.7") for _ in range(BURST + 5)]
    # Counted in the listener, so across both workers: the burst, then nothing.
    assert answered == [True] * BURST + [False] * 5
    refused = slow_rate.wait_for_event("connection.refused", address="127.0.0.7")
    assert refused["reason"] == (
        "too many new connections from this address (at most 0.01 a second)"
    )
    # Another account on another address logs in as usual.
    calm = make_key("rsa", 4096, "calm")
    assert sftp_batch(slow_rate, calm, "calm", "ls\n", bind="127.0.0.8").returncode == 0
