"""SSH sessions on admitted sockets: asyncssh, authentication, SFTP/SCP, graceful drain.

The listener (``server``) decides whether a TCP connection may proceed; a ``SessionHost``
runs what follows on that socket. With one server process both live in it; with
``[server] workers`` > 1 each worker process (``worker``) has its own ``SessionHost`` and the
listener hands it sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

import asyncssh

from ingest_core.db import open_control_db
from ingest_core.registry import Registry
from ingest_core.settings import Settings
from ingest_server.connection import ClientConnection, FailedLogin, ServerState
from ingest_server.host_keys import load_host_keys
from ingest_server.ledger import AccountLedger

_CLOSE_WAIT = 5.0
LINGER = 1.0


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


class SessionHost:
    """Runs asyncssh on each socket it is given and drains the sessions at shutdown."""

    def __init__(
        self, settings: Settings, audit: Any, failed_login: FailedLogin, ledger: AccountLedger
    ):
        self.settings = settings
        self.audit = audit
        db = open_control_db(settings.control_db_url)
        self.state = ServerState(
            settings=settings,
            registry=Registry(settings, db=db, actor="ingest-server"),
            failed_login=failed_login,
            audit=audit,
            ledger=ledger,
        )
        self._keypairs = [pair for pair, _ in host_keypairs(settings)]
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, sock: socket.socket, address: str, closed: Callable[[str], None]) -> None:
        """Serve ``sock`` in a task of its own; ``closed(address)`` runs when it ends."""
        if not self.state.tracker.accepting:  # handed over while shutting down
            sock.close()
            closed(address)
            return
        task = asyncio.create_task(self._run(sock, address, closed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sock: socket.socket, address: str, closed: Callable[[str], None]) -> None:
        try:
            conn = await asyncssh.run_server(sock, **self._options(address))
            await conn.wait_closed()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            # Failed logins are logged by ClientConnection; this is the SSH layer's reason.
            self.audit.debug("connection.ended", address=address, error=str(exc))
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # a bug must cost one connection, never the others
            sock.close()
            self.audit.exception("connection.error", address=address, error=repr(exc))
        finally:
            closed(address)

    def _options(self, address: str) -> dict[str, Any]:
        s = self.settings.server
        state = self.state
        sig_algs = ["rsa-sha2-512", "rsa-sha2-256", "ssh-ed25519"]
        if s.allow_sha1_rsa_signatures:
            sig_algs.append("ssh-rsa")

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
            # Sessions (SFTP, SCP, refused shells) come from ClientConnection.session_requested,
            # which counts them against the connection's and the account's budgets.
        }

    async def shut_down(self) -> None:
        """Refuse new uploads, close idle sessions, give uploads in flight the grace period,
        then close the rest (their temporary files are removed)."""
        tracker = self.state.tracker
        tracker.accepting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_grace
        in_flight = tracker.total()
        self.audit.info("server.stopping", uploads_in_flight=in_flight, pid=os.getpid())
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
        tracker.discard_all()
        if cut:
            self.audit.warning("server.uploads_cut", count=cut)
