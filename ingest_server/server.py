"""The server's lifecycle: listen, accept, gate, hand over to asyncssh, shut down gracefully.

We accept TCP connections ourselves (not ``asyncssh.listen``) so that the IP gate, the
defender, connection limits and an optional PROXY protocol header are all dealt with before
asyncssh writes its banner; each admitted socket then goes to ``asyncssh.run_server``.

Every admitted connection gets a number (``gate.AdmittedConnections``) and is released
exactly once, by whichever path sees it end first: the session's end, a failed hand-over,
a worker's ``closed`` report or its death. The account ledger (sessions per account, quota
reservations) lives here too: a ``ledger.LocalLedger`` that the workers ask remotely.

Shutdown (``stop`` set, e.g. by SIGTERM): /healthz says 503 (draining) at once; accept new
connections ``server.drain_seconds`` more (a load balancer's check notices meanwhile), then
stop accepting, refuse new uploads, close idle sessions, let uploads in flight finish for
``server.shutdown_grace`` seconds, then close the rest (their temporary files are removed)
and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from ingest_core import metrics
from ingest_core.db import open_control_db
from ingest_core.errors import IngestError
from ingest_core.holdings import ClusterHoldings
from ingest_core.journal import JournalWriter, start_journal, stop_journal
from ingest_core.lifecycle import (
    loop_name,
    open_file_limit,
)
from ingest_core.nodes import this_node, uses_sqlite
from ingest_core.policy import normalize_peer_address
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from ingest_server.admin import AdminListener, ControlDbCheck, node_health, serving
from ingest_server.defender import Defender
from ingest_server.gate import AdmittedConnections, ConnectionGate
from ingest_server.host_keys import HOST_KEY_FILES, ensure_host_keys
from ingest_server.ledger import LocalLedger
from ingest_server.node_upkeep import NodeUpkeep
from ingest_server.proxy_protocol import ProxyHeaderError, read_proxy_header
from ingest_server.session_host import SessionHost, host_keypairs
from ingest_server.worker_pool import WorkerPool

PROXY_HEADER_TIMEOUT = 5.0
_CLOSE_WAIT = 5.0
REFUSAL_LOG_WINDOW = 10.0


class Server:
    """The listener: accept, admit (PROXY header, IP gate, limits, bans), hand over, stop.

    With ``[server] workers`` = 1 the sessions run in this process (a ``SessionHost``);
    with more, in that many worker processes (a ``WorkerPool``), while admission and the
    defender stay here so their counts cover every worker.
    """

    def __init__(self, settings: Settings, collectors: Sequence[Any] = ()):
        """``collectors``: more Prometheus collectors for /metrics (the caller's: the
        loader's feed figures when the CLI runs both)."""
        self.settings = settings
        self.audit = get_logger(settings.log_dir, "server", pid=os.getpid(), **log_limits(settings))
        # Metrics: before any worker starts.
        self.admin = AdminListener(settings, self.audit, collectors)
        db = open_control_db(settings.control_db_url)
        self.defender = Defender(settings.defender, db, node=settings.node_id)
        self.gate = ConnectionGate(
            settings.limits, Registry(settings, db=db, actor="ingest-server"), self.defender
        )
        self.admitted = AdmittedConnections(self.gate)
        # Several nodes: sessions and quota per account counted across them.
        holdings = None if uses_sqlite(settings) else ClusterHoldings(db, this_node(settings))
        self.ledger = LocalLedger(settings, cluster=holdings, audit=self.audit)
        self.upkeep = NodeUpkeep(settings, self.audit, db)  # heartbeat, leftovers, draining
        self.proxy_from = {normalize_peer_address(a) for a in settings.server.proxy_protocol_from}
        self.listening = asyncio.Event()
        self.port = settings.server.port
        self.sessions: SessionHost | None = None
        self.pool: WorkerPool | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._bans: set[asyncio.Future[None]] = set()
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self.journal: JournalWriter | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully and return."""
        s = self.settings.server
        # This process's journal rows (refusals; all sessions with one worker), and the prune.
        self.journal = start_journal(self.settings, self.audit, prune=True)
        if not all((s.host_key_dir / n).exists() for n in HOST_KEY_FILES.values()):
            ensure_host_keys(s.host_key_dir)  # first start without `ingestctl init`
        pairs = host_keypairs(self.settings)
        removed = self.upkeep.start_up()  # SQLite guard, node row, own leftovers
        self.ledger.clear_own()  # several nodes: what an earlier run of this node held
        if s.worker_count() > 1:
            self.pool = WorkerPool(
                self.settings, self.audit, self.admitted.release, self.failed_login, self.ledger
            )
            await self.pool.start()
        else:
            self.sessions = SessionHost(self.settings, self.audit, self.failed_login, self.ledger)
        try:
            listener = socket.create_server(
                (s.host, s.port),
                family=socket.AF_INET6 if ":" in s.host else socket.AF_INET,
                backlog=512,
            )
        except BaseException:
            await self._shut_down()
            raise
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        fingerprints = [
            {"algorithm": pair.get_algorithm(), "fingerprint": fp} for pair, fp in pairs
        ]
        self.audit.info(
            "server.started",
            host=s.host,
            port=self.port,
            host_keys=fingerprints,
            node=self.upkeep.node,
            own_leftover_uploads_removed=removed,
            workers=s.worker_count(),
            event_loop=loop_name(asyncio.get_running_loop()),
            open_file_limit=open_file_limit(),
        )
        for item in fingerprints:
            print(
                f"sis-ingest server on {s.host}:{self.port}: host key {item['algorithm']} "
                f"{item['fingerprint']}",
                file=sys.stderr,
                flush=True,
            )
        db_check = ControlDbCheck(self.settings.control_db_url)
        await self.admin.start(  # GET /metrics, /healthz
            lambda: serving(self, stop), lambda: node_health(self, stop, db_check)
        )
        accepting = asyncio.create_task(self._accept(listener))
        self.listening.set()
        self.upkeep.start()
        try:
            await self._until_stopped(stop)
            if stop.is_set():  # /healthz says 503 from now on; new sessions still come in
                await self.upkeep.drain(s.drain_seconds)
        finally:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            listener.close()
            await self._shut_down()
            await self.ledger.close()
            await self.upkeep.stop()
            self.audit.info("server.stopped", port=self.port)
        if self.pool is not None and self.pool.broken.is_set():
            raise IngestError(self.pool.broken_reason)

    async def _until_stopped(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set, or the workers can no longer be started."""
        waits = [asyncio.ensure_future(stop.wait())]
        if self.pool is not None:
            waits.append(asyncio.ensure_future(self.pool.broken.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _shut_down(self) -> None:
        for task in list(self._tasks):  # admissions not yet handed over
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_CLOSE_WAIT)
        if self.pool is not None:
            await self.pool.stop()
        if self.sessions is not None:
            await self.sessions.shut_down()
        if self._bans:  # bans being written
            await asyncio.wait(set(self._bans), timeout=_CLOSE_WAIT)
        await self.admin.stop()
        if self.journal is not None:
            await asyncio.to_thread(stop_journal, self.settings, self.journal)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: wait, do not spin
                self.audit.error("accept.failed", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._handle(sock, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, sock: socket.socket, peer: tuple[Any, ...]) -> None:
        try:
            admitted = await self._admit(sock, peer)
        except asyncio.CancelledError:
            sock.close()
            raise
        if admitted is None:
            return
        number, address = admitted
        try:
            if self.pool is not None:
                if not self.pool.dispatch(sock, number, address):
                    sock.close()
                    self.admitted.release(number)
                    self._log_refusal(address, "no server worker available")
            elif self.sessions is not None:
                self.sessions.start(sock, address, lambda _address: self.admitted.release(number))
            else:
                sock.close()
                self.admitted.release(number)
        except BaseException as exc:  # the slot must come back whatever went wrong
            sock.close()
            self.admitted.release(number)
            if not isinstance(exc, Exception):
                raise
            self.audit.exception("connection.error", address=address, error=repr(exc))

    async def _admit(self, sock: socket.socket, peer: tuple[Any, ...]) -> tuple[int, str] | None:
        """(number, client address) if it may go on (it is then counted), else None (closed)."""
        address = normalize_peer_address(peer[0])
        if address in self.proxy_from:
            try:
                client = await read_proxy_header(sock, PROXY_HEADER_TIMEOUT)
            except (ProxyHeaderError, TimeoutError, OSError) as exc:
                self._log_refusal(address, f"PROXY: {exc}")
                sock.close()
                return None
            if client is None:  # the balancer's own health check
                sock.close()
                return None
            address = normalize_peer_address(client)
        try:
            refusal = await self.gate.admit(address)
        except Exception as exc:  # control DB unreachable: fail closed, keep serving others
            refusal = "registry unavailable"
            self.audit.error("registry.error", address=address, error=repr(exc))
        if refusal is not None:
            sock.close()
            self._log_refusal(address, refusal)
            return None
        metrics.connection_admitted()
        return self.admitted.hold(address), address

    # -- the defender -----------------------------------------------------------------------

    def failed_login(self, address: str, unknown_user: bool) -> None:
        """A connection ended without a login: score it (shared by every node, in the control
        DB, so in a thread); past the threshold, ban."""
        task = asyncio.ensure_future(self._score_failure(address, unknown_user))
        self._bans.add(task)
        task.add_done_callback(self._bans.discard)

    async def _score_failure(self, address: str, unknown_user: bool) -> None:
        try:
            ban = await asyncio.to_thread(self.defender.record_failure, address, unknown_user)
        except Exception as exc:
            self.audit.error("defender.error", address=address, error=repr(exc))
            return
        if ban is None:
            return
        self.audit.warning(
            "defender.ban",
            address=ban.address,
            score=ban.score,
            banned_until=ban.banned_until,
            reason=ban.reason,
        )

    def _log_refusal(self, address: str, reason: str) -> None:
        """Log a refused connection; repeats within REFUSAL_LOG_WINDOW are only counted.

        A banned or unknown address hammering the port must not fill the disk with lines.
        """
        metrics.connection_refused(reason)
        now = time.monotonic()
        key = (address, reason)
        since, repeated = self._refusals.get(key, (0.0, 0))
        if now - since < REFUSAL_LOG_WINDOW:
            self._refusals[key] = (since, repeated + 1)
            return
        if len(self._refusals) > 10_000:
            self._refusals.clear()
        self._refusals[key] = (now, 0)
        self.audit.warning(
            "connection.refused", address=address, reason=reason, repeated_before=repeated
        )
