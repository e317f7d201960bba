"""SFTP clients that send what OpenSSH accepts and asyncssh refuses, made to work anyway.

rclone (pkg/sftp before v1.13.6, e.g. Debian 12's rclone 1.60) uploads with concurrent
writes by default, and the last SSH_FXP_WRITE of every file is framed wrongly: its SFTP
length counts the whole 32 KiB buffer while its data string holds only the bytes read. The
last WRITE of a 100,000-byte file (offset 98,304, 1,696 bytes)::

    00 00 80 19          length 32,793 (25 bytes of header + 32,768)
    06 00 00 00 07       SSH_FXP_WRITE, request id 7
    00 00 00 04 ...      handle (4 bytes), offset 0x18000
    00 00 06 a0 ...      data: 1,696 bytes, then 31,072 bytes of stale buffer

OpenSSH's sftp-server reads the fields it knows and discards the rest of a packet
(``process()``: ``sshbuf_consume(iqueue, msg_len - consumed)``). asyncssh 2.24's
``SFTPServerHandler._process_write`` calls ``packet.check_end()`` (SFTP versions below 6)
and answers SSH_FX_BAD_MESSAGE "Unexpected data at end of packet" before any
``SFTPServer`` hook runs, so nothing in ``SFTPServer`` can help. (pkg/sftp fixed the
framing in PR #537, "Stop ReadFromWithConcurrency sending more data than it needs to".)

Only Go clients get the trimmer (rclone presents itself as ``SSH-2.0-rclone/...``, other
users of Go's SSH library as ``SSH-2.0-Go``): for everyone else the scan would be about 2%
more server CPU per uploaded GiB for nothing.

What we do instead sits one layer below, on the documented session callback
``SSHServerSession.data_received``: :class:`WriteTrailerTolerance` (a mixin for our
``asyncssh.SSHServerProcess`` subclass) passes an SFTP channel's bytes through
:class:`WriteTrailerTrimmer`, which finds each packet's boundaries and, for a
well-formed SSH_FXP_WRITE only, drops the bytes after its data string and lowers the
length prefix to match: what OpenSSH does with them. Every other byte reaches asyncssh as the
client sent it (no copy when a chunk needs no change), so every other request, malformed
or not, is judged by asyncssh as before.
"""

from __future__ import annotations

from typing import Any

FXP_WRITE = 6
# Bytes of a WRITE before its data: length, type, request id, handle length.
_WRITE_FIXED = 4 + 1 + 4 + 4
# Longest handle we parse (asyncssh's are 4 bytes; OpenSSH's 4); longer: left to asyncssh.
_MAX_HANDLE = 256
# Longest packet we would shorten (asyncssh's own limit: 4 MiB of data + 1 KiB); longer
# ones go through as sent and asyncssh refuses them as it always did.
MAX_TRIMMED_PACKET = 4 * 1024 * 1024 + 1024


def _plan(buf: bytes | memoryview, start: int) -> int | tuple[int, int]:
    """What to do with the packet that starts at ``buf[start]``.

    Returns the number of bytes (from the packet's start) needed to decide, when ``buf``
    holds fewer, or ``(length, new_length)``: the packet's length prefix and the one to
    send (smaller only for a WRITE with bytes after its data). ``length`` 0 is returned
    as ``(0, 0)``.
    """
    have = len(buf) - start
    if have < 4:
        return 4
    length = int.from_bytes(buf[start : start + 4], "big")
    if length == 0:
        return 0, 0
    if have < 5:
        return 5
    if buf[start + 4] != FXP_WRITE or length > MAX_TRIMMED_PACKET:
        return length, length
    if 4 + length < _WRITE_FIXED:
        return length, length  # too short to be a WRITE: asyncssh says so
    if have < _WRITE_FIXED:
        return _WRITE_FIXED
    handle_len = int.from_bytes(buf[start + 9 : start + 13], "big")
    if handle_len > _MAX_HANDLE:
        return length, length
    head = _WRITE_FIXED + handle_len + 8 + 4  # through the data string's length
    if head > 4 + length:
        return length, length  # truncated header: asyncssh says so
    if have < head:
        return head
    data_len = int.from_bytes(buf[start + head - 4 : start + head], "big")
    used = head - 4 + data_len
    if used >= length:
        return length, length  # exact, or data runs past the packet: asyncssh judges
    return length, used


class WriteTrailerTrimmer:
    """One SFTP byte stream (client to server), with the bytes after each WRITE's data
    removed. ``feed`` returns the pieces to pass on, in order (often just ``[data]``)."""

    def __init__(self) -> None:
        self._left = 0  # bytes of the current packet still to pass on unchanged
        self._drop = 0  # bytes at the end of the current packet to drop
        self._head = b""  # the start of a packet split across chunks, held back
        self.off = False  # a zero-length packet: boundaries unknown, pass all as sent
        self.trimmed_packets = 0
        self.trimmed_bytes = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.off:
            return [data]
        out: list[bytes] = []
        i, n = 0, len(data)
        run = 0  # start of the bytes of ``data`` passed on unchanged since the last cut
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            if self._drop:
                if run < i:
                    out.append(data[run:i])
                step = min(self._drop, n - i)
                self._drop -= step
                i += step
                run = i
                continue
            if self._head:  # a packet's first bytes came in an earlier chunk
                plan = _plan(self._head, 0)
                while isinstance(plan, int) and i < n:
                    take = min(plan - len(self._head), n - i)
                    self._head += data[i : i + take]
                    i += take
                    plan = _plan(self._head, 0)
                run = i
                if isinstance(plan, int):
                    continue  # this chunk is used up: wait for the next one
                length, new = plan
                if length == 0:
                    return self._give_up(out, self._head + data[i:])
                head, self._head = self._head, b""
                if new != length:
                    head = new.to_bytes(4, "big") + head[4:]
                    self._count(length - new)
                out.append(head)
                self._left = 4 + new - len(head)
                self._drop = length - new
                continue
            plan = _plan(data, i)
            if isinstance(plan, int):  # the rest of this chunk is a packet's start
                if run < i:
                    out.append(data[run:i])
                self._head = data[i:]
                i = run = n
                continue
            length, new = plan
            if length == 0:
                return self._give_up(out, data[run:])
            if new != length:
                if run < i:
                    out.append(data[run:i])
                out.append(new.to_bytes(4, "big"))
                i += 4
                run = i
                self._count(length - new)
                self._left = new
                self._drop = length - new
            else:
                self._left = 4 + length
        if run < n:
            out.append(data if run == 0 else data[run:])
        return out

    def _count(self, dropped: int) -> None:
        self.trimmed_packets += 1
        self.trimmed_bytes += dropped

    def _give_up(self, out: list[bytes], rest: bytes) -> list[bytes]:
        self.off = True
        if rest:
            out.append(rest)
        return out


def needs_trimming(client_version: str) -> bool:
    """Clients whose SFTP library (Go's pkg/sftp) may send bytes after a WRITE's data."""
    return client_version.startswith(("SSH-2.0-Go", "SSH-2.0-rclone"))


class WriteTrailerTolerance:
    """Mixin for an ``asyncssh.SSHServerProcess`` subclass (put it first in the bases): on
    an SFTP subsystem channel, a WRITE's bytes after its data are dropped before asyncssh
    parses the packet, as OpenSSH's sftp-server does. SCP and other channels are untouched.

    ``sftp_trimmer`` (None until data arrives, and on non-SFTP channels) counts what was
    dropped: ``trimmed_packets``, ``trimmed_bytes``.
    """

    sftp_trimmer: WriteTrailerTrimmer | None = None
    _sftp_checked = False

    def data_received(self, data: Any, datatype: Any) -> None:
        if not self._sftp_checked:
            self._sftp_checked = True
            client = str(self.get_extra_info("client_version") or "")  # type: ignore[attr-defined]
            if getattr(self, "subsystem", None) == "sftp" and needs_trimming(client):
                self.sftp_trimmer = WriteTrailerTrimmer()
        trimmer = self.sftp_trimmer
        if trimmer is None or datatype is not None or not isinstance(data, bytes):
            super().data_received(data, datatype)  # type: ignore[misc]
            return
        for piece in trimmer.feed(data):
            super().data_received(piece, datatype)  # type: ignore[misc]
