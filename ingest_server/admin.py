"""The admin HTTP listener, in the server's listener process: ``GET /metrics``, ``GET /healthz``.

``[admin] host`` and ``port`` (default 127.0.0.1:9700; port 0: off). It has no
authentication: keep it on loopback or a management network.

- ``/metrics``: the Prometheus text exposition of every process of this node: the listener,
  the session workers and the loader's child processes each keep their counts in a file of
  one private folder (``ingest_core.metrics``), added up here at each scrape; with the feed
  figures read from the databases (``loader.feed_metrics``) and ``sis_ingest_serving``.
- ``/healthz``: a JSON object (node, status, listening, draining, workers_ready,
  workers_total, sessions, control_db, problems); 200 while the node takes new sessions
  (listening, at least one worker answering its pings, the control DB answering ``SELECT
  1``, not draining), 503 otherwise, ``problems`` saying why. From SIGTERM on it is 503
  (draining) while the sessions already there finish: a load balancer's HTTP check then
  sends new sessions to the other nodes. The DB is asked off the event loop, one question
  at a time, its answer kept ``DB_CHECK_CACHE`` seconds: a storm of checks costs nothing.

The folder is made (and ``PROMETHEUS_MULTIPROC_DIR`` set) when the :class:`AdminListener`
is made, before any worker or loader child starts; it is removed when the process exits.
A port that cannot be had is logged (``admin.failed``) and said on stderr, and the SFTP
service goes on without metrics: file transfers matter more than their figures, and the
monitoring sees the node as down.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from ingest_core import metrics
from ingest_core.db import open_control_db
from ingest_core.errors import ConfigError
from ingest_core.nodes import this_node
from ingest_core.settings import Settings

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
DB_CHECK_TIMEOUT = 2.0  # seconds the control DB has to answer SELECT 1
DB_CHECK_CACHE = 1.0  # seconds an answer is reused

Health = dict[str, Any]  # what /healthz says; "problems" empty: 200


class _ServingCollector:
    """``sis_ingest_serving``: 1 while /healthz says 200."""

    def __init__(self, serving: Callable[[], bool]) -> None:
        self.serving = serving

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily(
            "sis_ingest_serving",
            "1 while the server listens with its workers ready, 0 while starting or stopping",
            value=1 if self.serving() else 0,
        )


class AdminListener:
    """The metrics folder for this node's processes, and the HTTP listener that reads it."""

    def __init__(self, settings: Settings, audit: Any, collectors: Sequence[Any] = ()) -> None:
        self.settings = settings
        self.audit = audit
        self.collectors = tuple(collectors)  # more figures for a scrape (the loader's feeds)
        self.enabled = settings.admin.port != 0
        self.folder = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._serving: Callable[[], bool] = lambda: False
        self._health: Callable[[], Awaitable[Health]] = self._serving_only
        self._registry: Any = None
        if not self.enabled:
            return
        if settings.admin.port > 65535:
            raise ConfigError(
                f"{settings.source}: admin.port: expected a TCP port 1-65535 (0: no admin "
                f"listener), got {settings.admin.port!r}"
            )
        self.folder = tempfile.mkdtemp(prefix="sis-ingest-metrics-")
        atexit.register(shutil.rmtree, self.folder, True)
        metrics.use_process_folder(self.folder)

    def registry(self) -> Any:
        """What one scrape reads: every process's counts, the collectors given (the feeds),
        whether serving."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=self.folder)
        for collector in self.collectors:
            registry.register(collector)
        registry.register(_ServingCollector(self._serving))
        return registry

    async def start(
        self, serving: Callable[[], bool], health: Callable[[], Awaitable[Health]] | None = None
    ) -> None:
        """Listen (when enabled); ``health()`` answers /healthz (without it: ``serving()``),
        ``serving()`` the ``sis_ingest_serving`` gauge."""
        self._serving = serving
        self._health = health or self._serving_only
        if not self.enabled:
            return
        self._registry = self.registry()
        host, port = self.settings.admin.host, self.settings.admin.port
        try:
            self._server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            error = exc.strerror or str(exc)
            self.audit.error("admin.failed", host=host, port=port, error=error)
            print(
                f"sis-ingest: no metrics: cannot listen on {host}:{port} ({error}); choose "
                f"another `[admin] port` in {self.settings.source} (0: no admin listener)",
                file=sys.stderr,
                flush=True,
            )
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self.audit.info("admin.started", host=host, port=self.port)

    async def _serving_only(self) -> Health:
        serving = self._serving()
        return {
            "status": "serving" if serving else "not serving",
            "problems": [] if serving else ["not serving"],
        }

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, kind, body = await self._answer(head[:MAX_REQUEST_HEAD])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, kind, body = "400 Bad Request", TEXT, b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        except Exception as exc:  # a scrape must never take the listener down
            self.audit.exception("admin.error", error=repr(exc))
            status, kind, body = "500 Internal Server Error", TEXT, b"error\n"
        method = head.split(b" ", 1)[0]
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        if method != b"HEAD":
            writer.write(body)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        writer.close()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", TEXT, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", TEXT, b"GET or HEAD only\n"
        if target == b"/healthz":
            health = await self._health()
            status = "503 Service Unavailable" if health.get("problems") else "200 OK"
            return status, JSON, json.dumps(health).encode() + b"\n"
        if target == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            body = await asyncio.to_thread(generate_latest, self._registry)
            return "200 OK", CONTENT_TYPE_LATEST, body
        return "404 Not Found", TEXT, b"not found: GET /metrics or /healthz\n"


def serving(server: Any, stop: asyncio.Event) -> bool:
    """Whether ``server`` (an ``ingest_server.server.Server``) is serving: listening, not
    stopping, and (with workers) at least one worker ready and the pool not broken."""
    if stop.is_set() or not server.listening.is_set():
        return False
    pool = server.pool
    if pool is None:
        return True
    if pool.stopping or pool.broken.is_set():
        return False
    return any(w is not None and w.ready and not w.gone for w in pool.workers)


class ControlDbCheck:
    """Whether the control DB answers ``SELECT 1`` within ``DB_CHECK_TIMEOUT``: asked in a
    thread, one question at a time (a stuck one is not asked again until it returns), the
    answer reused for ``DB_CHECK_CACHE`` seconds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._asked_at = -DB_CHECK_CACHE
        self._problem: str | None = None
        self._question: asyncio.Future[None] | None = None

    def _ask(self) -> None:
        with open_control_db(self.url).engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    async def problem(self) -> str | None:
        """None when the DB answered, else what is wrong (never the URL: it may hold a
        password)."""
        if time.monotonic() - self._asked_at < DB_CHECK_CACHE:
            return self._problem
        if self._question is None or self._question.done():
            self._question = asyncio.ensure_future(asyncio.to_thread(self._ask))
            self._question.add_done_callback(_retrieve)  # also when nobody waits any more
        try:
            await asyncio.wait_for(asyncio.shield(self._question), DB_CHECK_TIMEOUT)
        except TimeoutError:
            self._problem = f"control DB: no answer within {DB_CHECK_TIMEOUT:.0f} s"
        except Exception as exc:
            self._problem = f"control DB unreachable ({type(exc).__name__})"
        else:
            self._problem = None
        self._asked_at = time.monotonic()
        return self._problem


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()


def _answering_workers(server: Any) -> tuple[int, int]:
    """(workers answering their pings recently, workers configured); the listener itself
    counts as the one worker when sessions run in it."""
    pool = server.pool
    if pool is None:
        return (1 if server.sessions is not None else 0), 1
    recent = server.settings.server.worker_heartbeat_timeout / 2  # two pings missed: not
    now = time.monotonic()
    answering = sum(
        1
        for w in pool.workers
        if w is not None and w.ready and not w.gone and now - w.last_heard <= recent
    )
    return answering, pool.size


async def node_health(server: Any, stop: asyncio.Event, control_db: ControlDbCheck) -> Health:
    """What /healthz says for ``server`` (an ``ingest_server.server.Server``)."""
    problems: list[str] = []
    listening = server.listening.is_set()
    draining = stop.is_set()
    if draining:
        problems.append("draining: stopping after SIGTERM, sessions there finish")
    elif not listening:
        problems.append("not listening yet")
    ready, total = _answering_workers(server)
    pool = server.pool
    if pool is not None and pool.broken.is_set():
        problems.append("server workers cannot be started")
    elif ready == 0:
        problems.append("no server worker answers")
    db_problem = await control_db.problem()
    if db_problem:
        problems.append(db_problem)
    status = "draining" if draining else ("not serving" if problems else "serving")
    return {
        "node": this_node(server.settings),
        "status": status,
        "listening": listening,
        "draining": draining,
        "workers_ready": ready,
        "workers_total": total,
        "sessions": len(server.admitted),
        "control_db": db_problem or "ok",
        "problems": problems,
    }
