"""How every long-running command lives and stops: one event loop, SIGTERM/SIGINT set ``stop``.

The server, the loader daemon, ``ingestctl serve`` and the push agent's daemon all run as
``run_until_signalled(lambda stop: thing.run(stop))``: each drains its work when ``stop`` is
set and returns, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on a new event loop until it returns; signals only set ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await main(stop)

    asyncio.run(runner())
