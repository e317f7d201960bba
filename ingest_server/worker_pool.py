"""The listener's worker processes: start them, hand each admitted socket to the least busy,
restart one that dies, stop them all gracefully.

One asyncssh process is one core. With ``[server] workers`` > 1 the listener process keeps
accepting, the PROXY header, the IP gate, the connection limits and the defender (so limits
and scores count across all workers, as an operator reads them), and passes each admitted
socket over a Unix socket (SCM_RIGHTS) to the worker with the fewest connections. Workers
are fresh interpreters (``python -m ingest_server.worker``), not forks of a process that
already runs threads and an event loop.

Each connection handed over carries the listener's number for it; the pool remembers which
worker holds which numbers, passes each ``closed`` on once (only for a number that worker
still holds) and, when a worker dies, releases all it held. Likewise each worker's sessions
and quota reservations in the account ledger (``ledger.LedgerService``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ingest_core import metrics
from ingest_core.errors import IngestError
from ingest_core.folders import remove_uploads_of
from ingest_core.settings import Settings
from ingest_server.connection import FailedLogin
from ingest_server.ledger import LedgerService, LocalLedger
from ingest_server.worker_channel import ControlChannel, Message

START_TIMEOUT = 60.0
RESTART_DELAY = 1.0  # a worker that keeps dying is not restarted in a tight loop
# Replacements that die (or hang) before saying ready, in a row, before the server gives up:
# that is the machine or the install, not a session, and a listener that admits connections
# no worker can take would only hide it.
MAX_START_FAILURES = 3
STOP_MARGIN = 10.0  # beyond the shutdown grace, before a worker is killed


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    channel: ControlChannel
    started: float
    ledger: LedgerService  # its sessions and reservations in the account ledger
    ready: bool = False
    gone: bool = False
    last_heard: float = 0.0  # monotonic time of its last message (or of its start)
    connections: dict[int, str] = field(default_factory=dict)  # number -> client address
    last_used: int = 0

    @property
    def load(self) -> int:
        return len(self.connections)


class WorkerPool:
    """``[server] workers`` worker processes and the connections each was given."""

    def __init__(
        self,
        settings: Settings,
        audit: Any,
        closed: Callable[[int], None],
        failed: FailedLogin,
        ledger: LocalLedger,
    ):
        self.settings = settings
        self.audit = audit
        self.closed = closed  # told each connection number exactly once, when it has ended
        self.failed = failed
        self.ledger = ledger
        self.size = settings.server.worker_count()
        self.workers: list[_Worker | None] = [None] * self.size
        self.stopping = False
        self._turn = itertools.count(1)
        self._ready = asyncio.Event()
        self._reaping: set[asyncio.Future[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._start_failures = 0
        self.broken = asyncio.Event()  # set when workers can no longer be started
        self.broken_reason = ""

    async def start(self) -> None:
        """Start every worker and wait until each has loaded its keys and said so."""
        for index in range(self.size):
            self._spawn(index)
        try:
            await asyncio.wait_for(self._ready.wait(), START_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise IngestError(
                f"server workers did not start within {START_TIMEOUT:.0f}s; see their errors "
                "above and in the server log"
            ) from None
        if any(w is None or w.gone for w in self.workers):
            await self.stop()
            raise IngestError("a server worker exited while starting; see its error above")
        self._heartbeat = asyncio.create_task(self._watch_heartbeats())

    async def _watch_heartbeats(self) -> None:
        """Ping every worker; one silent for ``worker_heartbeat_timeout`` is killed (and, like
        any worker that exits, replaced): a stuck event loop would hold its sessions hostage.
        A replacement that has not said ready that long after its start is killed too."""
        timeout = self.settings.server.worker_heartbeat_timeout
        for ping in itertools.count(1):
            await asyncio.sleep(timeout / 4)
            now = time.monotonic()
            for worker in self.workers:
                if worker is None or worker.gone:
                    continue
                if now - worker.last_heard > timeout:
                    self.audit.error(
                        "worker.unresponsive",
                        worker_pid=worker.process.pid,
                        silent_seconds=round(now - worker.last_heard, 1),
                        starting=not worker.ready,
                    )
                    worker.process.kill()  # its channel closes: _lost() takes over
                    continue
                if worker.ready:
                    with contextlib.suppress(OSError):
                        worker.channel.send({"ping": ping})

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        channel, theirs = ControlChannel.pair()
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "ingest_server.worker", str(theirs.fileno())],
                stdin=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        assert process.stdin is not None
        with process.stdin:
            process.stdin.write(pickle.dumps(self.settings))
        started = time.monotonic()
        service = LedgerService(self.ledger, channel.send, self.audit)
        worker = _Worker(index, process, channel, started, service, last_heard=started)
        self.workers[index] = worker
        channel.watch(
            lambda message, sock: self._message(worker, message, sock),
            lambda: self._lost(worker),
        )

    def dispatch(self, sock: socket.socket, number: int, address: str) -> bool:
        """Hand connection ``number`` to the least busy worker (``sock`` is then closed here);
        False if none took it (the caller still holds it)."""
        ready = [w for w in self.workers if w is not None and w.ready and not w.gone]
        for worker in sorted(ready, key=lambda w: (w.load, w.last_used)):
            try:
                worker.channel.send({"connection": number, "address": address}, sock)
            except OSError:
                continue
            worker.connections[number] = address
            worker.last_used = next(self._turn)
            sock.close()
            return True
        return False

    def _message(self, worker: _Worker, message: Message, sock: socket.socket | None) -> None:
        if sock is not None:  # workers never send sockets
            sock.close()
        worker.last_heard = time.monotonic()
        if "ready" in message:
            worker.ready = True
            self._start_failures = 0
            if all(w is not None and (w.ready or w.gone) for w in self.workers):
                self._ready.set()
        elif "closed" in message:
            number = message["closed"]
            if isinstance(number, int) and worker.connections.pop(number, None) is not None:
                self.closed(number)
        elif "ledger" in message:
            worker.ledger.handle(message)
        elif "failed" in message:
            self.failed(str(message["failed"]), bool(message.get("unknown_user")))

    def _lost(self, worker: _Worker) -> None:
        """The worker's end closed: it exited. Release what it held; restart it."""
        worker.gone = True
        worker.channel.close()
        held = list(worker.connections)
        worker.connections.clear()
        for number in held:
            self.closed(number)
        worker.ledger.release_all()
        if not self._ready.is_set():
            self._ready.set()  # start() sees the gone worker and fails
        task = asyncio.ensure_future(self._reap(worker))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _reap(self, worker: _Worker) -> None:
        try:
            code = await asyncio.to_thread(worker.process.wait, STOP_MARGIN)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            code = await asyncio.to_thread(worker.process.wait)
        metrics.process_exited(worker.process.pid)  # its live gauges leave the sum
        removed = await asyncio.to_thread(remove_uploads_of, self.settings, worker.process.pid)
        if removed:  # its sessions' uploads died with it: their temporary files go now
            self.audit.warning(
                "worker.uploads_removed", worker_pid=worker.process.pid, count=removed
            )
        if self.stopping or self.broken.is_set():
            return
        if not worker.ready:
            self._start_failures += 1
        if self._start_failures >= MAX_START_FAILURES:
            self.broken_reason = (
                f"server workers failed to start {self._start_failures} times in a row (the "
                f"last exited with code {code}); their errors are above and in the server log; "
                "stopping rather than admit connections no worker can take"
            )
            self.audit.error(
                "worker.exited", worker_pid=worker.process.pid, code=code, restarting=False
            )
            self.broken.set()
            return
        self.audit.error("worker.exited", worker_pid=worker.process.pid, code=code, restarting=True)
        quick = time.monotonic() - worker.started < RESTART_DELAY * 5
        asyncio.get_running_loop().call_later(
            RESTART_DELAY if quick else 0, self._spawn, worker.index
        )

    async def stop(self) -> None:
        """Ask every worker to drain and exit; kill any still there after the grace."""
        self.stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        live = [w for w in self.workers if w is not None]
        for worker in live:
            with contextlib.suppress(OSError):
                worker.channel.send({"stop": True})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_grace + STOP_MARGIN
        while any(w.process.poll() is None for w in live) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for worker in live:
            if worker.process.poll() is None:
                self.audit.error("worker.killed", worker_pid=worker.process.pid)
                worker.process.kill()
                worker.process.wait()
            if not worker.gone:
                self._lost(worker)
        if self._reaping:
            await asyncio.wait(set(self._reaping))
        for worker in live:
            await worker.ledger.drain()
