"""SFTP sessions to any standard server: pinned host keys, atomic uploads and downloads.

A session knows how far it got (TCP, SSH greeting, login) so a failure can be classified:
a peer that drops the TCP connection before its greeting is an allow-list or firewall, one
that drops it after login is an interrupted transfer. Uploads go to a hidden temporary name,
are renamed into place (posix-rename when the server offers it) and their size is verified;
downloads go the same way in the other direction.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import secrets
import socket
from collections.abc import AsyncIterator
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
        self.presented: str | None = None
        self.stage = STAGE_RESOLVE

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.stage = STAGE_GREETING

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = key.get_fingerprint("sha256")
        self.stage = STAGE_AUTH
        return self.expected is None or self.presented == self.expected

    def auth_completed(self) -> None:
        self.stage = STAGE_SFTP


@dataclass
class Session:
    """A logged-in SFTP session and the fingerprint of the server it reached."""

    endpoint: Endpoint
    sftp: asyncssh.SFTPClient
    fingerprint: str

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

    async def upload(self, local: Path, remote_dir: str, remote_name: str) -> int:
        """Upload to a hidden temporary name, rename into place, verify the size."""
        await self.check_directory(remote_dir)
        await self._remove_stale_temps(remote_dir, remote_name)
        size = local.stat().st_size
        final = posixpath.join(remote_dir, remote_name)
        temp = posixpath.join(remote_dir, f".{remote_name}.{secrets.token_hex(4)}.part")
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
            raise fail(Category.TRANSFER, f"the remote file {remote} does not exist") from None
        except asyncssh.SFTPError as exc:
            raise _sftp_failure(exc, f"reading {remote}") from exc
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.parent / f".{local.name}.{secrets.token_hex(4)}.part"
        try:
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


@asynccontextmanager
async def open_session(endpoint: Endpoint) -> AsyncIterator[Session]:
    """Connect, check the host key, log in and start SFTP; every failure is classified."""
    watcher = _SessionWatcher(endpoint.expected_fingerprint)
    try:
        if is_invalid_name(endpoint.host):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        watcher.stage = STAGE_CONNECT
        password = endpoint.password
        options: dict[str, object] = {
            "username": endpoint.username,
            "known_hosts": ([], [], []),  # no file: every key goes to validate_host_public_key
            "config": None,
            "agent_path": None,
            "gss_host": None,
            "connect_timeout": endpoint.timeout,
            "login_timeout": endpoint.timeout,
            "client_keys": [str(endpoint.key_path)] if endpoint.key_path else None,
            "password": password,
            "preferred_auth": "publickey" if endpoint.key_path else "password,keyboard-interactive",
        }
        if endpoint.bind_address:
            options["local_addr"] = (endpoint.bind_address, 0)
        conn = await asyncssh.connect(
            endpoint.host, endpoint.port, client_factory=lambda: watcher, **options
        )
        async with conn:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), endpoint.timeout)
            async with sftp:
                yield Session(endpoint, sftp, watcher.presented or "")
    except asyncssh.HostKeyNotVerifiable:
        failure = Failure(
            Category.NEW_FINGERPRINT,
            f"{endpoint.where} presented the host key {watcher.presented}, "
            f"but the confirmed fingerprint is {endpoint.expected_fingerprint}",
        )
        raise PushFailure(failure, watcher.presented) from None
    except PushFailure as exc:
        exc.fingerprint = exc.fingerprint or watcher.presented
        raise
    except (OSError, asyncssh.Error, TimeoutError, EOFError) as exc:
        failure = classify(exc, watcher.stage, endpoint.host, endpoint.port, endpoint.timeout)
        raise PushFailure(failure, watcher.presented) from exc
