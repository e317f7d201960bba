"""The line between the listener and one worker process: a Unix SOCK_SEQPACKET pair.

Each message is one JSON object in one datagram; the listener's message may carry the
client's TCP socket (SCM_RIGHTS).

Listener to worker:

- ``{"connection": ID, "address": A}`` + socket: serve this admitted connection. ``ID`` is
  the listener's number for it; the worker answers ``closed`` with that ID exactly once,
  also when the socket did not arrive (a worker at its file-descriptor limit gets the
  message with MSG_CTRUNC and no socket: the kernel has already closed it).
- ``{"ping": N}``, ``{"stop": true}``.
- ``{"ledger_reply": N, "ok": BOOL}``: the answer to the worker's ledger request ``N``.

Worker to listener:

- ``{"ready": PID}``, ``{"pong": N}``.
- ``{"closed": ID}`` when a connection it was given has ended (or never started).
- ``{"failed": A, "unknown_user": BOOL}`` when it ended without a login (for the defender).
- Account ledger (``ledger.RemoteLedger``; the listener's ``ledger.LedgerService`` answers
  and remembers what each worker holds, to give it all back if the worker dies):
  ``{"ledger": "open_session", "id": N, "account": NAME}`` and
  ``{"ledger": "reserve", "id": N, "account": NAME, "bytes": B}`` (answered with
  ``ledger_reply``); ``{"ledger": "close_session", "account": NAME}`` and
  ``{"ledger": "settle", "account": NAME, "reserved": B, "delta": D}`` (no answer).

Messages without a socket never get lost to a full buffer: when the other end reads slowly
they wait in order in a queue and go out as soon as the channel is writable. A lost
``closed`` would leak a connection slot for good.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]
_MAX_MESSAGE = 4096
# Messages waiting for a slow reader, beyond which the other end is taken to be stuck (the
# heartbeat kills a stuck worker; a stuck listener is gone for good anyway).
MAX_QUEUED = 100_000


class ControlChannel:
    """One end of the pair, read from the event loop."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        self.dropped = 0  # messages given up because the queue was full

    @classmethod
    def pair(cls) -> tuple[ControlChannel, socket.socket]:
        """Our end, and the other end's socket to hand to the worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def send(self, message: Message, sock: socket.socket | None = None) -> None:
        """Send one message; raises OSError if the channel is broken.

        A message with a socket goes now or raises (BlockingIOError included), so the caller
        can try another worker; one without waits in the queue when the buffer is full.
        """
        data = json.dumps(message).encode()
        if sock is not None:
            socket.send_fds(self.sock, [data], [sock.fileno()])
            return
        if not self._queue:
            try:
                self.sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                pass
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            raise BlockingIOError("control channel queue full")
        self._queue.append(data)
        if self._writer_loop is None:
            self._writer_loop = asyncio.get_running_loop()
            self._writer_loop.add_writer(self.sock.fileno(), self._flush)

    def _flush(self) -> None:
        while self._queue:
            try:
                self.sock.send(self._queue[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the other end is gone: nobody is left to tell
                self._queue.clear()
                break
            self._queue.popleft()
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writer_loop is not None and self.sock.fileno() >= 0:
            self._writer_loop.remove_writer(self.sock.fileno())
        self._writer_loop = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def watch(
        self,
        on_message: Callable[[Message, socket.socket | None], None],
        on_eof: Callable[[], None],
    ) -> None:
        """Call ``on_message`` for each message; ``on_eof`` once the other end is gone.

        A message whose socket could not be received (MSG_CTRUNC: this process is at its
        file-descriptor limit) still arrives, with ``None`` for the socket.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop

        def readable() -> None:
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MESSAGE, 1)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data, fds = b"", []
                if not data and not fds:
                    self.unwatch()
                    on_eof()
                    return
                sock = _adopt(fds)
                try:
                    message = json.loads(data)
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    if sock is not None:
                        sock.close()
                    continue
                on_message(message, sock)

        loop.add_reader(self.sock.fileno(), readable)

    def unwatch(self) -> None:
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self._loop = None

    def close(self) -> None:
        self.unwatch()
        self._stop_writing()
        self._queue.clear()
        self.sock.close()


def _adopt(fds: list[int]) -> socket.socket | None:
    """The received socket, or None (and every received descriptor closed) if unusable."""
    sock = None
    for fd in fds:
        if sock is None:
            try:
                sock = socket.socket(fileno=fd)
                continue
            except OSError:
                pass
        os.close(fd)
    return sock
