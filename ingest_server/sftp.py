"""The SFTP (and, through asyncssh, legacy SCP) file system of one account session.

The client's whole world is its account folder. asyncssh's ``chroot`` clamps ``..``
lexically; on top of that every path is resolved for real and refused if it leads outside
(a symlink planted inside the folder is not followed out), links cannot be created,
service files (``.ingest-*``) are invisible and untouchable, and the loader's log and the
pool file are read-only. Every write goes to an :class:`Upload` (temp file + rename).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import os
import stat
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPFailure,
    SFTPName,
    SFTPNoSuchFile,
    SFTPPermissionDenied,
)

from ingest_core.folders import (
    AccountFolder,
    create_account_folder,
    is_read_only_name,
    is_service_name,
)
from ingest_core.settings import Settings
from ingest_server.atomic_upload import Upload
from ingest_server.limits import LimitHit, UploadLimits

# Largest single read served (SFTP allows short reads; bounds memory per request).
MAX_READ_CHUNK = 256 * 1024
_BACKPRESSURE_POLL = 0.002


_ERRNO_ERRORS: dict[int, type[asyncssh.SFTPError]] = {
    errno.ENOENT: SFTPNoSuchFile,
    errno.ENOTDIR: SFTPNoSuchFile,
    errno.EACCES: SFTPPermissionDenied,
    errno.EPERM: SFTPPermissionDenied,
    errno.ELOOP: SFTPPermissionDenied,
    errno.EEXIST: asyncssh.SFTPFileAlreadyExists,
    errno.ENOTEMPTY: asyncssh.SFTPDirNotEmpty,
    errno.ENOSPC: asyncssh.SFTPNoSpaceOnFilesystem,
}


def _without_paths(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSErrors into SFTP errors that carry no server path (legacy SCP prints str(exc))."""

    def convert(exc: OSError) -> asyncssh.SFTPError:
        return _ERRNO_ERRORS.get(exc.errno or 0, SFTPFailure)(exc.strerror or "failed")

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except OSError as exc:
                raise convert(exc) from None

        return run_async

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            raise convert(exc) from None

    return run


class UploadTracker:
    """Uploads in flight per connection, so a graceful shutdown can wait for them."""

    def __init__(self) -> None:
        self._by_conn: dict[object, set[Upload]] = {}
        self.changed = asyncio.Event()
        self.accepting = True

    def add(self, conn: object, upload: Upload) -> None:
        self._by_conn.setdefault(conn, set()).add(upload)

    def remove(self, conn: object, upload: Upload) -> None:
        uploads = self._by_conn.get(conn)
        if uploads is not None:
            uploads.discard(upload)
            if not uploads:
                del self._by_conn[conn]
        self.changed.set()

    def busy(self, conn: object) -> bool:
        return bool(self._by_conn.get(conn))

    def total(self) -> int:
        return sum(len(u) for u in self._by_conn.values())

    def discard_all(self) -> None:
        """Last resort at shutdown: no temporary file outlives the server."""
        for uploads in list(self._by_conn.values()):
            for upload in list(uploads):
                upload.discard()
        self._by_conn.clear()


class _Download:
    """A file opened for reading, with the bytes sent counted for the audit log."""

    def __init__(self, path: Path, name: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self.name = name
        self.sent = 0
        self.started = time.monotonic()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """asyncssh's sparse-range reply (``ranges@asyncssh.com``) seeks SEEK_DATA/SEEK_HOLE."""
        return os.lseek(self.fd, offset, whence)


class AccountSFTPServer(asyncssh.SFTPServer):
    """One SFTP or SCP session, confined to ``folder``."""

    def __init__(
        self,
        chan: asyncssh.SSHServerChannel,
        *,
        settings: Settings,
        folder: AccountFolder,
        address: str,
        audit: Any,
        tracker: UploadTracker,
    ):
        if not folder.root.is_dir():  # made by `account create`; recreate it if it went away
            folder = create_account_folder(settings, folder.name)
        super().__init__(chan, chroot=os.fsencode(folder.root))
        self.settings = settings
        self.folder = folder
        self.root = Path(os.path.realpath(folder.root))
        self.address = address
        self.audit = audit
        self.tracker = tracker
        self.conn = chan.get_connection()
        self.is_sftp = chan.get_subsystem() == "sftp"
        self.protocol = "sftp" if self.is_sftp else "scp"
        self._uploads: set[Upload] = set()

    # -- paths ------------------------------------------------------------------------------

    def _resolve(self, path: bytes, *, write: bool = False) -> Path:
        """The local path for a client path, or an SFTP error if it is not the client's."""
        local = Path(os.fsdecode(self.map_path(path)))
        try:
            parts = local.relative_to(self.root).parts
        except ValueError:
            raise SFTPPermissionDenied("path is outside the account folder") from None
        if any(is_service_name(p) for p in parts):
            raise SFTPNoSuchFile("no such file")
        real = Path(os.path.realpath(local))
        if real != self.root and self.root not in real.parents:
            raise SFTPPermissionDenied("path leads outside the account folder: not followed")
        if write:
            if not parts:
                raise SFTPPermissionDenied("the account folder itself cannot be changed")
            if len(parts) > 1 and not self.settings.server.allow_subfolders:
                raise SFTPPermissionDenied("subfolders are not enabled: use the top folder")
            if len(parts) == 1 and is_read_only_name(parts[0]):
                raise SFTPPermissionDenied(
                    f"{parts[0]} is read-only: it can be downloaded, not changed"
                )
        return local

    def format_user(self, uid: int | None) -> str:
        return self.folder.name

    def format_group(self, gid: int | None) -> str:
        return self.folder.name

    # -- files ------------------------------------------------------------------------------

    @_without_paths
    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        writing = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
        if not writing:
            local = self._resolve(path)
            st = os.stat(local)
            if not stat.S_ISREG(st.st_mode):
                raise SFTPFailure("not a regular file")
            if st.st_nlink > 1:
                raise SFTPPermissionDenied("file has several hard links: not served")
            return _Download(Path(os.path.realpath(local)), local.name)
        local = self._resolve(path, write=True)
        if not self.tracker.accepting:
            raise SFTPFailure("server is shutting down: try again in a minute")
        exists = os.path.lexists(local)
        if exists and not os.path.isfile(local):
            raise SFTPFailure("not a regular file")
        if exists and pflags & FXF_EXCL:
            raise SFTPFailure("file already exists")
        if not exists and not pflags & FXF_CREAT:
            raise SFTPNoSuchFile("no such file")
        replaced = os.stat(local).st_size if exists else 0
        try:
            limits = UploadLimits.for_upload(self.settings.limits, self.root, replaced)
        except LimitHit as exc:
            self._limit_hit(local.name, exc)
            raise SFTPFailure(str(exc)) from None
        upload = Upload(
            self.folder,
            Path(os.path.realpath(local.parent)) / local.name,
            truncate=bool(pflags & FXF_TRUNC),
            append=bool(pflags & FXF_APPEND),
            limits=limits,
            durable=self.settings.server.fsync_uploads,
        )
        self._uploads.add(upload)
        self.tracker.add(self.conn, upload)
        return upload

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        # The hot path (once per 32 KiB packet): OSErrors are converted here, no decorator.
        if not isinstance(file_obj, Upload):
            raise SFTPPermissionDenied("file was opened for reading")
        upload = file_obj
        try:
            return upload.write(offset, data)
        except LimitHit as exc:
            self._drop(upload, reason=exc.kind)
            self._limit_hit(upload.name, exc)
            raise SFTPFailure(str(exc)) from None
        except OSError as exc:
            self._drop(upload, reason=f"write error: {exc.strerror or exc}")
            raise SFTPFailure(
                f"server could not store the file ({exc.strerror or exc}): upload discarded"
            ) from None

    @_without_paths
    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        # Wait while earlier replies still sit in the channel: a client asking for a whole
        # file at once (paramiko's get) must not make us queue the file in memory.
        limit = self.settings.limits.max_read_ahead_bytes
        while limit and self.channel.get_write_buffer_size() > limit:
            if self.channel.is_closing():
                raise SFTPFailure("connection closing")
            await asyncio.sleep(_BACKPRESSURE_POLL)
        size = min(size, MAX_READ_CHUNK)
        if isinstance(file_obj, Upload):
            return file_obj.read(offset, size)
        assert isinstance(file_obj, _Download)
        data = os.pread(file_obj.fd, size, offset)
        file_obj.sent += len(data)
        return data

    @_without_paths
    async def close(self, file_obj: object) -> None:
        # asyncssh calls close() for the client's CLOSE and also for every handle left open
        # when a session dies; only the latter runs while an exception is being handled
        # (SFTP: EOF/connection lost; legacy SCP: its receiver closes in a `finally`).
        aborting = sys.exc_info()[1] is not None or self.channel.is_closing()
        if isinstance(file_obj, _Download):
            os.close(file_obj.fd)
            self.audit.info(
                "file.download",
                account=self.folder.name,
                address=self.address,
                protocol=self.protocol,
                name=file_obj.name,
                bytes=file_obj.sent,
            )
            return
        if not isinstance(file_obj, Upload):
            return
        upload = file_obj
        if upload.done:
            self._forget(upload)
            if upload.failed is not None and not aborting:
                raise SFTPFailure(f"upload failed and was discarded: {upload.failed}")
            return
        if aborting:
            self._drop(upload, reason="session ended before the file was closed")
            self._forget(upload)
            return
        try:
            received = await asyncio.to_thread(upload.commit)
        except OSError as exc:
            self._drop(upload, reason=f"could not store the file: {exc.strerror or exc}")
            raise SFTPFailure(f"server could not store the file ({exc.strerror or exc})") from None
        finally:
            self._forget(upload)
        self.audit.info(
            "file.received",
            account=self.folder.name,
            address=self.address,
            protocol=self.protocol,
            name=received.name,
            bytes=received.bytes,
            sha256=received.sha256,
            seconds=round(received.seconds, 3),
        )

    async def fsync(self, file_obj: object) -> None:
        """fsync@openssh.com (OpenSSH ``put -f``): the upload's data to disk now."""
        if not isinstance(file_obj, Upload):
            return  # nothing of a download to flush
        try:
            await asyncio.to_thread(file_obj.fsync)
        except OSError as exc:
            raise SFTPFailure(f"server could not flush the file ({exc.strerror or exc})") from None

    @_without_paths
    def fstat(self, file_obj: object) -> os.stat_result:
        if isinstance(file_obj, Upload):
            return file_obj.fstat()
        assert isinstance(file_obj, _Download)
        return os.fstat(file_obj.fd)

    @_without_paths
    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, Upload):
            raise SFTPPermissionDenied("file was opened for reading")
        if attrs.size is not None:
            try:
                file_obj.truncate(attrs.size)
            except LimitHit as exc:
                self._drop(file_obj, reason=exc.kind)
                self._limit_hit(file_obj.name, exc)
                raise SFTPFailure(str(exc)) from None
            except OSError as exc:
                self._drop(file_obj, reason=f"write error: {exc.strerror or exc}")
                raise SFTPFailure(f"server could not store the file ({exc.strerror})") from None
        if attrs.atime is not None and attrs.mtime is not None:
            file_obj.set_times(attrs.atime, attrs.mtime)

    def _forget(self, upload: Upload) -> None:
        self._uploads.discard(upload)
        self.tracker.remove(self.conn, upload)

    def _drop(self, upload: Upload, reason: str) -> None:
        if not upload.done:
            upload.discard()
            self.audit.info(
                "upload.discarded",
                account=self.folder.name,
                address=self.address,
                protocol=self.protocol,
                name=upload.name,
                bytes=upload.size,
                reason=reason,
            )

    def _limit_hit(self, name: str, exc: LimitHit) -> None:
        self.audit.warning(
            "limit.hit",
            account=self.folder.name,
            address=self.address,
            name=name,
            limit=exc.kind,
            reason=str(exc),
        )

    # -- names ------------------------------------------------------------------------------

    @_without_paths
    def lstat(self, path: bytes) -> os.stat_result:
        return os.lstat(self._resolve(path))

    @_without_paths
    def stat(self, path: bytes) -> os.stat_result:
        return os.stat(self._resolve(path))

    @_without_paths
    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        local = self._resolve(path, write=True)
        if attrs.size is not None and attrs.size != os.stat(local).st_size:
            raise SFTPPermissionDenied("changing a stored file's size is not allowed: upload it")
        # Times only (WinSCP and `put -p` set them after an upload); modes and owners are the
        # service's business, silently kept as they are.
        if attrs.atime is not None and attrs.mtime is not None:
            os.utime(local, (attrs.atime, attrs.mtime))

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self.setstat(path, attrs)

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        self._resolve(path)
        try:
            async for entry in super().scandir(path):
                name = entry.filename
                if isinstance(name, bytes) and name.startswith(b".ingest-"):
                    continue
                if isinstance(name, str) and is_service_name(name):
                    continue
                yield entry
        except OSError as exc:
            raise _ERRNO_ERRORS.get(exc.errno or 0, SFTPFailure)(exc.strerror or "failed") from None

    @_without_paths
    def remove(self, path: bytes) -> None:
        local = self._resolve(path, write=True)
        size = os.lstat(local).st_size
        os.remove(local)
        self.audit.info(
            "file.removed", account=self.folder.name, address=self.address, name=local.name,
            bytes=size,
        )  # fmt: skip

    @_without_paths
    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old = self._resolve(oldpath, write=True)
        new = self._resolve(newpath, write=True)
        if os.path.lexists(new):
            raise SFTPFailure("target file already exists")
        os.rename(old, new)
        self._log_rename(old, new)

    @_without_paths
    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old = self._resolve(oldpath, write=True)
        new = self._resolve(newpath, write=True)
        if os.path.isdir(new):
            raise SFTPFailure("target is a folder")
        os.replace(old, new)
        self._log_rename(old, new)

    def _log_rename(self, old: Path, new: Path) -> None:
        self.audit.info(
            "file.renamed",
            account=self.folder.name,
            address=self.address,
            name=str(new.relative_to(self.root)),
            old_name=str(old.relative_to(self.root)),
        )

    @_without_paths
    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        if not self.settings.server.allow_subfolders:
            raise SFTPPermissionDenied("subfolders are not enabled: upload into the top folder")
        os.mkdir(self._resolve(path, write=True), 0o750)

    @_without_paths
    def rmdir(self, path: bytes) -> None:
        if not self.settings.server.allow_subfolders:
            raise SFTPPermissionDenied("subfolders are not enabled")
        os.rmdir(self._resolve(path, write=True))

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("creating symbolic links is not allowed")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPPermissionDenied("creating hard links is not allowed")

    def readlink(self, path: bytes) -> bytes:
        raise SFTPPermissionDenied("symbolic links are not served")

    def exit(self) -> None:
        for upload in list(self._uploads):
            self._drop(upload, reason="session ended before the file was closed")
            self._forget(upload)
        if self.is_sftp and not self.channel.is_closing():
            # OpenSSH scp (SFTP mode) exits 1 after a good upload without an exit status.
            self.channel.exit(0)
