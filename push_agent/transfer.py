"""SFTP sessions to any standard server: pinned host keys, atomic uploads and downloads.

A session knows how far it got (TCP, SSH greeting, login) so a failure can be classified:
a peer that drops the TCP connection before its greeting is an allow-list or firewall, one
that drops it after login is an interrupted transfer. Uploads go to a hidden temporary name,
are renamed into place (posix-rename when the server offers it) and their size is verified;
downloads go the same way in the other direction.

Host keys: the agent asks for them in OpenSSH's order (Ed25519 first, RSA last), so it meets
the key ``ingestctl hostkey show`` lists first. A server may hold one host key per type; when
the key it offers is not the confirmed one, the agent asks the same server for its other key
types, one new connection each, before it calls the key changed. The session only goes on
over a connection whose key exchange the server signed with the confirmed key.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from ingest_core.durable_files import rename_into_place
from push_agent.failures import (
    STAGE_AUTH,
    STAGE_CONNECT,
    STAGE_GREETING,
    STAGE_RESOLVE,
    STAGE_SFTP,
    Category,
    Failure,
    PushFailure,
    classify,
    fail,
)

PROBE_BYTES = b"ingest-push write probe\n"
# A downloaded pool file holds personal identifiers: owner read-write, group read (as the
# server's files), whatever the umask; its folder, when the agent creates it, 0750.
POOL_FILE_MODE = 0o640
POOL_DIR_MODE = 0o750

# OpenSSH's default HostKeyAlgorithms order (ssh_config(5)), plain keys only: a host
# certificate would be checked against a CA, and a pin is the fingerprint of a plain key (a
# server with a certificate holds the plain key as well). ssh-rsa (SHA-1 signatures), gone
# from OpenSSH's default list since 8.8, stays last so old servers keep working.
HOST_KEY_ALGORITHMS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
)
# Signature algorithms that all use one RSA key (key type ssh-rsa).
RSA_SIGNATURES = frozenset({"rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"})
KEY_TYPE_NAMES = {
    "ssh-ed25519": "Ed25519",
    "ssh-rsa": "RSA",
    "ecdsa-sha2-nistp256": "ECDSA P-256",
    "ecdsa-sha2-nistp384": "ECDSA P-384",
    "ecdsa-sha2-nistp521": "ECDSA P-521",
    "sk-ssh-ed25519@openssh.com": "Ed25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}


@dataclass(frozen=True)
class HostKey:
    """A host key a server presented: its type (``ssh-ed25519``, ``ssh-rsa``...) and its
    SHA256 fingerprint; ``str()`` is both, as ``ssh-keygen -l`` and known_hosts put them."""

    key_type: str
    fingerprint: str

    @property
    def name(self) -> str:
        """The type in words: Ed25519, RSA, ECDSA P-256..."""
        return KEY_TYPE_NAMES.get(self.key_type, self.key_type)

    def __str__(self) -> str:
        return f"{self.key_type} {self.fingerprint}"


def key_type_of(algorithm: str) -> str:
    """The key type a host key algorithm uses (the three RSA signatures share one key)."""
    return "ssh-rsa" if algorithm in RSA_SIGNATURES else algorithm


def host_key_algorithms(skip_types: Collection[str] = ()) -> list[str]:
    """The algorithms to offer, in preference order, without keys of ``skip_types``."""
    try:
        from asyncssh.public_key import get_public_key_algs

        supported = {alg.decode("ascii") for alg in get_public_key_algs()}
    except ImportError:  # pragma: no cover - older asyncssh: trust the list
        supported = set(HOST_KEY_ALGORITHMS)
    return [
        alg
        for alg in HOST_KEY_ALGORITHMS
        if alg in supported and key_type_of(alg) not in skip_types
    ]


@dataclass(frozen=True)
class Endpoint:
    """Where and how to log in. ``expected_fingerprint`` None accepts any host key."""

    host: str
    port: int
    username: str
    password: str | None
    key_path: Path | None
    expected_fingerprint: str | None
    timeout: float
    bind_address: str | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def is_invalid_name(host: str) -> bool:
    """RFC 6761 section 6.4: names under .invalid never resolve; answer without asking DNS."""
    return host.rstrip(".").lower().split(".")[-1] == "invalid"


class _SessionWatcher(asyncssh.SSHClient):
    """Records how far the session got and which host key the server presented."""

    def __init__(self, expected: str | None):
        self.expected = expected
        self.presented: HostKey | None = None
        self.stage = STAGE_RESOLVE

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.stage = STAGE_GREETING

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = HostKey(key.get_algorithm(), key.get_fingerprint("sha256"))
        self.stage = STAGE_AUTH
        return self.expected is None or self.presented.fingerprint == self.expected

    @property
    def fingerprint(self) -> str | None:
        return self.presented.fingerprint if self.presented else None

    def auth_completed(self) -> None:
        self.stage = STAGE_SFTP


@dataclass
class Session:
    """A logged-in SFTP session and the host key of the server it reached.

    ``offered_first`` are the server's other host keys it offered before the confirmed one
    (empty when the first key it offered was the confirmed one, or nothing is confirmed)."""

    endpoint: Endpoint
    sftp: asyncssh.SFTPClient
    host_key: HostKey
    offered_first: tuple[HostKey, ...] = ()

    @property
    def fingerprint(self) -> str:
        return self.host_key.fingerprint

    async def check_directory(self, remote_dir: str) -> None:
        try:
            attrs = await self.sftp.stat(remote_dir)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            raise fail(
                Category.TRANSFER, f"the remote directory {remote_dir} does not exist"
            ) from None
        except asyncssh.SFTPPermissionDenied:
            raise fail(
                Category.TRANSFER, f"no permission to open the remote path {remote_dir}"
            ) from None
        if attrs.type not in (asyncssh.FILEXFER_TYPE_DIRECTORY, asyncssh.FILEXFER_TYPE_UNKNOWN):
            raise fail(Category.TRANSFER, f"the remote path {remote_dir} is not a directory")

    async def probe_writable(self, remote_dir: str) -> None:
        """Test and Save: write, check and remove a small hidden file in ``remote_dir``."""
        await self.check_directory(remote_dir)
        probe = posixpath.join(remote_dir, f".push-probe-{secrets.token_hex(6)}.tmp")
        try:
            async with self.sftp.open(probe, "wb") as handle:
                await handle.write(PROBE_BYTES)
            size = (await self.sftp.stat(probe)).size
        except asyncssh.SFTPPermissionDenied:
            raise fail(
                Category.TRANSFER, f"no permission to write in the remote directory {remote_dir}"
            ) from None
        except asyncssh.SFTPError as exc:
            await self._discard(probe)
            raise _sftp_failure(exc, f"writing a probe file in {remote_dir}") from exc
        await self._discard(probe)
        if size != len(PROBE_BYTES):
            raise fail(
                Category.TRANSFER,
                f"the probe file in {remote_dir} has {size} bytes on the server, "
                f"{len(PROBE_BYTES)} were written",
            )

    async def upload(
        self,
        local: Path,
        remote_dir: str,
        remote_name: str,
        on_temp: Callable[[str], None] | None = None,
    ) -> int:
        """Upload to a hidden temporary name, rename into place, verify the size.

        ``on_temp`` is told the temporary name before anything is written to it, so that a
        name an agent killed mid-upload leaves behind can be removed by the next run."""
        await self.check_directory(remote_dir)
        await self._remove_stale_temps(remote_dir, remote_name)
        size = local.stat().st_size
        final = posixpath.join(remote_dir, remote_name)
        temp = posixpath.join(remote_dir, f".{remote_name}.{secrets.token_hex(4)}.part")
        if on_temp is not None:
            on_temp(temp)
        try:
            await self.sftp.put(str(local), temp)
        except asyncssh.SFTPPermissionDenied:
            await self._discard(temp)
            raise fail(
                Category.TRANSFER, f"no permission to write in the remote directory {remote_dir}"
            ) from None
        except asyncssh.SFTPError as exc:
            await self._discard(temp)
            doing = f"uploading {local.name} to {temp}"
            free = await self._free_bytes(remote_dir)
            if free is not None and free < size:
                raise fail(
                    Category.TRANSFER,
                    f"{doing}: no space on the SFTP server ({free} bytes free, {size} needed; "
                    f"the server said: {exc.reason or type(exc).__name__})",
                ) from exc
            raise _sftp_failure(exc, doing) from exc
        try:
            await self._rename_into_place(temp, final)
        except asyncssh.SFTPError as exc:
            await self._discard(temp)
            raise _sftp_failure(exc, f"renaming {temp} to {final}") from exc
        try:
            remote_size = (await self.sftp.stat(final)).size
        except asyncssh.SFTPError as exc:
            raise _sftp_failure(exc, f"checking {final} after the upload") from exc
        if remote_size != size:
            raise fail(
                Category.TRANSFER,
                f"{final} has {remote_size} bytes on the server, {size} were sent",
                transient=True,
            )
        return size

    async def download(self, remote: str, local: Path) -> int:
        """Download to a hidden temporary local name, verify the size, rename into place."""
        try:
            expected = (await self.sftp.stat(remote)).size
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            # Only pool files are downloaded: one not published yet has its own message.
            raise fail(Category.POOL_MISSING, f"the remote file {remote} does not exist") from None
        except asyncssh.SFTPError as exc:
            raise _sftp_failure(exc, f"reading {remote}") from exc
        local.parent.mkdir(mode=POOL_DIR_MODE, parents=True, exist_ok=True)
        temp = local.parent / f".{local.name}.{secrets.token_hex(4)}.part"
        try:
            temp.touch(mode=POOL_FILE_MODE, exist_ok=False)  # its mode before a byte arrives
            temp.chmod(POOL_FILE_MODE)
            # sparse=False: no ranges@asyncssh.com request, which some servers mishandle.
            await self.sftp.get(remote, str(temp), sparse=False)
            got = temp.stat().st_size
            if expected is not None and got != expected:
                raise fail(
                    Category.TRANSFER,
                    f"{remote} has {expected} bytes on the server, {got} arrived",
                    transient=True,
                )
            rename_into_place(temp, local)
        except asyncssh.SFTPError as exc:
            raise _sftp_failure(exc, f"downloading {remote}") from exc
        finally:
            temp.unlink(missing_ok=True)
        return got

    async def _rename_into_place(self, temp: str, final: str) -> None:
        try:
            await self.sftp.posix_rename(temp, final)
            return
        except asyncssh.SFTPOpUnsupported:
            pass
        # SFTP v3 rename refuses an existing target: remove it first (not atomic, but the
        # server offered nothing better).
        try:
            await self.sftp.rename(temp, final)
        except asyncssh.SFTPError:
            if not await self.sftp.exists(final):
                raise
            await self.sftp.remove(final)
            await self.sftp.rename(temp, final)

    async def _free_bytes(self, remote_dir: str) -> int | None:
        """Free space where we write, if the server tells (OpenSSH's statvfs extension):
        SFTP v3 reports a full disk only as a generic failure."""
        try:
            stats = await self.sftp.statvfs(remote_dir)
        except (asyncssh.SFTPError, asyncssh.Error):
            return None
        return int(stats.bavail * stats.frsize)

    async def _remove_stale_temps(self, remote_dir: str, remote_name: str) -> None:
        """Temporary files an interrupted earlier attempt of ours could not remove."""
        stale = re.compile(rf"\.{re.escape(remote_name)}\.[0-9a-f]{{8}}\.part")
        try:
            names = await self.sftp.listdir(remote_dir)
        except asyncssh.SFTPError:  # a drop box may forbid listing: nothing to clean then
            return
        for name in names:
            if stale.fullmatch(name):
                await self._discard(posixpath.join(remote_dir, name))

    async def _discard(self, path: str) -> None:
        with suppress(asyncssh.Error, OSError):
            await self.sftp.remove(path)

    async def discard(self, path: str) -> None:
        """Remove ``path`` if it is there (a temporary name an earlier run left behind)."""
        await self._discard(path)


def _sftp_failure(exc: asyncssh.SFTPError, doing: str) -> PushFailure:
    reason = exc.reason or type(exc).__name__
    if isinstance(exc, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath):
        return fail(Category.TRANSFER, f"{doing}: no such file or directory ({reason})")
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return fail(Category.TRANSFER, f"{doing}: permission denied ({reason})")
    if isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem | asyncssh.SFTPQuotaExceeded):
        return fail(Category.TRANSFER, f"{doing}: no space on the SFTP server ({reason})")
    if isinstance(exc, asyncssh.SFTPConnectionLost):
        return fail(Category.TRANSFER, f"{doing}: connection interrupted ({reason})", True)
    return fail(Category.TRANSFER, f"{doing}: {reason}")


def _new_fingerprint(endpoint: Endpoint, offered: list[HostKey]) -> PushFailure:
    """The confirmed fingerprint is none of the host keys the server offered."""
    first = offered[0]
    cause = (
        f"{endpoint.where} presented the host key {first}, but the confirmed fingerprint is "
        f"{endpoint.expected_fingerprint}, which is none of the server's host keys"
    )
    if len(offered) > 1:
        cause += f" (it also offered {', '.join(str(k) for k in offered[1:])})"
    failure = Failure(Category.NEW_FINGERPRINT, cause)
    return PushFailure(failure, first.fingerprint, first.key_type)


async def _connect(
    endpoint: Endpoint,
) -> tuple[asyncssh.SSHClientConnection, _SessionWatcher, list[HostKey]]:
    """Connect and log in over a key exchange signed with the confirmed host key.

    When the server offers another key, ask it again for the key types it has not offered
    yet (OpenSSH order), until it offers the confirmed key or has no other type left: only
    then is the fingerprint new. Returns the connection, its watcher and the keys the server
    offered before the confirmed one."""
    offered: list[HostKey] = []
    while True:
        watcher = _SessionWatcher(endpoint.expected_fingerprint)
        algorithms = host_key_algorithms({k.key_type for k in offered})
        if not algorithms:
            raise _new_fingerprint(endpoint, offered)
        try:
            if is_invalid_name(endpoint.host):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            watcher.stage = STAGE_CONNECT
            options: dict[str, object] = {
                "username": endpoint.username,
                "known_hosts": ([], [], []),  # no file: every key goes to the watcher
                "server_host_key_algs": algorithms,
                "config": None,
                "agent_path": None,
                "gss_host": None,
                "connect_timeout": endpoint.timeout,
                "login_timeout": endpoint.timeout,
                "client_keys": [str(endpoint.key_path)] if endpoint.key_path else None,
                "password": endpoint.password,
                "preferred_auth": "publickey"
                if endpoint.key_path
                else "password,keyboard-interactive",
            }
            if endpoint.bind_address:
                options["local_addr"] = (endpoint.bind_address, 0)
            conn = await asyncssh.connect(
                endpoint.host, endpoint.port, client_factory=lambda w=watcher: w, **options
            )
            return conn, watcher, offered
        except asyncssh.HostKeyNotVerifiable:
            key = watcher.presented
            if key is None or key in offered:  # not a key this agent can compare: stop here
                if not offered:
                    failure = classify(
                        asyncssh.HostKeyNotVerifiable("no host key to compare"),
                        watcher.stage,
                        endpoint.host,
                        endpoint.port,
                    )
                    raise PushFailure(failure) from None
                raise _new_fingerprint(endpoint, offered) from None
            offered.append(key)
        except (OSError, asyncssh.Error, TimeoutError, EOFError) as exc:
            if offered and watcher.presented is None:
                # Asked for another key type, the server had none (or went away): the
                # confirmed fingerprint is none of the keys it has offered.
                raise _new_fingerprint(endpoint, offered) from None
            failure = classify(exc, watcher.stage, endpoint.host, endpoint.port, endpoint.timeout)
            raise PushFailure(failure, watcher.fingerprint, _key_type(watcher)) from exc


def _key_type(watcher: _SessionWatcher) -> str | None:
    return watcher.presented.key_type if watcher.presented else None


@asynccontextmanager
async def open_session(endpoint: Endpoint) -> AsyncIterator[Session]:
    """Connect, check the host key, log in and start SFTP; every failure is classified."""
    conn, watcher, offered = await _connect(endpoint)
    try:
        async with conn:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), endpoint.timeout)
            async with sftp:
                assert watcher.presented is not None  # the key exchange is done
                yield Session(endpoint, sftp, watcher.presented, tuple(offered))
    except PushFailure as exc:
        exc.fingerprint = exc.fingerprint or watcher.fingerprint
        exc.key_type = exc.key_type or _key_type(watcher)
        raise
    except (OSError, asyncssh.Error, TimeoutError, EOFError) as exc:
        failure = classify(exc, watcher.stage, endpoint.host, endpoint.port, endpoint.timeout)
        raise PushFailure(failure, watcher.fingerprint, _key_type(watcher)) from exc
