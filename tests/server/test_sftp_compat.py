"""A WRITE with bytes after its data (rclone 1.60's pkg/sftp): OpenSSH ignores them, asyncssh
refuses the packet; ``ingest_server.sftp_compat`` drops them before asyncssh parses it.

Three layers: the byte-stream trimmer on its own (any chunking, any packet mix); a bare
asyncssh server with and without the mixin, spoken to in raw SFTP (pins that asyncssh 2.24
still refuses such a packet: when a release accepts it, the compat module can go); and our
server, which must accept it like OpenSSH does.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_harness import RunningServer, temp_files

from ingest_server.sftp_compat import (
    MAX_TRIMMED_PACKET,
    WriteTrailerTolerance,
    WriteTrailerTrimmer,
    needs_trimming,
)

FX_OK, FX_BAD_MESSAGE = 0, 5


def string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def packet(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def write_packet(request: int, handle: bytes, offset: int, data: bytes, trailer: bytes) -> bytes:
    return packet(
        bytes([6]) + struct.pack(">I", request) + string(handle) + struct.pack(">Q", offset)
        + string(data) + trailer
    )  # fmt: skip


def feed_all(chunks: list[bytes]) -> tuple[bytes, WriteTrailerTrimmer]:
    trimmer = WriteTrailerTrimmer()
    return b"".join(piece for chunk in chunks for piece in trimmer.feed(chunk)), trimmer


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


# -- the trimmer on its own -----------------------------------------------------------------

_other = st.builds(
    lambda kind, body: packet(bytes([kind]) + body),
    st.sampled_from([1, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 16, 17, 18, 200, 201]),
    st.binary(max_size=80),
)
_write = st.tuples(
    st.integers(0, 2**32 - 1),
    st.binary(min_size=0, max_size=8),
    st.integers(0, 2**40),
    st.binary(max_size=300),
    st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_other.map(lambda p: (p, p)), _write.map(lambda w: (
        write_packet(*w), write_packet(*w[:4], b"")))), max_size=12),
    st.lists(st.integers(0, 10_000), max_size=20),
)  # fmt: skip
def test_any_chunking_gives_the_stream_with_write_trailers_removed(
    packets: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    sent = b"".join(p for p, _ in packets)
    expected = b"".join(e for _, e in packets)
    out, trimmer = feed_all(chunked(sent, cuts))
    assert out == expected
    assert trimmer.trimmed_bytes == len(sent) - len(expected)


def test_a_chunk_that_needs_no_change_is_passed_as_is() -> None:
    trimmer = WriteTrailerTrimmer()
    body = write_packet(7, b"\0\0\0\1", 0, b"x" * 70_000, b"")
    first, rest = body[:32_768], body[32_768:]
    assert trimmer.feed(first)[0] is first
    assert trimmer.feed(rest) == [rest]  # the whole rest: one piece, no copy


def test_rclone_last_write_as_traced() -> None:
    """The last WRITE of a 100,000-byte rclone upload: 1,696 data bytes in a 32,793-byte
    packet (the 32 KiB buffer's stale tail after them)."""
    stale = bytes(range(256)) * 128
    sent = write_packet(7, b"\0\0\0\0", 98_304, stale[:1_696], stale[1_696:32_768])
    assert sent[:4] == bytes.fromhex("00008019") and sent[25:29] == bytes.fromhex("000006a0")
    out, trimmer = feed_all([sent[:10_000], sent[10_000:]])
    assert out == write_packet(7, b"\0\0\0\0", 98_304, stale[:1_696], b"")
    assert (trimmer.trimmed_packets, trimmer.trimmed_bytes) == (1, 31_072)


@pytest.mark.parametrize(
    "odd",
    [
        packet(bytes([6]) + struct.pack(">I", 1) + string(b"h") + struct.pack(">Q", 0)
               + struct.pack(">I", 500) + b"short"),  # data runs past the packet
        packet(bytes([6]) + struct.pack(">I", 1) + struct.pack(">I", 9999) + b"x" * 40),
        packet(bytes([6, 0, 0])),  # too short to be a WRITE
    ],
)  # fmt: skip
def test_malformed_writes_reach_asyncssh_as_sent(odd: bytes) -> None:
    after = packet(b"\x11\0\0\0\2" + string(b"/x"))
    out, trimmer = feed_all(chunked(odd + after, [3, 7, 20]))
    assert out == odd + after
    assert trimmer.trimmed_packets == 0


def test_an_oversized_packet_is_left_for_asyncssh_to_refuse() -> None:
    header = struct.pack(">I", MAX_TRIMMED_PACKET + 1) + bytes([6]) + struct.pack(">I", 1)
    header += string(b"\0\0\0\0") + struct.pack(">Q", 0) + string(b"")
    out, _ = feed_all([header])
    assert out == header


def test_a_zero_length_packet_turns_the_trimmer_off() -> None:
    junk = b"\0\0\0\0" + write_packet(1, b"h", 0, b"d", b"tail")
    out, trimmer = feed_all(chunked(junk, [2, 9]))
    assert out == junk and trimmer.off


# -- raw SFTP against a server --------------------------------------------------------------


async def raw_upload(host: str, port: int, **connect: Any) -> tuple[int, str]:
    """INIT, OPEN(new file), one WRITE of b"hello" with 11 stale bytes after it, CLOSE.
    Returns the WRITE's status code and message (the CLOSE must then succeed)."""
    async with asyncssh.connect(host, port, known_hosts=None, agent_path=None, **connect) as conn:
        writer, reader, _ = await conn.open_session(subsystem="sftp", encoding=None)

        async def reply() -> bytes:
            (length,) = struct.unpack(">I", await reader.readexactly(4))
            return await reader.readexactly(length)

        def status(body: bytes) -> tuple[int, str]:
            assert body[0] == 101, body
            code, size = struct.unpack(">II", body[5:13])
            return code, body[13 : 13 + size].decode()

        writer.write(packet(b"\x01" + struct.pack(">I", 3)))
        assert (await reply())[0] == 2
        attrs = struct.pack(">I", 0)
        writer.write(packet(b"\x03\0\0\0\1" + string(b"raw.txt") + struct.pack(">I", 0x1A) + attrs))
        body = await reply()
        assert body[0] == 102, body
        handle = body[9 : 9 + struct.unpack(">I", body[5:9])[0]]
        writer.write(write_packet(2, handle, 0, b"hello", b"stale bytes"))
        result = status(await reply())
        writer.write(packet(b"\x04\0\0\0\3" + string(handle)))
        assert status(await reply())[0] == FX_OK
        writer.close()
        return result


class _Plain(asyncssh.SSHServerProcess):  # type: ignore[type-arg]
    pass


class _Tolerant(WriteTrailerTolerance, asyncssh.SSHServerProcess):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize("session", [_Plain, _Tolerant])
def test_bare_asyncssh_refuses_the_write_and_the_mixin_accepts_it(
    tmp_path: Path, session: type[asyncssh.SSHServerProcess]
) -> None:  # type: ignore[type-arg]
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    root = tmp_path / "root"
    root.mkdir()

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True

        def public_key_auth_supported(self) -> bool:
            return True

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return key.public_data == client_key.public_data

        def session_requested(self) -> Any:
            return session(
                None, lambda chan: asyncssh.SFTPServer(chan, chroot=bytes(root)), 3, False
            )

    async def run() -> tuple[int, str]:
        listener = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[host_key], server_factory=Server
        )
        try:
            port = listener.sockets[0].getsockname()[1]
            return await raw_upload(
                "127.0.0.1", port, username="u", client_keys=[client_key], client_version="Go"
            )
        finally:
            listener.close()
            await listener.wait_closed()

    code, message = asyncio.run(asyncio.wait_for(run(), 30))
    if session is _Plain:  # asyncssh 2.24: refused (when this fails, asyncssh accepts it)
        assert (code, message) == (FX_BAD_MESSAGE, "Unexpected data at end of packet")
    else:
        assert code == FX_OK, message
        assert (root / "raw.txt").read_bytes() == b"hello"


def test_our_server_accepts_a_write_with_stale_bytes_after_its_data(
    server: RunningServer, alpha_key: Path
) -> None:
    code, message = asyncio.run(
        asyncio.wait_for(
            raw_upload(
                server.host,
                server.port,
                username="alpha",
                client_keys=[str(alpha_key)],
                client_version="Go",  # "SSH-2.0-Go", as rclone's pkg/sftp presents itself
            ),
            30,
        )
    )
    assert code == FX_OK, message
    folder = server.folder("alpha")
    assert (folder / "raw.txt").read_bytes() == b"hello"
    assert temp_files(folder) == []


def test_other_clients_pay_nothing_for_it(server: RunningServer, alpha_key: Path) -> None:
    """Only Go's SSH library gets the trimmer (about 2% of upload CPU for the others): a
    client that presents itself otherwise is parsed by asyncssh as it always was."""
    assert needs_trimming("SSH-2.0-Go") and needs_trimming("SSH-2.0-rclone/v1.60.1")
    assert not needs_trimming("SSH-2.0-OpenSSH_9.2p1")
    code, _message = asyncio.run(
        asyncio.wait_for(
            raw_upload(server.host, server.port, username="alpha", client_keys=[str(alpha_key)]),
            30,
        )
    )
    assert code == FX_BAD_MESSAGE  # what asyncssh answers untrimmed
