"""The five classified failures (the wording hosted push services use), each with the concrete
cause, and the agent's own three (a full local disk, a pool file not published yet, an agent
stopped in the middle of a run).

Every way a test or a transfer can fail ends as exactly one :class:`Failure`: the
message (so an operator sees the sentence they were trained on) plus one line of cause naming
the host, path or error that actually happened. Only "Intersect" is replaced by this agent.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from enum import StrEnum

import asyncssh


class Category(StrEnum):
    AUTHENTICATION = "authentication"
    PORT_REFUSED = "port-refused"
    UNREACHABLE = "unreachable"
    NEW_FINGERPRINT = "new-fingerprint"
    TRANSFER = "transfer"
    # The agent's own: not a connection problem, so not one of the five hosted messages.
    LOCAL_DISK = "local-disk-full"
    POOL_MISSING = "pool-missing"
    AGENT_STOPPED = "agent-stopped"


MESSAGES = {
    Category.AUTHENTICATION: "Authentication failed. Check that the host and connection "
    "credentials are correct. If you are using an SSH Public Key, ensure it is installed on "
    "your SFTP server.",
    Category.PORT_REFUSED: "Port was refused. Check that the port number is correct.",
    Category.UNREACHABLE: "The host can't be reached. Check that the host is correct, your SFTP "
    "server is accepting connections, or add this agent's public IPs to your IP Whitelist.",
    Category.NEW_FINGERPRINT: "New fingerprint detected.",
    Category.TRANSFER: "Connection or transfer failed. Possible reasons include a network "
    "connection interruption, insufficient SFTP server path permissions, no space on the SFTP "
    "server, attempting to transfer to a forbidden or non-existent directory, or some other "
    "scenario.",
    Category.LOCAL_DISK: "This computer's disk is full. Nothing was sent and the since-date did "
    "not move: free some space on the disk named below, then run again (or wait for the next "
    "scheduled run, which sends the same data).",
    Category.POOL_MISSING: "The pool file is not on the SFTP server (not published yet?). "
    "Whatever this run had to send was sent; the pool file is fetched again at the next run.",
    Category.AGENT_STOPPED: "The agent stopped in the middle of this run (its process was killed "
    "or the computer went down). Check why it stopped (out of memory, a reboot, a service "
    "manager) so that it does not happen every night.",
}

# Where a session was when it failed: decides what a dropped connection or a timeout means.
STAGE_RESOLVE = "resolve"
STAGE_CONNECT = "connect"  # TCP not yet established
STAGE_GREETING = "greeting"  # TCP up, no host key seen yet (no SSH greeting and key exchange)
STAGE_AUTH = "auth"  # host key accepted, authenticating
STAGE_SFTP = "sftp"  # logged in


@dataclass(frozen=True)
class Failure:
    """One classified failure: its message and what actually went wrong."""

    category: Category
    cause: str
    # Worth another attempt inside the same run (the server may be back in a minute).
    transient: bool = False

    @property
    def message(self) -> str:
        return MESSAGES[self.category]

    def __str__(self) -> str:
        return f"{self.message} Cause: {self.cause}"


class PushFailure(Exception):
    """Raised with a classified failure; ``str()`` is the message and the cause."""

    def __init__(
        self, failure: Failure, fingerprint: str | None = None, key_type: str | None = None
    ):
        super().__init__(str(failure))
        self.failure = failure
        # The host key the server presented (fingerprint and type, e.g. ssh-ed25519), when
        # the session got that far.
        self.fingerprint = fingerprint
        self.key_type = key_type


def fail(category: Category, cause: str, transient: bool = False) -> PushFailure:
    return PushFailure(Failure(category, cause, transient))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.SFTPError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def classify(
    exc: BaseException, stage: str, host: str, port: int, timeout: float | None = None
) -> Failure:
    """Map an exception raised at ``stage`` of a session to one of the five failures."""
    where = f"{host}:{port}"
    if isinstance(exc, PushFailure):
        return exc.failure
    if isinstance(exc, socket.gaierror):
        return Failure(
            Category.UNREACHABLE, f"the host name {host!r} does not resolve ({_reason(exc)})", True
        )
    if isinstance(exc, ConnectionRefusedError):
        return Failure(Category.PORT_REFUSED, f"{where} refused the TCP connection", True)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return Failure(Category.NEW_FINGERPRINT, f"{where}: {_reason(exc)}")
    if isinstance(exc, asyncssh.PermissionDenied):
        return Failure(
            Category.AUTHENTICATION, f"{where} rejected the credentials ({_reason(exc)})"
        )
    if isinstance(exc, TimeoutError):
        waited = f" within {timeout:g} s" if timeout else ""
        if stage in (STAGE_RESOLVE, STAGE_CONNECT):
            return Failure(Category.UNREACHABLE, f"no TCP connection to {where}{waited}", True)
        if stage == STAGE_GREETING:
            return Failure(
                Category.UNREACHABLE,
                f"{where} accepted the TCP connection but sent no SSH greeting{waited}",
                True,
            )
        return Failure(Category.TRANSFER, f"{where} stopped answering{waited}", True)
    if isinstance(exc, OSError) and exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EADDRNOTAVAIL,
        errno.EHOSTDOWN,
    ):
        return Failure(Category.UNREACHABLE, f"no route to {where} ({_reason(exc)})", True)
    dropped = (
        asyncssh.ConnectionLost,
        asyncssh.DisconnectError,
        ConnectionResetError,
        ConnectionAbortedError,
        BrokenPipeError,
        EOFError,
    )
    if isinstance(exc, dropped):
        if stage in (STAGE_CONNECT, STAGE_GREETING):
            # The peer closed before any SSH byte: an address allow-list or firewall that drops
            # this agent's IP looks exactly like this; hosted services file it under this message.
            return Failure(
                Category.UNREACHABLE,
                f"{where} closed the connection before the SSH greeting ({_reason(exc)}); "
                "the server may not allow this agent's IP address",
                True,
            )
        if stage == STAGE_AUTH and isinstance(exc, asyncssh.DisconnectError):
            return Failure(
                Category.AUTHENTICATION, f"{where} disconnected during login ({_reason(exc)})"
            )
        return Failure(Category.TRANSFER, f"connection interrupted ({_reason(exc)})", True)
    if isinstance(exc, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath):
        return Failure(Category.TRANSFER, f"no such file or directory ({_reason(exc)})")
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return Failure(Category.TRANSFER, f"permission denied ({_reason(exc)})")
    if isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem | asyncssh.SFTPQuotaExceeded):
        return Failure(Category.TRANSFER, f"no space on the SFTP server ({_reason(exc)})")
    if isinstance(exc, asyncssh.SFTPError | asyncssh.Error):
        return Failure(Category.TRANSFER, _reason(exc))
    if isinstance(exc, OSError):
        return Failure(Category.TRANSFER, f"{_reason(exc)}", True)
    return Failure(Category.TRANSFER, f"{type(exc).__name__}: {exc}")
