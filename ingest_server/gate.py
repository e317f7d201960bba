"""The IP gate (the seed's firewall): decide about a TCP connection before any SSH byte.

A connection is dropped unseen (no banner, no key exchange) when its address is banned by
the defender, is on no active account's allowlist, or already has too many connections, or
when the server as a whole is full. The registry is read at every connection, so an address
added with ``ingestctl ip add`` is let in at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from ingest_core.registry import Registry
from ingest_core.settings import LimitSettings
from ingest_server.defender import Defender


class ConnectionGate:
    """Admission decisions and the connection counts they depend on."""

    def __init__(self, limits: LimitSettings, registry: Registry, defender: Defender):
        self.limits = limits
        self.registry = registry
        self.defender = defender
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
        self.total -= 1
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]
