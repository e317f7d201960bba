"""What a serving node does for the nodes beside it, in the listener process.

At start (before it listens): the single-node guard for SQLite, its ``cluster_nodes`` row,
and the removal of its own uploads' temporary files left by a crash. While serving: a
heartbeat every ``nodes.HEARTBEAT_SECONDS`` and a sweep of dead nodes' leftovers every
``nodes.SWEEP_SECONDS`` (the first soon after start), each in a thread: the event loop never
waits on the database or on listing every account folder. On SIGTERM: the row says
draining. The rules themselves are in ``ingest_core.nodes``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ingest_core import nodes
from ingest_core.db import ControlDB
from ingest_core.folders import remove_uploads_of_node
from ingest_core.settings import Settings

FIRST_SWEEP_AFTER = 0.0  # seconds after start (it runs in a thread: start is not slowed)
DRAINING_MARK_TIMEOUT = 2.0  # seconds a shutdown waits for the row to say draining


class NodeUpkeep:
    """This node's heartbeat, leftover sweep and draining flag."""

    def __init__(self, settings: Settings, audit: Any, db: ControlDB) -> None:
        self.settings = settings
        self.audit = audit
        self.db = db
        self.node = nodes.this_node(settings)
        self._task: asyncio.Task[None] | None = None
        self._failing: set[str] = set()  # duties whose last try failed (logged once)

    def start_up(self) -> int:
        """Refuse a shared SQLite data root, register, remove this node's own leftovers
        (none of its processes runs any more); how many were removed (blocking)."""
        nodes.claim_data_root(self.settings)
        nodes.register_node(self.db, self.settings)
        return remove_uploads_of_node(self.settings)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="node-upkeep")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + nodes.HEARTBEAT_SECONDS
        next_sweep = loop.time() + FIRST_SWEEP_AFTER
        while True:
            await asyncio.sleep(max(min(next_beat, next_sweep) - loop.time(), 0.0))
            now = loop.time()
            if now >= next_beat:
                next_beat = now + nodes.HEARTBEAT_SECONDS
                await self._duty("heartbeat", nodes.heartbeat)
            if now >= next_sweep:
                next_sweep = now + nodes.SWEEP_SECONDS
                removed = await self._duty("sweep", nodes.sweep_leftover_uploads)
                if removed:
                    self.audit.warning("node.leftovers_removed", node=self.node, count=removed)

    async def _duty(self, duty: str, work: Any) -> Any:
        """``work(db, settings)`` in a thread; a failure is logged once until it works again."""
        try:
            result = await asyncio.to_thread(work, self.db, self.settings)
        except Exception as exc:  # the database or the shared storage is away: keep serving
            if duty not in self._failing:
                self._failing.add(duty)
                self.audit.error(f"node.{duty}_failed", node=self.node, error=repr(exc))
            return None
        if duty in self._failing:
            self._failing.discard(duty)
            self.audit.info(f"node.{duty}_restored", node=self.node)
        return result

    async def drain(self, seconds: float) -> None:
        """SIGTERM: the row says draining at once; keep serving new sessions ``seconds`` more
        (while /healthz already says 503), so a load balancer moves them elsewhere first."""
        self.audit.info("server.draining", node=self.node, drain_seconds=seconds)
        marking = asyncio.ensure_future(self._duty("draining", nodes.mark_draining))
        if seconds > 0:
            await asyncio.sleep(seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(marking), DRAINING_MARK_TIMEOUT)

    async def stop(self) -> None:
        """The node has stopped serving: no more heartbeats; its marker goes."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(nodes.remove_marker, self.settings)
