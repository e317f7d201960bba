"""PROXY protocol v1/v2 header, read from a configured load balancer before asyncssh runs.

Only called for sockets whose TCP peer is in ``server.proxy_protocol_from``: a header from
anyone else is never parsed. The header is peeked first to learn its exact length and then
read exactly, so the SSH banner riding in the same packet stays in the socket for asyncssh.
A v2 LOCAL or v1 UNKNOWN header is the balancer itself (health check): it has no client
address and must never be matched against an allowlist.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
V2_MAX_PAYLOAD = 4096


class ProxyHeaderError(Exception):
    pass


async def _peek(sock: socket.socket, size: int) -> bytes:
    """Wait until ``size`` bytes are available and return them, leaving them in the socket."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data: bytes | None = sock.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data is not None:
            if len(data) >= size:
                return data[:size]
            if not data:
                raise ProxyHeaderError("connection closed before the PROXY header was complete")
            await asyncio.sleep(0.005)  # part of it is there: readable would fire at once
            continue
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(sock.fileno())


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _consume(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        got += len(chunk)


async def read_proxy_header(sock: socket.socket, timeout: float) -> str | None:
    """The client address the balancer reports, or None for its own (LOCAL/UNKNOWN)."""
    return await asyncio.wait_for(_read(sock), timeout)


async def _read(sock: socket.socket) -> str | None:
    start = await _peek(sock, 12)
    if start == V2_SIGNATURE:
        head = await _peek(sock, 16)
        version_command, family, length = struct.unpack("!BBH", head[12:16])
        if version_command >> 4 != 2 or length > V2_MAX_PAYLOAD:
            raise ProxyHeaderError("bad PROXY v2 header")
        whole = await _peek(sock, 16 + length)
        _consume(sock, 16 + length)
        command = version_command & 0x0F
        if command == 0:  # LOCAL
            return None
        if command != 1:
            raise ProxyHeaderError("bad PROXY v2 command")
        payload = whole[16:]
        if family >> 4 == 1 and len(payload) >= 12:
            return str(ipaddress.IPv4Address(payload[:4]))
        if family >> 4 == 2 and len(payload) >= 36:
            return str(ipaddress.IPv6Address(payload[:16]))
        return None  # AF_UNSPEC or unix: no usable client address
    if not start.startswith(b"PROXY "):
        raise ProxyHeaderError("no PROXY header from the load balancer")
    line = await _peek_line(sock)
    _consume(sock, len(line))
    fields = line[:-2].decode("ascii", "replace").split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("bad PROXY v1 header")
    try:
        return str(ipaddress.ip_address(fields[2]))
    except ValueError:
        raise ProxyHeaderError("bad PROXY v1 source address") from None


async def _peek_line(sock: socket.socket) -> bytes:
    size = 12
    while True:
        data = await _peek(sock, size)
        end = data.find(b"\r\n")
        if end >= 0:
            return data[: end + 2]
        if size >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header too long")
        size = min(size + 16, V1_MAX)
