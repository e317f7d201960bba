"""The admin HTTP listener, in the server's listener process: ``GET /metrics``, ``GET /healthz``.

``[admin] host`` and ``port`` (default 127.0.0.1:9700; port 0: off). It has no
authentication: keep it on loopback or a management network.

- ``/metrics``: the Prometheus text exposition of every process of this node: the listener,
  the session workers and the loader's child processes each keep their counts in a file of
  one private folder (``ingest_core.metrics``), added up here at each scrape; with the feed
  figures read from the databases (``loader.feed_metrics``) and ``sis_ingest_serving``.
- ``/healthz``: 200 ``ok`` while the server is serving (listening, its workers ready, not
  shutting down), 503 otherwise.

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
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from ingest_core import metrics
from ingest_core.errors import ConfigError
from ingest_core.settings import Settings

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 8192
TEXT = "text/plain; charset=utf-8"


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

    def __init__(self, settings: Settings, audit: Any) -> None:
        self.settings = settings
        self.audit = audit
        self.enabled = settings.admin.port != 0
        self.folder = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._serving: Callable[[], bool] = lambda: False
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
        """What one scrape reads: every process's counts, the feeds, whether serving."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from loader.feed_metrics import FeedCollector

        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=self.folder)
        registry.register(FeedCollector(self.settings))
        registry.register(_ServingCollector(self._serving))
        return registry

    async def start(self, serving: Callable[[], bool]) -> None:
        """Listen (when enabled); ``serving()`` answers /healthz."""
        self._serving = serving
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
            if self._serving():
                return "200 OK", TEXT, b"ok\n"
            return "503 Service Unavailable", TEXT, b"not serving\n"
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
