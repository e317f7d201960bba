"""Allowed addresses: at most four single addresses per account, no ranges, no host names."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from ingest_core.policy import normalize_peer_address, parse_address

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def account(ingestctl: Run) -> str:
    ingestctl("account", "create", "uni_a", check=True)
    return "uni_a"


def ips(ingestctl: Run, name: str) -> list[str]:
    return json.loads(ingestctl("ip", "list", name, "--json", check=True).stdout)


def test_four_addresses_then_the_fifth_is_refused(ingestctl: Run, account: str) -> None:
    for address in ("203.0.113.7", "198.51.100.20", "2001:db8::7", "192.0.2.1/32"):
        result = ingestctl("ip", "add", account, address)
        assert result.returncode == 0, result.stderr
    assert ips(ingestctl, account) == ["203.0.113.7", "198.51.100.20", "2001:db8::7", "192.0.2.1"]
    audit_before = ingestctl("audit", "--json").stdout
    fifth = ingestctl("ip", "add", account, "203.0.113.8")
    assert fifth.returncode == 1
    assert "already has 4 addresses, the most allowed is 4" in fifth.stderr
    assert ips(ingestctl, account) == ["203.0.113.7", "198.51.100.20", "2001:db8::7", "192.0.2.1"]
    assert ingestctl("audit", "--json").stdout == audit_before
    ingestctl("ip", "remove", account, "198.51.100.20", check=True)
    ingestctl("ip", "add", account, "203.0.113.8", check=True)
    assert "203.0.113.8" in ips(ingestctl, account)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("203.0.113.0/24", "is a range (CIDR)"),
        ("2001:db8::/64", "is a range (CIDR)"),
        ("203.0.113.*", "is a range"),
        ("203.0.113.1-203.0.113.9", "is a range"),
        ("sftp.example.edu", "host names are not accepted"),
        ("my-host", "host names are not accepted"),
        ("999.1.1.1", "is not an IP address"),
        ("0.0.0.0", "is not a single host address"),
        ("fe80::1%eth0", "zone index"),
    ],
)
def test_ranges_names_and_junk_are_refused(
    ingestctl: Run, account: str, address: str, expected: str
) -> None:
    result = ingestctl("ip", "add", account, address)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "accepted: one single IPv4 or IPv6 address" in result.stderr
    assert ips(ingestctl, account) == []


def test_duplicates_are_refused_in_any_spelling(ingestctl: Run, account: str) -> None:
    ingestctl("ip", "add", account, "2001:db8:0:0::7", check=True)
    again = ingestctl("ip", "add", account, "2001:DB8::7")
    assert again.returncode == 1 and "already allowed" in again.stderr
    assert ips(ingestctl, account) == ["2001:db8::7"]


@pytest.mark.parametrize(
    ("address", "warning"),
    [
        ("127.0.0.1", "a loopback address: fine for a local trial"),
        ("10.1.2.3", "a private address (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16"),
        ("169.254.1.1", "a link-local address"),
        ("203.0.113.9", "a documentation address (a range for examples"),
        ("2001:db8::9", "a documentation address"),
        ("100.64.1.1", "a carrier-grade NAT address"),
        ("9.9.9.9", None),  # stored only: no test sends traffic beyond loopback
    ],
)
def test_addresses_that_are_not_public_are_accepted_with_a_warning_naming_their_range(
    ingestctl: Run, account: str, address: str, warning: str | None
) -> None:
    result = ingestctl("ip", "add", account, address)
    assert result.returncode == 0
    if warning:
        assert f"warning: {address} is {warning}" in result.stderr
        assert "the integration requires each client's static public addresses" in result.stderr
        assert "seed" not in result.stderr
    else:
        assert "warning" not in result.stderr


def test_ipv4_mapped_ipv6_is_stored_and_matched_as_ipv4() -> None:
    assert parse_address("::ffff:203.0.113.7").address == "203.0.113.7"
    assert normalize_peer_address("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_peer_address("::1") == "::1"


def test_remove_unknown_address(ingestctl: Run, account: str) -> None:
    result = ingestctl("ip", "remove", account, "203.0.113.7")
    assert result.returncode == 1 and "is not allowed for 'uni_a'" in result.stderr
