"""What one logged-in connection may hold at once, so that no client can starve the others.

A connection (all its channels together) may have at most ``max_handles_per_session`` files
open, ``max_channels_per_connection`` channels, and ``max_unflushed_bytes_per_session`` bytes
of upload data in memory not yet written; it is closed after ``idle_timeout`` seconds
without a request. Every counter here is taken and given back through one object per
handle or channel (:class:`Held`), so it is released exactly once whatever fails.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from ingest_core.settings import Settings
from ingest_server.atomic_upload import UnflushedBytes

# Descriptors kept for the process itself (listening and control sockets, logs, databases,
# host keys, the loader's threads) when handles per session are sized from the fd limit.
_FD_RESERVE = 64
_AUTO_HANDLES_MAX = 64
_AUTO_HANDLES_MIN = 4


def handles_per_session(settings: Settings) -> int:
    """``max_handles_per_session``, or when 0, what this process's fd limit affords:
    every allowed connection holding its whole allowance must still leave descriptors free."""
    configured = settings.limits.max_handles_per_session
    if configured:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _AUTO_HANDLES_MAX
    connections = max(settings.limits.max_connections_total, 1)
    share = (soft - _FD_RESERVE) // connections
    return max(_AUTO_HANDLES_MIN, min(_AUTO_HANDLES_MAX, share))


class BudgetExceeded(Exception):
    """A request would take more than the connection's budget; the text is for the client."""


@dataclass(slots=True)
class Held:
    """One thing counted against a budget (a handle, a channel); ``release`` runs once."""

    _release: Callable[[], None] | None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class SessionBudget:
    """The budgets of one SSH connection, shared by all its channels."""

    # One per logged-in connection: no __dict__ each.
    __slots__ = (
        "channels",
        "clock",
        "handles",
        "last_request",
        "max_channels",
        "max_handles",
        "unflushed",
    )

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        limits = settings.limits
        self.max_handles = handles_per_session(settings)
        self.max_channels = settings.server.max_channels_per_connection
        self.unflushed = UnflushedBytes(limits.max_unflushed_bytes_per_session)
        self.clock = clock
        self.handles = 0
        self.channels = 0
        self.last_request = clock()

    def touch(self) -> None:
        """A request arrived: the connection is not idle."""
        self.last_request = self.clock()

    def idle_for(self) -> float:
        return self.clock() - self.last_request

    def open_handle(self) -> Held:
        if self.max_handles and self.handles >= self.max_handles:
            raise BudgetExceeded(
                f"too many open files in this session: at most {self.max_handles} at once; "
                "close some before opening more"
            )
        self.handles += 1
        return Held(self._close_handle)

    def _close_handle(self) -> None:
        self.handles -= 1

    def open_channel(self) -> Held:
        if self.max_channels and self.channels >= self.max_channels:
            raise BudgetExceeded(
                f"too many sessions on this connection: at most {self.max_channels} at once"
            )
        self.channels += 1
        self.touch()
        return Held(self._close_channel)

    def _close_channel(self) -> None:
        self.channels -= 1
        self.touch()
