"""The IP gate (the per-account address allowlist, applied as a firewall would): decide about a
TCP connection before any SSH byte.

A connection is dropped unseen (no banner, no key exchange) when its address is banned by
the defender, is on no active account's allowlist, or already has too many connections, or
when the server as a whole is full. The registry is read at every connection, so an address
added with ``ingestctl ip add`` is let in at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from ingest_core.registry import Registry
from ingest_core.settings import LimitSettings
from ingest_server.connection_rate import ConnectionRate
from ingest_server.defender import Defender


class ConnectionGate:
    """Admission decisions and the connection counts they depend on."""

    def __init__(self, limits: LimitSettings, registry: Registry, defender: Defender):
        self.limits = limits
        self.registry = registry
        self.defender = defender
        self.rate = ConnectionRate(limits.connection_rate_per_address, limits.connection_burst)
        self.per_address: Counter[str] = Counter()
        self.total = 0

    def _lookup(self, address: str) -> str | None:
        if self.defender.is_banned(address):
            return "banned by the defender"
        if not self.registry.is_allowed_anywhere(address):
            return "address not on any active account's allowlist"
        return None

    async def admit(self, address: str) -> str | None:
        """None if the connection may proceed (and is then counted), else why not.

        Raises whatever the control DB raises; the caller refuses the connection then.
        """
        if not self.rate.allow(address):  # before the DB: a flood costs nothing
            return f"too many new connections from this address ({self.rate.describe_limit()})"
        refusal = await asyncio.to_thread(self._lookup, address)
        if refusal is not None:
            return refusal
        limits = self.limits
        if limits.max_connections_total and self.total >= limits.max_connections_total:
            return f"server full ({self.total} connections)"
        if (
            limits.max_connections_per_address
            and self.per_address[address] >= limits.max_connections_per_address
        ):
            return f"too many connections from this address ({self.per_address[address]})"
        self.total += 1
        self.per_address[address] += 1
        return None

    def release(self, address: str) -> None:
        """Give back one admitted connection's slots (never below zero).

        Call it through ``AdmittedConnections.release``, which makes it once per connection.
        """
        if self.per_address[address] <= 0:
            self.per_address.pop(address, None)
            return
        self.total = max(self.total - 1, 0)
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]


class AdmittedConnections:
    """Every admitted connection by number, so its slots are released exactly once.

    Whatever fails between admission and the end of a session (the hand-over to a worker,
    the worker's receipt of the socket, a worker crash, an exception), the paths that notice
    it all call ``release`` with the connection's number; only the first call for a number
    still held gives the slots back, so none can leak and none is freed twice.
    """

    def __init__(self, gate: ConnectionGate):
        self.gate = gate
        self._held: dict[int, str] = {}
        self._numbers = itertools.count(1)

    def hold(self, address: str) -> int:
        """Number a connection ``gate.admit`` has just counted."""
        number = next(self._numbers)
        self._held[number] = address
        return number

    def release(self, number: int) -> bool:
        """Release connection ``number``'s slots; False if it was no longer held."""
        address = self._held.pop(number, None)
        if address is None:
            return False
        self.gate.release(address)
        return True

    def __len__(self) -> int:
        return len(self._held)
