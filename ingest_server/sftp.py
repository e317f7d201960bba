"""The SFTP (and, through asyncssh, legacy SCP) file system of one account session.

The client's whole world is its account folder. asyncssh's ``chroot`` clamps ``..``
lexically; on top of that every path is resolved for real and refused if it leads outside
(a symlink planted inside the folder is not followed out), links cannot be created,
service files (``.ingest-*``) are invisible and untouchable, and the loader's log and the
pool file are read-only. Every write goes to an :class:`Upload` (temp file + rename).

One client must never hurt another: every open file counts against the connection's
:class:`SessionBudget`, every byte an upload may grow to is first reserved against the
account's quota in the :class:`AccountLedger` (across sessions and workers), work
proportional to a file's size runs in a thread, and any unexpected error reaches the client
as a plain SFTP failure (its detail goes to the audit log, never to the client).
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
import typing
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

from ingest_core import metrics
from ingest_core.file_names import client_name_refusal
from ingest_core.folders import (
    AccountFolder,
    create_account_folder,
    is_read_only_name,
    is_service_name,
)
from ingest_core.settings import Settings
from ingest_server.atomic_upload import Upload
from ingest_server.limits import LimitHit, UploadLimits, quota_refusal
from ingest_server.session_budget import BudgetExceeded, Held, SessionBudget

if TYPE_CHECKING:
    from ingest_core.repeated_events import RepeatedEvents
    from ingest_server.ledger import AccountLedger

# Largest single read served (SFTP allows short reads; bounds memory per request).
MAX_READ_CHUNK = 256 * 1024
_BACKPRESSURE_POLL = 0.002
# Quota is reserved ahead in steps (one ledger request per step, not per write): 1/256 of
# the quota, between 8 and 64 MiB (40 MiB for the default 10 GiB), so a held but unused step
# is a small share of any quota. When the account is nearly full only what the write needs
# is asked for. The next step is asked for in the background once the upload is within half
# a step of what it holds, so a steady upload never waits for the listener's answer.
MIN_RESERVE_STEP = 8 * 1024 * 1024
MAX_RESERVE_STEP = 64 * 1024 * 1024


def reservation_step(quota: int) -> int:
    """Bytes of quota one ledger request reserves ahead for an upload."""
    return min(max(quota // 256, MIN_RESERVE_STEP), MAX_RESERVE_STEP)


# SFTP v3 carries times as unsigned 32-bit seconds: anything outside is clamped.
_TIME_MAX = 2**32 - 1
UNEXPECTED_ERROR = "the server could not complete this request"


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


def _sftp_error(exc: Exception) -> asyncssh.SFTPError | None:
    """The SFTP error a client sees for ``exc`` (None: let asyncssh send it as it is).

    OSErrors carry no server path (legacy SCP prints str(exc)); anything unexpected becomes
    one plain failure, never Python's words ("embedded null byte", "int too large").
    """
    if isinstance(exc, asyncssh.SFTPError):
        return None
    if isinstance(exc, OSError):
        return _ERRNO_ERRORS.get(exc.errno or 0, SFTPFailure)(exc.strerror or "failed")
    if isinstance(exc, BudgetExceeded | LimitHit):
        return SFTPFailure(str(exc))
    return SFTPFailure(UNEXPECTED_ERROR)


def _sftp_request(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an SFTP hook: the session is not idle, and every error is one the client may see
    (an unexpected one is logged with its detail for the operator)."""

    def convert(server: AccountSFTPServer, exc: Exception) -> asyncssh.SFTPError | None:
        error = _sftp_error(exc)
        if error is not None and not isinstance(exc, OSError | BudgetExceeded | LimitHit):
            server.audit.error(
                "sftp.error",
                account=server.folder.name,
                address=server.address,
                request=method.__name__,
                error=repr(exc),
            )
        return error

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def run_async(self: AccountSFTPServer, *args: Any, **kwargs: Any) -> Any:
            self.budget.touch()
            try:
                return await method(self, *args, **kwargs)
            except Exception as exc:
                error = convert(self, exc)
                if error is None:
                    raise
                raise error from None

        return run_async

    @functools.wraps(method)
    def run(self: AccountSFTPServer, *args: Any, **kwargs: Any) -> Any:
        self.budget.touch()
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            error = convert(self, exc)
            if error is None:
                raise
            raise error from None

    return run


def _clamp_time(value: int | None) -> int | None:
    return None if value is None else min(max(value, 0), _TIME_MAX)


def client_attrs(st: os.stat_result) -> SFTPAttrs:
    """A file's attributes as a client may see them: times clamped to what SFTP can carry,
    so one file with an odd time (a negative one from legacy SCP) never breaks a listing."""
    attrs = SFTPAttrs.from_local(st)
    for name in ("atime", "mtime", "ctime", "crtime"):
        value = getattr(attrs, name, None)
        if value is not None:
            setattr(attrs, name, _clamp_time(value))
    return attrs


def _clamped_times(attrs: SFTPAttrs) -> tuple[int, int] | None:
    if attrs.atime is None or attrs.mtime is None:
        return None
    return _clamp_time(attrs.atime) or 0, _clamp_time(attrs.mtime) or 0


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


class _Listing:
    """An open folder handle: the names are read at the first request (in a thread, so a
    folder of 10,000 files does not stall the worker) and no descriptor stays open. It
    counts against the session's handles until the client closes it or the session ends."""

    def __init__(self, server: AccountSFTPServer, path: bytes, held: Held):
        self.server = server
        self.path = path
        self.held = held
        self._names: list[SFTPName] | None = None

    def __del__(self) -> None:  # asyncssh forgets a closed folder handle: give it back
        self.held.release()

    def __aiter__(self) -> _Listing:
        return self

    async def __anext__(self) -> SFTPName:
        if self._names is None:
            self.server.budget.touch()
            try:
                names = await asyncio.to_thread(self.server.list_folder, self.path)
            except Exception as exc:
                error = _sftp_error(exc)
                if error is None:
                    raise
                raise error from None
            self._names = self.server.with_own_uploads(self.path, names)[::-1]
        if not self._names:
            raise StopAsyncIteration
        return self._names.pop()


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
        budget: SessionBudget,
        ledger: AccountLedger,
        repeats: RepeatedEvents,
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
        self.budget = budget
        self.ledger = ledger
        self.reserve_step = reservation_step(settings.limits.account_quota_bytes)
        self.repeats = repeats
        self.conn = chan.get_connection()
        self.is_sftp = chan.get_subsystem() == "sftp"
        self.protocol = "sftp" if self.is_sftp else "scp"
        self._uploads: set[Upload] = set()
        # This session's uploads by final path: the session that writes a file sees it under
        # its final name (sshfs looks it up before closing it); nobody else does.
        self._writing: dict[Path, Upload] = {}
        self._held: dict[object, Held] = {}  # open files -> their place in the budget
        # Folder listings open (made at the first one: most sessions only upload).
        self._listings: weakref.WeakSet[_Listing] | None = None

    # -- paths ------------------------------------------------------------------------------

    def _resolve(self, path: bytes, *, write: bool = False, create: bool = False) -> Path:
        """The local path for a client path, or an SFTP error if it is not the client's.

        ``create``: the last name is one the client is making (a new file, folder or rename
        target), so it must be a name the service accepts.
        """
        if create:
            refusal = client_name_refusal(path.rsplit(b"/", 1)[-1])
            if refusal is not None:
                raise SFTPPermissionDenied(refusal)
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

    @_sftp_request
    def realpath(self, path: bytes) -> Any:
        return super().realpath(path)

    # -- files ------------------------------------------------------------------------------

    @_sftp_request
    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        writing = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
        if not writing:
            local = self._resolve(path)
            st = os.stat(local)
            if not stat.S_ISREG(st.st_mode):
                raise SFTPFailure("not a regular file")
            if st.st_nlink > 1:
                raise SFTPPermissionDenied("file has several hard links: not served")
            held = self.budget.open_handle()
            try:
                download = _Download(Path(os.path.realpath(local)), local.name)
            except BaseException:
                held.release()
                raise
            self._held[download] = held
            return download
        local = self._resolve(path, write=True, create=True)
        if not self.tracker.accepting:
            raise SFTPFailure("server is shutting down: try again in a minute")
        exists = os.path.lexists(local)
        if exists and not os.path.isfile(local):
            raise SFTPFailure("not a regular file")
        if exists and pflags & FXF_EXCL:
            raise SFTPFailure("file already exists")
        if not exists and not pflags & FXF_CREAT:
            raise SFTPNoSuchFile("no such file")
        try:
            limits = UploadLimits.for_upload(self.settings.limits, self.root)
        except LimitHit as exc:
            self._limit_hit(local.name, exc)
            raise
        held = self.budget.open_handle()
        try:
            upload = Upload(
                self.folder,
                Path(os.path.realpath(local.parent)) / local.name,
                truncate=bool(pflags & FXF_TRUNC),
                append=bool(pflags & FXF_APPEND),
                limits=limits,
                buffer=self.budget.unflushed,
                durable=self.settings.server.fsync_uploads,
            )
        except BaseException:
            held.release()
            raise
        self._held[upload] = held
        self._uploads.add(upload)
        self._writing[upload.final] = upload
        self.tracker.add(self.conn, upload)
        return upload

    def write(self, file_obj: object, offset: int, data: bytes) -> Any:
        # The hot path (once per 32 KiB packet): plain and synchronous unless this write
        # needs more of the quota reserved or the existing file copied (a resume) first.
        if not isinstance(file_obj, Upload):
            raise SFTPPermissionDenied("file was opened for reading")
        self.budget.last_request = self.budget.clock()
        upload = file_obj
        end = upload.write_offset(offset) + len(data)
        may_reach = upload.credit + upload.reserved
        if end > may_reach or upload.needs_base_copy(offset):
            return self._write_after_preparing(upload, offset, data)
        if end > may_reach - self.reserve_step // 2 and upload.reserving is None:
            self._reserve_ahead(upload)
        return self._write_now(upload, offset, data)

    def _reserve_ahead(self, upload: Upload) -> None:
        """Ask for the next step of quota without waiting for the answer."""
        if not self.settings.limits.account_quota_bytes or upload.failed is not None:
            return
        upload.reserving = asyncio.ensure_future(self._reserve_step(upload))

    async def _reserve_step(self, upload: Upload) -> None:
        account = self.folder.name
        try:
            step = self.reserve_step
            if await self.ledger.reserve(account, step):
                if upload.done:  # the upload ended meanwhile: its settle did not see this
                    self.ledger.settle(account, step, 0)
                else:
                    upload.reserved += step
        finally:
            upload.reserving = None

    async def _write_after_preparing(self, upload: Upload, offset: int, data: bytes) -> int:
        if upload.reserving is not None:  # the step asked for ahead may already cover it
            await asyncio.shield(upload.reserving)
        if upload.failed is None:
            end = upload.write_offset(offset) + len(data)
            refusal = upload.limits.refusal(upload.size, upload.write_offset(offset), end)
            if refusal is not None:
                self._fail(upload, refusal)
            await self._reserve(upload, end)
            if upload.needs_base_copy(offset):
                try:
                    await asyncio.to_thread(upload.copy_base)
                except OSError as exc:
                    self._fail(upload, exc)
        return self._write_now(upload, offset, data)

    def _write_now(self, upload: Upload, offset: int, data: bytes) -> int:
        try:
            return upload.write(offset, data)
        except (LimitHit, OSError) as exc:
            self._fail(upload, exc)
        except Exception as exc:  # a bug must cost this upload, never the session's others
            self._fail(upload, exc)

    async def _reserve(self, upload: Upload, end: int) -> None:
        """Hold the account's quota for ``upload`` to reach ``end`` bytes, or fail it."""
        need = upload.reservation_needed(end)
        quota = self.settings.limits.account_quota_bytes
        if not need:
            return
        if not quota:  # no quota: nothing to ask, and nothing to ask again
            upload.credit += need
            return
        step = max(need, self.reserve_step)
        for ask in (step, need) if step > need else (need,):
            if await self.ledger.reserve(self.folder.name, ask):
                upload.reserved += ask
                return
        self._fail(upload, quota_refusal(quota, self.ledger.used(self.folder.name), need))

    def _fail(self, upload: Upload, exc: BaseException) -> typing.NoReturn:
        """Discard ``upload`` for ``exc`` and raise the error its client hears (and hears
        again at every later write and at close: the upload is gone)."""
        first = not upload.done  # later pipelined writes hear it again, unlogged
        if upload.failed is None and isinstance(exc, LimitHit | OSError):
            upload.failed = exc
        if isinstance(exc, LimitHit):
            self._drop(upload, reason=exc.kind)
            if first:
                self._limit_hit(upload.name, exc)
            raise SFTPFailure(str(exc)) from None
        if isinstance(exc, OSError):
            self._drop(upload, reason=f"write error: {exc.strerror or exc}")
            raise SFTPFailure(
                f"server could not store the file ({exc.strerror or exc}): upload discarded"
            ) from None
        self._drop(upload, reason="unexpected error")
        self.audit.error(
            "sftp.error", account=self.folder.name, address=self.address, request="write",
            error=repr(exc),
        )  # fmt: skip
        raise SFTPFailure(UNEXPECTED_ERROR) from None

    @_sftp_request
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
            await self._copy_base(file_obj)
            return file_obj.read(offset, size)
        assert isinstance(file_obj, _Download)
        data = os.pread(file_obj.fd, size, offset)
        file_obj.sent += len(data)
        return data

    async def _copy_base(self, upload: Upload) -> None:
        """A resumed upload's existing content, copied in a thread before it is needed."""
        if upload.base_pending:
            await asyncio.to_thread(upload.copy_base)

    @_sftp_request
    async def close(self, file_obj: object) -> None:
        # asyncssh calls close() for the client's CLOSE and also for every handle left open
        # when a session dies; only the latter runs while an exception is being handled
        # (SFTP: EOF/connection lost; legacy SCP: its receiver closes in a `finally`).
        aborting = sys.exc_info()[1] is not None or self.channel.is_closing()
        held = self._held.pop(file_obj, None)
        if held is not None:
            held.release()
        if isinstance(file_obj, _Download):
            os.close(file_obj.fd)
            self.repeats.info(
                "file.download",
                (self.folder.name, self.address, file_obj.name),
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
            await self._copy_base(upload)
            received = await asyncio.to_thread(upload.commit)
        except OSError as exc:
            self._drop(upload, reason=f"could not store the file: {exc.strerror or exc}")
            raise SFTPFailure(f"server could not store the file ({exc.strerror or exc})") from None
        finally:
            self._forget(upload)
        self._settle(upload, received.bytes - received.replaced_bytes)
        metrics.file_received(self.folder.name, received.bytes)  # bytes at commit, not per write
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

    @_sftp_request
    async def fsync(self, file_obj: object) -> None:
        """fsync@openssh.com (OpenSSH ``put -f``): the upload's data to disk now."""
        if not isinstance(file_obj, Upload):
            return  # nothing of a download to flush
        try:
            await self._copy_base(file_obj)
            await asyncio.to_thread(file_obj.fsync)
        except OSError as exc:
            raise SFTPFailure(f"server could not flush the file ({exc.strerror or exc})") from None

    @_sftp_request
    def fstat(self, file_obj: object) -> SFTPAttrs:
        if isinstance(file_obj, Upload):
            return self.writing_attrs(file_obj)
        assert isinstance(file_obj, _Download)
        return client_attrs(os.fstat(file_obj.fd))

    @_sftp_request
    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        if not isinstance(file_obj, Upload):
            raise SFTPPermissionDenied("file was opened for reading")
        upload = file_obj
        if attrs.size is not None:
            if attrs.size > upload.size:
                refusal = upload.limits.refusal(upload.size, attrs.size, attrs.size)
                if refusal is not None:
                    self._fail(upload, refusal)
                await self._reserve(upload, attrs.size)
            try:
                if upload.base_pending and attrs.size > upload.covered:
                    await self._copy_base(upload)
                upload.truncate(attrs.size)
            except (LimitHit, OSError) as exc:
                self._fail(upload, exc)
        times = _clamped_times(attrs)
        if times is not None:
            upload.set_times(*times)

    def _forget(self, upload: Upload) -> None:
        self._uploads.discard(upload)
        if self._writing.get(upload.final) is upload:
            del self._writing[upload.final]
        self.tracker.remove(self.conn, upload)

    def _settle(self, upload: Upload, delta: int) -> None:
        """Give back the upload's quota reservation (once) and record what it changed."""
        reserved, upload.reserved = upload.reserved, 0
        if self.settings.limits.account_quota_bytes and (reserved or delta):
            self.ledger.settle(self.folder.name, reserved, delta)

    def _drop(self, upload: Upload, reason: str) -> None:
        if not upload.done:
            upload.discard()
            metrics.upload_discarded(reason)
            self.audit.info(
                "upload.discarded",
                account=self.folder.name,
                address=self.address,
                protocol=self.protocol,
                name=upload.name,
                bytes=upload.size,
                reason=reason,
            )
        self._settle(upload, 0)

    def _limit_hit(self, name: str, exc: LimitHit) -> None:
        metrics.limit_hit(exc.kind)
        self.audit.warning(
            "limit.hit",
            account=self.folder.name,
            address=self.address,
            name=name,
            limit=exc.kind,
            reason=str(exc),
        )

    # -- names ------------------------------------------------------------------------------

    def _being_written(self, local: Path) -> Upload | None:
        """This session's own upload to ``local``, if one is in flight."""
        if not self._writing:
            return None
        upload = self._writing.get(Path(os.path.realpath(local.parent)) / local.name)
        return upload if upload is not None and not upload.done else None

    def writing_attrs(self, upload: Upload) -> SFTPAttrs:
        """An upload in flight as its own session sees it: the size written so far."""
        attrs = client_attrs(os.fstat(upload.fd))
        attrs.size = upload.size
        return attrs

    @_sftp_request
    def lstat(self, path: bytes) -> SFTPAttrs:
        local = self._resolve(path)
        upload = self._being_written(local)
        return self.writing_attrs(upload) if upload else client_attrs(os.lstat(local))

    @_sftp_request
    def stat(self, path: bytes) -> SFTPAttrs:
        local = self._resolve(path)
        upload = self._being_written(local)
        return self.writing_attrs(upload) if upload else client_attrs(os.stat(local))

    @_sftp_request
    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        local = self._resolve(path, write=True)
        upload = self._being_written(local)
        if upload is not None:
            # sshfs sets times (cp -p, touch) by path while its handle is still open: they
            # belong to this session's upload in flight and are applied when it lands.
            await self.fsetstat(upload, attrs)
            return
        if attrs.size is not None and attrs.size != os.stat(local).st_size:
            raise SFTPPermissionDenied("changing a stored file's size is not allowed: upload it")
        # Times only (WinSCP and `put -p` set them after an upload); modes and owners are the
        # service's business, silently kept as they are.
        times = _clamped_times(attrs)
        if times is not None:
            os.utime(local, times)

    def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> Any:
        return self.setstat(path, attrs)

    @_sftp_request
    def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        self._resolve(path)
        listing = _Listing(self, path, self.budget.open_handle())
        if self._listings is None:
            self._listings = weakref.WeakSet()
        self._listings.add(listing)
        return listing

    def with_own_uploads(self, path: bytes, names: list[SFTPName]) -> list[SFTPName]:
        """A listing as this session sees it: its own uploads in flight under their final
        names, with the size written so far."""
        if not self._writing:
            return names
        folder = Path(os.path.realpath(self._resolve(path)))
        own = {
            os.fsencode(final.name): upload
            for final, upload in self._writing.items()
            if final.parent == folder and not upload.done
        }
        if not own:
            return names
        listed = [n for n in names if n.filename not in own]
        listed += [SFTPName(name, attrs=self.writing_attrs(u)) for name, u in own.items()]
        return listed

    def list_folder(self, path: bytes) -> list[SFTPName]:
        """A folder's entries as the client sees them (blocking: runs in a thread): service
        files hidden, times clamped, and one entry that cannot be read skipped, not fatal."""
        local = self._resolve(path)
        names = [SFTPName(b".", attrs=client_attrs(os.stat(local)))]
        names.append(SFTPName(b"..", attrs=client_attrs(os.stat(local.parent))))
        with os.scandir(os.fsencode(local)) as entries:
            for entry in entries:
                if entry.name.startswith(b".ingest-"):
                    continue
                try:
                    attrs = client_attrs(entry.stat(follow_symlinks=False))
                except (OSError, ValueError, OverflowError):
                    continue
                names.append(SFTPName(entry.name, attrs=attrs))
        return names

    @_sftp_request
    def remove(self, path: bytes) -> None:
        local = self._resolve(path, write=True)
        size = os.lstat(local).st_size
        os.remove(local)
        if self.settings.limits.account_quota_bytes:
            self.ledger.settle(self.folder.name, 0, -size)
        self.audit.info(
            "file.removed", account=self.folder.name, address=self.address, name=local.name,
            bytes=size,
        )  # fmt: skip

    @_sftp_request
    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        old = self._resolve(oldpath, write=True)
        new = self._resolve(newpath, write=True, create=True)
        if os.path.lexists(new):
            raise SFTPFailure("target file already exists")
        os.rename(old, new)
        self._log_rename(old, new)

    @_sftp_request
    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        old = self._resolve(oldpath, write=True)
        new = self._resolve(newpath, write=True, create=True)
        if os.path.isdir(new):
            raise SFTPFailure("target is a folder")
        replaced = os.lstat(new).st_size if os.path.lexists(new) else 0
        os.replace(old, new)
        if replaced and self.settings.limits.account_quota_bytes:
            self.ledger.settle(self.folder.name, 0, -replaced)
        self._log_rename(old, new)

    def _log_rename(self, old: Path, new: Path) -> None:
        self.audit.info(
            "file.renamed",
            account=self.folder.name,
            address=self.address,
            name=str(new.relative_to(self.root)),
            old_name=str(old.relative_to(self.root)),
        )

    @_sftp_request
    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        if not self.settings.server.allow_subfolders:
            raise SFTPPermissionDenied("subfolders are not enabled: upload into the top folder")
        os.mkdir(self._resolve(path, write=True, create=True), 0o750)

    @_sftp_request
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

    @_sftp_request
    def statvfs(self, path: bytes) -> os.statvfs_result:
        return os.statvfs(self._resolve(path))

    @_sftp_request
    def fstatvfs(self, file_obj: object) -> os.statvfs_result:
        return os.statvfs(self.root)

    def exit(self) -> None:
        for upload in list(self._uploads):
            self._drop(upload, reason="session ended before the file was closed")
            self._forget(upload)
        listings = list(self._listings or ())
        for held in [*self._held.values(), *(listing.held for listing in listings)]:
            held.release()  # handles asyncssh did not close (each is released once)
        self._held.clear()
        self._listings = None
        if self.is_sftp and not self.channel.is_closing():
            # OpenSSH scp (SFTP mode) exits 1 after a good upload without an exit status.
            self.channel.exit(0)
