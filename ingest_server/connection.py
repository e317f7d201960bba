"""One client connection's policy: who may log in, with which key, and what it may open.

Public key only. The key must be registered to the account named by the user name, the
account active, the client's address on *that* account's allowlist, and the key must still
pass the key policy. Unknown users and wrong keys get the same answer. Everything except the
SFTP subsystem and SCP is refused: shells and commands get one line saying so.

After login the connection lives within its :class:`SessionBudget` (channels, open files,
unflushed bytes), the account within its share of the ledger (sessions at once), and a
connection that makes no request for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from ingest_core import metrics
from ingest_core.folders import account_folder
from ingest_core.policy import key_refusal
from ingest_core.registry import LoginView, Registry
from ingest_core.repeated_events import RepeatedEvents
from ingest_core.settings import Settings
from ingest_server.ledger import AccountLedger
from ingest_server.session_budget import BudgetExceeded, Held, SessionBudget
from ingest_server.sftp import AccountSFTPServer, UploadTracker
from ingest_server.sftp_compat import WriteTrailerTolerance, needs_trimming

SERVICE_ONLY_MESSAGE = "This service accepts SFTP and SCP only."
SHA2_RSA_SIGNATURES = frozenset({b"rsa-sha2-256", b"rsa-sha2-512"})
_KEY_CACHE_MAX = 4096
QUICKACK_INTERVAL = 0.004  # seconds between re-arms: the longest a handshake ACK now waits
QUICKACK_LIMIT = 2.0  # seconds: a client slower than this to log in pays the delayed ACKs


class HandshakeAcks:
    """Re-arm TCP_QUICKACK on a connection's socket until its login is over.

    OpenSSH clients leave Nagle on for non-interactive sessions, so a small packet that
    follows an unacknowledged one (after KEXINIT, after NEWKEYS) waits for our delayed ACK:
    two ~40 ms stalls per login. Setting TCP_QUICKACK (Linux) sends a pending delayed ACK at
    once and leaves the kernel's "interactive" mode, but only until we next send data, so it
    is set again every QUICKACK_INTERVAL while the handshake and authentication run.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.sock = sock
        self.loop = loop
        self.deadline = loop.time() + QUICKACK_LIMIT
        self.timer: asyncio.TimerHandle | None = None
        self.rearm()

    @classmethod
    def start(cls, conn: asyncssh.SSHServerConnection) -> HandshakeAcks | None:
        """Start on a TCP connection on Linux; None where there is nothing to do."""
        sock = conn.get_extra_info("socket")
        if not hasattr(socket, "TCP_QUICKACK") or sock is None:
            return None
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return cls(sock, asyncio.get_running_loop())

    def rearm(self) -> None:
        self.timer = None
        if self.loop.time() > self.deadline:
            return
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # the socket is gone: nothing left to acknowledge
            return
        self.timer = self.loop.call_later(QUICKACK_INTERVAL, self.rearm)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class KeyCache:
    """Registered key text -> parsed key, so each key is parsed once per process."""

    def __init__(self) -> None:
        self._keys: dict[str, asyncssh.SSHKey | None] = {}

    def get(self, text: str) -> asyncssh.SSHKey | None:
        if text not in self._keys:
            if len(self._keys) >= _KEY_CACHE_MAX:
                self._keys.clear()
            try:
                self._keys[text] = asyncssh.import_public_key(text)
            except (asyncssh.KeyImportError, ValueError):
                self._keys[text] = None
        return self._keys[text]


# Told about each connection that ended without a login: (address, unknown user name?).
# The listener's defender scores it, whichever process the connection ran in.
FailedLogin = Callable[[str, bool], None]


@dataclass
class ServerState:
    """What every connection of one server process shares."""

    settings: Settings
    registry: Registry
    failed_login: FailedLogin
    audit: Any
    ledger: AccountLedger
    tracker: UploadTracker = field(default_factory=UploadTracker)
    keys: KeyCache = field(default_factory=KeyCache)
    connections: set[asyncssh.SSHServerConnection] = field(default_factory=set)


class ClientConnection(asyncssh.SSHServer):
    """asyncssh's per-connection hooks, answered from the registry at each login."""

    def __init__(self, state: ServerState, address: str):
        self.state = state
        self.address = address
        self.conn: asyncssh.SSHServerConnection | None = None
        self.username = ""
        self.view: LoginView | None = None
        self.refused_keys: set[str] = set()
        self.failures: list[str] = []
        self.accepted_fingerprint: str | None = None
        self.authenticated = False
        self.registry_failed = False  # not the client's fault: no defender score
        self.started = time.monotonic()
        self.handshake_acks: HandshakeAcks | None = None
        self.budget = SessionBudget(state.settings)
        self.repeats = RepeatedEvents(state.audit, state.settings.logs.repeat_window_seconds)
        self._admission: asyncio.Future[bool] | None = None  # this login's session slot
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.state.connections.add(conn)
        self.handshake_acks = HandshakeAcks.start(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_acks is not None:
            self.handshake_acks.stop()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.conn is not None:
            self.state.connections.discard(self.conn)
        self._release_session_slot()
        self.repeats.flush()
        audit = self.state.audit
        if self.authenticated:
            metrics.session_ended()
            audit.info(
                "session.end",
                account=self.username,
                address=self.address,
                seconds=round(time.monotonic() - self.started, 3),
            )
            return
        if self.accepted_fingerprint and not self.failures:
            # The key was acceptable but the signature was not: a SHA-1 `ssh-rsa` signature
            # (refused unless server.allow_sha1_rsa_signatures) or a bad one.
            self._fail(self.accepted_fingerprint, "signature refused (SHA-1 or invalid)")
        metrics.login_failed(self.failures)
        if not self.failures or self.registry_failed:
            return
        self.state.failed_login(self.address, self.view is None)

    # -- authentication -------------------------------------------------------------------

    async def begin_auth(self, username: str) -> bool:
        self.username = username
        try:
            self.view = await asyncio.to_thread(self.state.registry.login_view, username)
        except Exception as exc:  # control DB unreachable: nobody logs in, nothing crashes
            self.view = None
            self.registry_failed = True
            self.state.audit.error("registry.error", account=username, error=repr(exc))
        return True  # always ask for a key: unknown users look like known ones

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        # Past max_auth_attempts refused keys, no method is left and the client must go.
        return len(self.refused_keys) < self.state.settings.server.max_auth_attempts

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        fingerprint = key.get_fingerprint("sha256")
        if fingerprint in self.refused_keys:
            return False
        reason = self._refusal(key)
        if reason is not None:
            self.refused_keys.add(fingerprint)
            self._fail(fingerprint, reason)
            return False
        if key.algorithm == b"ssh-rsa" and not self.state.settings.server.allow_sha1_rsa_signatures:
            # asyncssh checks the client's signature algorithm against this key's
            # all_sig_algorithms in SSHKey.verify(); narrowing it on this key object (a fresh
            # one per request) refuses SHA-1 `ssh-rsa` signatures. Pinned by a paramiko test.
            key.all_sig_algorithms = set(SHA2_RSA_SIGNATURES)
        self.accepted_fingerprint = fingerprint
        return True

    def _refusal(self, key: asyncssh.SSHKey) -> str | None:
        view = self.view
        if self.registry_failed:
            return "registry unavailable"
        if view is None:
            return "unknown account"
        if not view.active:
            return "account disabled"
        if self.address not in view.ips:
            return "address not allowed for this account"
        policy = key_refusal(key, self.state.settings.keys)
        if policy is not None:
            return f"key refused by policy: {policy}"
        for text in view.public_keys:
            registered = self.state.keys.get(text)
            if registered is not None and registered.public_data == key.public_data:
                if view.key_expired(text, self.state.settings.keys.max_age_days):
                    return "key expired"
                return None
        return "key not registered to this account"

    def _fail(self, fingerprint: str, reason: str) -> None:
        self.failures.append(reason)
        self.state.audit.warning(
            "auth.failure",
            account=self.username,
            address=self.address,
            fingerprint=fingerprint,
            reason=reason,
        )

    def auth_completed(self) -> None:
        self.authenticated = True
        if self.handshake_acks is not None:
            self.handshake_acks.stop()
            self.handshake_acks = None  # an idle session keeps nothing of it
        self.state.audit.info(
            "auth.success",
            account=self.username,
            address=self.address,
            fingerprint=self.accepted_fingerprint,
        )
        metrics.login_succeeded(self.username)
        # The account's session slot is asked for now; channels wait for the answer.
        self._admission = asyncio.ensure_future(self.state.ledger.open_session(self.username))
        self.budget.touch()
        self._arm_idle_timer()

    def _release_session_slot(self) -> None:
        """Give the account's session slot back, exactly once, even if the answer to the
        request for it is still on its way."""
        admission, self._admission = self._admission, None
        if admission is None:
            return
        ledger, account = self.state.ledger, self.username

        def give_back(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                ledger.close_session(account)

        if admission.done():
            give_back(admission)
        else:
            admission.add_done_callback(give_back)

    # -- after login: idle connections, channels --------------------------------------------

    def _arm_idle_timer(self) -> None:
        timeout = self.state.settings.server.idle_timeout
        if timeout and self.conn is not None:
            delay = max(timeout - self.budget.idle_for(), 0.0) + 0.05
            self._idle_timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle_timer = None
        timeout = self.state.settings.server.idle_timeout
        if self.budget.idle_for() < timeout:
            self._arm_idle_timer()
            return
        self.state.audit.info(
            "session.idle_closed",
            account=self.username,
            address=self.address,
            idle_seconds=round(self.budget.idle_for(), 1),
            channels=self.budget.channels,
        )
        if self.conn is not None:
            self.conn.close()

    def session_requested(self) -> Any:
        """An SFTP or SCP session (or a shell, which is refused with one line): counted
        against the connection's channels and the account's sessions."""
        try:
            held = self.budget.open_channel()
        except BudgetExceeded as exc:
            metrics.limit_hit("max_channels_per_connection")
            self._refuse("session beyond max_channels_per_connection")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, str(exc)
            ) from None
        return self._admitted_session(held)

    async def _admitted_session(self, held: Held) -> asyncssh.SSHServerProcess[Any]:
        admitted = False
        try:
            if self._admission is not None:
                admitted = await asyncio.shield(self._admission)
        except Exception as exc:  # the ledger could not answer: refuse, keep serving others
            self.state.audit.error("ledger.error", account=self.username, error=repr(exc))
        if not admitted:
            held.release()
            limit = self.state.settings.limits.max_sessions_per_account
            metrics.limit_hit("max_sessions_per_account")
            self._refuse("session beyond max_sessions_per_account")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"too many sessions for this account: at most {limit} at once; "
                "try again when one has ended",
            )
        client = str(self.conn.get_extra_info("client_version") or "") if self.conn else ""
        session = _TolerantSession if needs_trimming(client) else _CountedSession
        return session(held, self._refuse_process, self._sftp_server)

    def _sftp_server(self, chan: asyncssh.SSHServerChannel) -> AccountSFTPServer:
        state = self.state
        return AccountSFTPServer(
            chan,
            settings=state.settings,
            folder=account_folder(state.settings, self.username),
            address=self.address,
            audit=state.audit,
            tracker=state.tracker,
            budget=self.budget,
            ledger=state.ledger,
            repeats=self.repeats,
        )

    def _refuse_process(self, process: asyncssh.SSHServerProcess[Any]) -> None:
        """A shell, a command other than scp, or another subsystem: one line, exit 1."""
        command = process.command
        self._refuse(f"command {command!r}" if command else process.subsystem or "shell")
        process.stderr.write(SERVICE_ONLY_MESSAGE + "\r\n")
        process.exit(1)

    # -- what an authenticated client may open --------------------------------------------

    def _refuse(self, what: str) -> bool:
        self.state.audit.warning(
            "channel.refused", account=self.username, address=self.address, request=what
        )
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        return self._refuse("local port forwarding")

    def server_requested(self, listen_host: str, listen_port: int):
        return self._refuse("remote port forwarding")

    def unix_connection_requested(self, dest_path: str):
        return self._refuse("unix socket forwarding")

    def unix_server_requested(self, listen_path: str):
        return self._refuse("unix socket forwarding")

    def tun_requested(self, unit: int | None):
        return self._refuse("tun forwarding")

    def tap_requested(self, unit: int | None):
        return self._refuse("tap forwarding")


class _CountedSession(asyncssh.SSHServerProcess):  # type: ignore[type-arg]
    """asyncssh's own SFTP/SCP session, extended to give its channel back to the
    connection's budget when it closes (for any reason, exactly once)."""

    def __init__(
        self,
        held: Held,
        refuse: Callable[[asyncssh.SSHServerProcess[Any]], None],
        sftp_factory: Callable[[asyncssh.SSHServerChannel], AccountSFTPServer],
    ):
        super().__init__(refuse, sftp_factory, asyncssh.sftp.MIN_SFTP_VERSION, True)
        self.held = held

    def connection_lost(self, exc: Exception | None) -> None:
        self.held.release()
        super().connection_lost(exc)


class _TolerantSession(WriteTrailerTolerance, _CountedSession):
    """The same, for Go clients (rclone) whose last WRITE of a file carries stale bytes after
    its data: the others do not pay for the scan on every packet."""
