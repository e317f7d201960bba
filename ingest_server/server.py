"""The server's lifecycle: listen, accept, gate, hand over to asyncssh, shut down gracefully.

We accept TCP connections ourselves (not ``asyncssh.listen``) so that the IP gate, the
defender, connection limits and an optional PROXY protocol header are all dealt with before
asyncssh writes its banner; each admitted socket then goes to ``asyncssh.run_server``.

Shutdown (``stop`` set, e.g. by SIGTERM): stop accepting, refuse new uploads, close idle
sessions, let uploads in flight finish for ``server.shutdown_grace`` seconds, then close the
rest (their temporary files are removed) and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import asyncssh

from ingest_core.db import close_all, open_control_db
from ingest_core.folders import UPLOAD_TEMP_PREFIX, account_folder, accounts_root
from ingest_core.lifecycle import loop_name, run_until_signalled
from ingest_core.policy import normalize_peer_address
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger
from ingest_server.connection import ClientConnection, ServerState, refusing_session
from ingest_server.defender import Defender
from ingest_server.gate import ConnectionGate
from ingest_server.host_keys import HOST_KEY_FILES, ensure_host_keys, load_host_keys
from ingest_server.proxy_protocol import ProxyHeaderError, read_proxy_header
from ingest_server.sftp import AccountSFTPServer

PROXY_HEADER_TIMEOUT = 5.0
STALE_TEMP_SECONDS = 3600
_CLOSE_WAIT = 5.0
LINGER = 1.0
REFUSAL_LOG_WINDOW = 10.0


def host_keypairs(settings: Settings) -> list[tuple[asyncssh.SSHKeyPair, str]]:
    """Host keys parsed once, each offering only the host key algorithms the settings allow.

    Trimming ``host_key_algorithms`` on the loaded key pair is how the RSA host key stops
    advertising SHA-1 ``ssh-rsa`` (``listen()`` has no option for it); a test pins it.
    """
    allowed = [a.encode() for a in settings.server.host_key_algs]
    pairs = []
    for key in load_host_keys(settings.server.host_key_dir):
        (pair,) = asyncssh.load_keypairs(key)
        pair.host_key_algorithms = [a for a in pair.host_key_algorithms if a in allowed]
        if pair.host_key_algorithms:
            pairs.append((pair, key.get_fingerprint("sha256")))
    if not pairs:
        raise asyncssh.KeyImportError("no host key matches server.host_key_algs")
    return pairs


def remove_stale_uploads(settings: Settings, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Temporary upload files left by a crashed server (not touched for an hour)."""
    removed = 0
    now = time.time()
    root = accounts_root(settings)
    if not root.is_dir():
        return 0
    for entry in root.iterdir():
        folder = account_folder(settings, entry.name)
        if not folder.root.is_dir():
            continue
        for path in folder.root.glob(f"{UPLOAD_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime > older_than:
                    path.unlink()
                    removed += 1
    return removed


class Server:
    """One server process: its listener, its connections and their shared state."""

    def __init__(self, settings: Settings, reuse_port: bool = False):
        self.settings = settings
        self.reuse_port = reuse_port
        self.audit = get_logger(settings.log_dir, "server", pid=os.getpid())
        db = open_control_db(settings.control_db_url)
        self.state = ServerState(
            settings=settings,
            registry=Registry(settings, db=db, actor="ingest-server"),
            defender=Defender(settings.defender, db),
            audit=self.audit,
        )
        self.gate = ConnectionGate(settings.limits, self.state.registry, self.state.defender)
        self.proxy_from = {normalize_peer_address(a) for a in settings.server.proxy_protocol_from}
        self.listening = asyncio.Event()
        self.port = settings.server.port
        self._tasks: set[asyncio.Task[None]] = set()
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self._keypairs: list[asyncssh.SSHKeyPair] = []

    # -- lifecycle ------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully and return."""
        s = self.settings.server
        if not all((s.host_key_dir / n).exists() for n in HOST_KEY_FILES.values()):
            ensure_host_keys(s.host_key_dir)  # first start without `ingestctl init`
        pairs = host_keypairs(self.settings)
        self._keypairs = [pair for pair, _ in pairs]
        removed = remove_stale_uploads(self.settings)
        listener = socket.create_server(
            (s.host, s.port),
            family=socket.AF_INET6 if ":" in s.host else socket.AF_INET,
            backlog=512,
            reuse_port=self.reuse_port,
        )
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
            stale_uploads_removed=removed,
            event_loop=loop_name(asyncio.get_running_loop()),
        )
        for item in fingerprints:
            print(
                f"sis-ingest server on {s.host}:{self.port}: host key {item['algorithm']} "
                f"{item['fingerprint']}",
                file=sys.stderr,
                flush=True,
            )
        accepting = asyncio.create_task(self._accept(listener))
        self.listening.set()
        try:
            await stop.wait()
        finally:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            listener.close()
            await self._shut_down()
            self.audit.info("server.stopped", port=self.port)

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
        address = normalize_peer_address(peer[0])
        if address in self.proxy_from:
            try:
                client = await read_proxy_header(sock, PROXY_HEADER_TIMEOUT)
            except (ProxyHeaderError, TimeoutError, OSError) as exc:
                self._log_refusal(address, f"PROXY: {exc}")
                sock.close()
                return
            if client is None:  # the balancer's own health check
                sock.close()
                return
            address = normalize_peer_address(client)
        try:
            refusal = await self.gate.admit(address)
        except Exception as exc:  # control DB unreachable: fail closed, keep serving others
            refusal = "registry unavailable"
            self.audit.error("registry.error", address=address, error=repr(exc))
        if refusal is not None:
            sock.close()
            self._log_refusal(address, refusal)
            return
        try:
            conn = await asyncssh.run_server(sock, **self._options(address))
            await conn.wait_closed()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            # Failed logins are logged by ClientConnection; this is the SSH layer's reason.
            self.audit.debug("connection.ended", address=address, error=str(exc))
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # a bug must cost one connection, never the accept loop
            sock.close()
            self.audit.exception("connection.error", address=address, error=repr(exc))
        finally:
            self.gate.release(address)

    def _log_refusal(self, address: str, reason: str) -> None:
        """Log a refused connection; repeats within REFUSAL_LOG_WINDOW are only counted.

        A banned or unknown address hammering the port must not fill the disk with lines.
        """
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

    def _options(self, address: str) -> dict[str, Any]:
        s = self.settings.server
        state = self.state
        sig_algs = ["rsa-sha2-512", "rsa-sha2-256", "ssh-ed25519"]
        if s.allow_sha1_rsa_signatures:
            sig_algs.append("ssh-rsa")

        def sftp_factory(chan: asyncssh.SSHServerChannel) -> AccountSFTPServer:
            name = chan.get_connection().get_extra_info("username")
            return AccountSFTPServer(
                chan,
                settings=self.settings,
                folder=account_folder(self.settings, name),
                address=address,
                audit=self.audit,
                tracker=state.tracker,
            )

        return {
            "server_factory": lambda: ClientConnection(state, address),
            "server_host_keys": self._keypairs,
            "server_version": s.server_version,
            "kex_algs": s.kex_algs,
            "encryption_algs": s.encryption_algs,
            "mac_algs": s.mac_algs,
            "compression_algs": ["none"],
            "signature_algs": sig_algs,
            "gss_host": None,
            "gss_kex": False,
            "gss_auth": False,
            "host_based_auth": False,
            "kbdint_auth": False,
            "password_auth": False,
            "public_key_auth": True,
            "login_timeout": s.login_timeout,
            "keepalive_interval": 60,
            "keepalive_count_max": 3,
            "allow_pty": False,
            "agent_forwarding": False,
            "x11_forwarding": False,
            "sftp_factory": sftp_factory,
            "allow_scp": True,
            "session_factory": refusing_session(self.audit, address),
        }

    async def _shut_down(self) -> None:
        tracker = self.state.tracker
        tracker.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_grace
        in_flight = tracker.total()
        self.audit.info("server.stopping", uploads_in_flight=in_flight)
        # A connection idle now is closed now; one that finishes its upload gets a moment
        # (LINGER) to read the reply and end its session itself, so its client sees success.
        busy_at_start = {c for c in self.state.connections if tracker.busy(c)}
        idle_since: dict[Any, float] = {}
        while True:
            now = loop.time()
            for conn in list(self.state.connections):
                if tracker.busy(conn):
                    idle_since.pop(conn, None)
                elif conn not in busy_at_start or now - idle_since.setdefault(conn, now) > LINGER:
                    conn.close()
            remaining = deadline - now
            if not (self.state.connections & busy_at_start) or remaining <= 0:
                break
            tracker.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tracker.changed.wait(), min(remaining, 0.2))
        cut = tracker.total()
        for conn in list(self.state.connections):
            conn.close()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=_CLOSE_WAIT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self.state.background:  # bans being written
            await asyncio.wait(set(self.state.background), timeout=_CLOSE_WAIT)
        tracker.discard_all()
        if cut:
            self.audit.warning("server.uploads_cut", count=cut)


def _serve_until_signalled(settings: Settings, reuse_port: bool) -> None:
    run_until_signalled(
        Server(settings, reuse_port=reuse_port).serve, event_loop=settings.server.event_loop
    )


def run_server(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; returns 0 after a clean shutdown.

    With ``server.workers`` > 1, that many processes share the port (SO_REUSEPORT) and the
    kernel spreads connections over them; this process only forwards signals and waits.
    Connection limits then count per worker.
    """
    workers = settings.server.workers
    if workers == 1:
        _serve_until_signalled(settings, reuse_port=False)
        return 0
    close_all()  # never share DB connections across fork
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                _serve_until_signalled(settings, reuse_port=True)
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    return _supervise(children)


def _supervise(children: list[int]) -> int:
    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous: dict[int, Callable[..., Any] | int | None] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, forward)
    worst = 0
    for pid in children:
        while True:
            try:
                _pid, status = os.waitpid(pid, 0)
                break
            except ChildProcessError:
                status = 0
                break
            except InterruptedError:
                continue
        worst = max(worst, os.waitstatus_to_exitcode(status) if status else 0)
    return 1 if worst else 0
