"""The line between the listener and one worker process: a Unix SOCK_SEQPACKET pair.

Each message is one JSON object in one datagram; the listener's message may carry the
client's TCP socket (SCM_RIGHTS). Listener to worker: ``{"address": A}`` + socket,
``{"ping": N}`` or ``{"stop": true}``. Worker to listener: ``{"ready": PID}``,
``{"pong": N}``, ``{"closed": A}`` when a connection it was given has ended, and
``{"failed": A, "unknown_user": BOOL}`` when it ended without a login (for the defender).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]
_MAX_MESSAGE = 4096


class ControlChannel:
    """One end of the pair, read from the event loop."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def pair(cls) -> tuple[ControlChannel, socket.socket]:
        """Our end, and the other end's socket to hand to the worker process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def send(self, message: Message, sock: socket.socket | None = None) -> None:
        """Send one message (and a socket); raises OSError if it cannot go now."""
        data = json.dumps(message).encode()
        if sock is None:
            self.sock.send(data)
        else:
            socket.send_fds(self.sock, [data], [sock.fileno()])

    def watch(
        self,
        on_message: Callable[[Message, socket.socket | None], None],
        on_eof: Callable[[], None],
    ) -> None:
        """Call ``on_message`` for each message; ``on_eof`` once the other end is gone."""
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
                sock = socket.socket(fileno=fds[0]) if fds else None
                try:
                    message = json.loads(data)
                except ValueError:
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
        self.sock.close()
