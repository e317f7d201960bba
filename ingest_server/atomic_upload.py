"""One upload in flight: written to a hidden temporary file, renamed into place on commit.

The final name appears only through :meth:`Upload.commit` (one ``rename`` in the same
folder), so a reader never sees half a file and an earlier file of that name stays intact
until the new one is complete. :meth:`Upload.discard` removes the temporary file; it is what
happens when a client dies, a limit is hit or the server shuts down.

With ``durable`` (``[server] fsync_uploads``, the default) the file's data is on disk before
the rename and the rename is on disk before the client hears "OK": a power cut then leaves
the old file or the whole new one, never a short one. So that the final fsync finds little
left to write, writeback of every WRITEBACK_BYTES written is started as the data arrives.

An upload that does not truncate (resume with ``reput``, OpenSSH scp in SFTP mode, WinSCP
resume) starts from a copy of the existing file, so writes at an offset behave as if made in
place. That copy is proportional to the file's size, so the caller runs :meth:`Upload.copy_base`
in a thread before anything that needs it (``base_pending``). SHA-256 is computed as the
data arrives when writes are sequential, else re-read once at commit (also in a thread).

Memory: data waits in a batch until BATCH_BYTES have arrived, but one session's batches
together never hold more than its :class:`UnflushedBytes` budget, however many files it has
open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ingest_core.durable_files import fsync_folder
from ingest_core.folders import AccountFolder, upload_owner
from ingest_server.limits import LimitHit, UploadLimits

TEMP_FILE_MODE = 0o640
# Writes are gathered into batches of this size and written (and hashed) in one go: one
# pwrite per batch instead of one per 32 KiB packet. (Writing batches in a worker thread was
# measured too: about a fifth more server CPU on two cores for no throughput gained.)
BATCH_BYTES = 512 * 1024
_HASH_BLOCK = 1024 * 1024
WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (Python's os module lacks it); None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting for it."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class Received:
    """What the audit log records about a committed upload."""

    name: str
    bytes: int
    sha256: str
    seconds: float
    replaced_bytes: int  # size of the earlier file of that name it replaced (0: none)


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


def _runs(batch: list[tuple[int, bytes, bool]]) -> list[tuple[int, list[bytes], bool]]:
    """Group consecutive contiguous writes with the same hashing flag into one run (kept as
    separate pieces: pwritev writes them without joining them into one copy first)."""
    runs: list[tuple[int, list[bytes], bool]] = []
    pieces: list[bytes] = []
    start = end = 0
    hashing = False
    for offset, data, hash_it in batch:
        if pieces and data and offset == end and hash_it == hashing:
            pieces.append(data)
            end += len(data)
            continue
        if pieces:
            runs.append((start, pieces, hashing))
            pieces = []
        pieces, start, end, hashing = [data], offset, offset + len(data), hash_it
    if pieces:
        runs.append((start, pieces, hashing))
    return runs


def _write_pieces(fd: int, pieces: list[bytes], offset: int) -> None:
    """Write ``pieces`` back to back from ``offset``, whatever short writes happen."""
    for first in range(0, len(pieces), _IOV_MAX):
        group = pieces[first : first + _IOV_MAX]
        size = sum(map(len, group))
        done = os.pwritev(fd, group, offset)
        if done < size:  # short write (rare on a file): finish piece by piece
            rest = memoryview(b"".join(group))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                done += n
                rest = rest[n:]
        offset += size


class UnflushedBytes:
    """Upload data one session holds in memory, not yet written, across all its files."""

    __slots__ = ("limit", "pending", "uploads")  # one per logged-in connection

    def __init__(self, limit: int):
        self.limit = limit
        self.pending = 0
        self.uploads: set[Upload] = set()

    def relieve(self, current: Upload) -> None:
        """Over the limit: write ``current``'s batch, then the largest others', until under.
        A failure writing another upload is kept by that upload (it fails its next request)."""
        current.flush()
        while self.limit and self.pending > self.limit:
            others = [u for u in self.uploads if u is not current and u.pending_bytes]
            if not others:
                return
            upload = max(others, key=lambda u: u.pending_bytes)
            try:
                upload.flush()
            except (OSError, LimitHit):
                upload.drop_pending()


class Upload:
    """A file being received; not visible under its final name until committed."""

    def __init__(
        self,
        folder: AccountFolder,
        final: Path,
        *,
        truncate: bool,
        append: bool,
        limits: UploadLimits,
        buffer: UnflushedBytes,
        durable: bool = True,
    ):
        self.final = final
        self.temp = folder.upload_temp(f"{upload_owner()}-{secrets.token_hex(8)}")
        if final.parent != folder.root:
            self.temp = final.parent / self.temp.name
        self.append = append
        self.limits = limits
        self.durable = durable
        self._writeback_from = 0  # bytes below this have had writeback started
        self.started = time.monotonic()
        self.done = False
        self.failed: LimitHit | OSError | None = None
        self._hash = hashlib.sha256()
        self._hashed_upto = 0
        self._sequential = True
        self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, TEMP_FILE_MODE)
        # Without TRUNC the upload starts as the existing file. Its content is copied only if
        # needed (a write away from the start, a read, a commit with the old tail): OpenSSH
        # scp overwrites from offset 0 and then truncates, which needs no copy at all.
        self._base_fd = -1
        self._covered = 0  # bytes [0, covered) written by the client
        self._batch: list[tuple[int, bytes, bool]] = []
        self._batch_bytes = 0
        self.buffer = buffer
        self.reserved = 0  # bytes of the account's quota held for this upload in the ledger
        self.credit = 0  # bytes it may reach without reserving: the file it will replace
        self.reserving: asyncio.Future[None] | None = None  # a quota step asked for ahead
        self._times: tuple[float, float] | None = None
        try:
            if final.is_file():
                self.credit = final.stat().st_size
            if not truncate and final.is_file():
                self._base_fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW)
            self.size = os.fstat(self._base_fd).st_size if self._base_fd >= 0 else 0
        except BaseException:
            self.discard()
            raise
        buffer.uploads.add(self)

    @property
    def name(self) -> str:
        return self.final.name

    def write(self, offset: int, data: bytes) -> int:
        """Accept a write; the bytes reach the file when the batch is full or flushed."""
        if self.failed is not None:
            raise self.failed
        if not data:
            return 0
        offset = self.write_offset(offset)
        end = offset + len(data)
        if end > self.size:
            try:
                self.limits.check_growth(self.size, offset, end)
            except LimitHit as exc:
                self.failed = exc
                raise
        if self._base_fd >= 0:
            if offset == self._covered:
                self._covered = end
            else:  # the caller should have run copy_base() in a thread; never lose data
                self.copy_base()
        hash_it = False
        if self._sequential:
            if offset == self._hashed_upto:
                hash_it = True
                self._hashed_upto = end
            else:
                self._sequential = False
        self._batch.append((offset, data, hash_it))
        self._batch_bytes += len(data)
        self.buffer.pending += len(data)
        self.size = max(self.size, end)
        if self._batch_bytes >= BATCH_BYTES:
            self.flush()
        elif self.buffer.limit and self.buffer.pending > self.buffer.limit:
            self.buffer.relieve(self)
        return len(data)

    def write_offset(self, offset: int) -> int:
        """Where a write at ``offset`` lands (appending handles write at the end)."""
        return self.size if self.append else offset

    def reservation_needed(self, end: int) -> int:
        """Quota bytes still to reserve before the file may reach ``end`` bytes (the size of
        the file it replaces is already counted in the folder's usage)."""
        return max(0, end - self.credit - self.reserved)

    @property
    def base_pending(self) -> bool:
        """The existing file's content has still to be copied (see :meth:`copy_base`)."""
        return self._base_fd >= 0

    def needs_base_copy(self, offset: int) -> bool:
        """A write at ``offset`` would need the existing content first (a resume)."""
        return self._base_fd >= 0 and self.write_offset(offset) != self._covered

    def copy_base(self) -> None:
        """Copy the existing file's bytes the client has not overwritten (blocking: call it
        in a thread; the client's data below ``covered`` is left alone)."""
        self._materialize(self._covered)

    @property
    def covered(self) -> int:
        """Bytes [0, covered) of a resumed upload were written by the client."""
        return self._covered

    @property
    def pending_bytes(self) -> int:
        return self._batch_bytes

    def drop_pending(self) -> None:
        """Forget data not yet written (the upload has failed or is being discarded)."""
        self.buffer.pending -= self._batch_bytes
        self._batch, self._batch_bytes = [], 0

    def take_batch(self, minimum: int = BATCH_BYTES) -> list[tuple[int, bytes, bool]] | None:
        """The writes accepted so far, once there are ``minimum`` bytes of them."""
        if not self._batch or self._batch_bytes < minimum:
            return None
        batch, self._batch = self._batch, []
        self.buffer.pending -= self._batch_bytes
        self._batch_bytes = 0
        return batch

    def write_batch(self, batch: list[tuple[int, bytes, bool]]) -> None:
        """Write (and hash) a batch in order, contiguous writes joined into one pwrite."""
        try:
            for offset, pieces, hash_it in _runs(batch):
                _write_pieces(self.fd, pieces, offset)
                end = offset + sum(map(len, pieces))
                if self.durable and end - self._writeback_from >= WRITEBACK_BYTES:
                    start_writeback(self.fd, self._writeback_from, end - self._writeback_from)
                    self._writeback_from = end
                if hash_it:
                    for piece in pieces:
                        self._hash.update(piece)
        except OSError as exc:
            self.failed = exc
            raise

    def flush(self) -> None:
        """Write whatever is pending."""
        batch = self.take_batch(1)
        if batch:
            self.write_batch(batch)
        if self.failed is not None:
            raise self.failed

    def fsync(self) -> None:
        """The client asked (fsync@openssh.com, OpenSSH ``put -f``): data to disk now, and
        the commit durable whatever the setting (blocking: run it in a thread)."""
        self.flush()
        self._materialize(self._covered)
        os.fsync(self.fd)
        self.durable = True

    def read(self, offset: int, size: int) -> bytes:
        self.flush()
        self._materialize(self._covered)
        return os.pread(self.fd, size, offset)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """For asyncssh's sparse-range reply: the temp file as the client would read it."""
        self.flush()
        self._materialize(self._covered)
        return os.lseek(self.fd, offset, whence)

    def truncate(self, size: int) -> None:
        if size > self.size:
            self.limits.check_growth(self.size, size, size)
        self.flush()
        if self._base_fd >= 0 and size <= self._covered:
            self._drop_base()  # everything kept was written by the client
        self._materialize(self._covered)
        os.ftruncate(self.fd, size)
        if size != self._hashed_upto:
            self._sequential = False
        self.size = size

    def _materialize(self, start: int) -> None:
        """Copy the existing file's bytes from ``start`` on (not overwritten by the client)."""
        if self._base_fd < 0:
            return
        offset = start
        end = os.fstat(self._base_fd).st_size
        while offset < end:
            block = os.pread(self._base_fd, min(_HASH_BLOCK, end - offset), offset)
            if not block:
                break
            os.pwrite(self.fd, block, offset)
            offset += len(block)
        self._drop_base()

    def _drop_base(self) -> None:
        if self._base_fd >= 0:
            os.close(self._base_fd)
            self._base_fd = -1

    def set_times(self, atime: float, mtime: float) -> None:
        """Remembered and applied at commit, after the last byte is written."""
        self._times = (atime, mtime)

    def commit(self) -> Received:
        """Rename into place (blocking, with fsync: run it in a thread)."""
        self.flush()
        self._materialize(self._covered)
        if self._times is not None:
            os.utime(self.fd, self._times)
        size = os.fstat(self.fd).st_size
        if self._sequential and self._hashed_upto == size:
            digest = self._hash.hexdigest()
        else:
            digest = self._rehash()
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        try:
            replaced = os.lstat(self.final).st_size
        except FileNotFoundError:
            replaced = 0
        try:
            os.replace(self.temp, self.final)
        except OSError:
            self.discard()
            raise
        self.done = True
        self.buffer.uploads.discard(self)
        if self.durable:
            fsync_folder(self.final.parent)
        seconds = time.monotonic() - self.started
        return Received(self.final.name, size, digest, seconds, replaced)

    def discard(self) -> None:
        """Drop the upload: close and remove the temporary file (idempotent). Whatever the
        client writes to it afterwards fails: it must never look stored."""
        if not self.done and self.failed is None:
            self.failed = OSError(errno.ECANCELED, "the upload was discarded")
        self.done = True
        self.drop_pending()
        self.buffer.uploads.discard(self)
        self._drop_base()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp)

    def _rehash(self) -> str:
        digest = hashlib.sha256()
        offset = 0
        while True:
            block = os.pread(self.fd, _HASH_BLOCK, offset)
            if not block:
                return digest.hexdigest()
            digest.update(block)
            offset += len(block)
