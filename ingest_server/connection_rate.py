"""New connections per second from one source address: a token bucket per address.

Every connection that gets the SSH banner costs the server a key exchange, whoever sends it
(the DHEat attack, CVE-2002-20001, floods a server with exactly that). The gate asks
:meth:`ConnectionRate.allow` before anything else, so a refused connection costs no DB
lookup and no SSH byte. It runs in the listener process: the count covers every worker.

Memory stays bounded: a bucket that has refilled completely is the same as no bucket, so
buckets idle that long are dropped (checked at each call, oldest first), and at most
``max_addresses`` buckets are kept whatever the traffic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# A hard cap on buckets, for floods from very many addresses within one refill time. Dropping
# the oldest bucket early only gives that address a full bucket again: too lenient, never
# too strict.
MAX_ADDRESSES = 65_536


class ConnectionRate:
    """At most ``rate`` new connections a second per address, with bursts up to ``burst``.

    ``rate`` 0 turns the check off (every connection is allowed).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ):
        self.rate = rate
        self.burst = max(burst, 1)
        self.clock = clock
        self.max_addresses = max_addresses
        # address -> (tokens left, when they were counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def refill_seconds(self) -> float:
        """How long an unused bucket takes to fill up (after that it is dropped)."""
        return self.burst / self.rate

    def allow(self, address: str) -> bool:
        """True (and one token is taken) if ``address`` may open a connection now."""
        if not self.enabled:
            return True
        now = self.clock()
        self._drop_idle(now)
        tokens, since = self._buckets.pop(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[address] = (tokens, now)  # now the most recently used
        if len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)
        return allowed

    def describe_limit(self) -> str:
        """The rule in the words a refusal reason uses."""
        return f"at most {self.rate:g} a second"

    def __len__(self) -> int:
        """Buckets held now (tests check that memory stays bounded)."""
        return len(self._buckets)

    def _drop_idle(self, now: float) -> None:
        """Drop buckets untouched for a full refill time: they would be full anyway."""
        horizon = now - self.refill_seconds
        while self._buckets:
            address, (_, since) = next(iter(self._buckets.items()))
            if since > horizon:
                break
            del self._buckets[address]
