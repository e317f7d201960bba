"""PROXY protocol from a configured load balancer: the IP gate sees the client's address."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from server_harness import RunningServer, add_account, start_server

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def balanced(
    tmp_path_factory: pytest.TempPathFactory, make_key: Callable[..., Path]
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("balanced"),
        {"server": {"proxy_protocol_from": ["127.0.0.1"]}, "defender": {"enabled": False}},
    )
    add_account(running, "alpha", make_key("rsa", 4096, "alpha"), ips=("127.0.0.9",))
    yield running
    running.stop()


def v1(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode()


def v2(client: str | None, port: int) -> bytes:
    if client is None:  # LOCAL: the balancer's own health check
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    body = (
        ipaddress.IPv4Address(client).packed
        + ipaddress.IPv4Address("127.0.0.1").packed
        + struct.pack("!HH", 40000, port)
    )
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def connect(server: RunningServer, header: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(
        (server.host, server.port), timeout=10, source_address=(source, 0)
    )
    sock.sendall(header)
    return sock


def closed_without_banner(sock: socket.socket) -> bool:
    with sock:
        try:
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_address_from_the_header(
    balanced: RunningServer, make_key: Callable[..., Path], version: str
) -> None:
    header = (v1 if version == "v1" else v2)("127.0.0.9", balanced.port)
    sock = connect(balanced, header)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=20)
        key = paramiko.RSAKey.from_private_key_file(str(make_key("rsa", 4096, "alpha")))
        t.auth_publickey("alpha", key)
        sftp = paramiko.SFTPClient.from_transport(t)
        assert sftp is not None
        sftp.listdir(".")
    finally:
        t.close()
    balanced.wait_for_event("auth.success", account="alpha", address="127.0.0.9")


def test_header_with_a_disallowed_client_is_dropped(balanced: RunningServer) -> None:
    assert closed_without_banner(connect(balanced, v2("127.0.0.10", balanced.port)))
    balanced.wait_for_event("connection.refused", address="127.0.0.10")


def test_health_check_is_closed_and_never_gated(balanced: RunningServer) -> None:
    before = len(balanced.events("connection.refused"))
    assert closed_without_banner(connect(balanced, v2(None, balanced.port)))
    assert len(balanced.events("connection.refused")) == before


def test_header_from_anyone_else_is_not_believed(balanced: RunningServer) -> None:
    # 127.0.0.2 is not the balancer: its header is not parsed; its own address is gated.
    assert closed_without_banner(connect(balanced, v1("127.0.0.9", balanced.port), "127.0.0.2"))
    balanced.wait_for_event("connection.refused", address="127.0.0.2")


def test_balancer_without_a_header_is_refused(balanced: RunningServer) -> None:
    assert closed_without_banner(connect(balanced, b"SSH-2.0-OpenSSH_9.2\r\n"))
    event = balanced.wait_for_event("connection.refused", address="127.0.0.1")
    assert "PROXY" in event["reason"]
