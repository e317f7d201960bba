"""One upload in flight: written to a hidden temporary file, renamed into place on commit.

The final name appears only through :meth:`Upload.commit` (one ``rename`` in the same
folder), so a reader never sees half a file and an earlier file of that name stays intact
until the new one is complete. :meth:`Upload.discard` removes the temporary file; it is what
happens when a client dies, a limit is hit or the server shuts down.

An upload that does not truncate (resume with ``reput``, OpenSSH scp in SFTP mode, WinSCP
resume) starts from a copy of the existing file, so writes at an offset behave as if made in
place. SHA-256 is computed as the data arrives when writes are sequential, else re-read once
at commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from ingest_core.folders import AccountFolder
from ingest_server.limits import LimitHit, UploadLimits

TEMP_FILE_MODE = 0o640
_HASH_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Received:
    """What the audit log records about a committed upload."""

    name: str
    bytes: int
    sha256: str
    seconds: float


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
    ):
        self.final = final
        self.temp = folder.upload_temp(final.name, secrets.token_hex(8))
        if final.parent != folder.root:
            self.temp = final.parent / self.temp.name
        self.append = append
        self.limits = limits
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
        try:
            if not truncate and final.is_file():
                self._base_fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW)
            self.size = os.fstat(self._base_fd).st_size if self._base_fd >= 0 else 0
        except BaseException:
            self.discard()
            raise

    @property
    def name(self) -> str:
        return self.final.name

    def write(self, offset: int, data: bytes) -> int:
        if self.failed is not None:
            raise self.failed
        if self.append:
            offset = self.size
        end = offset + len(data)
        try:
            if end > self.size:
                self.limits.check(end, end - self.size)
            if self._base_fd >= 0 and offset != self._covered:
                self._materialize()
            written = os.pwrite(self.fd, data, offset)
        except (LimitHit, OSError) as exc:
            self.failed = exc
            raise
        if self._base_fd >= 0:
            self._covered = offset + written
        if self._sequential:
            if offset == self._hashed_upto:
                self._hash.update(data)
                self._hashed_upto = end
            else:
                self._sequential = False
        self.size = max(self.size, offset + written)
        return written

    def read(self, offset: int, size: int) -> bytes:
        self._materialize()
        return os.pread(self.fd, size, offset)

    def truncate(self, size: int) -> None:
        if size > self.size:
            self.limits.check(size, size - self.size)
        if self._base_fd >= 0 and size <= self._covered:
            self._drop_base()  # everything kept was written by the client
        self._materialize()
        os.ftruncate(self.fd, size)
        if size != self._hashed_upto:
            self._sequential = False
        self.size = size

    def fstat(self) -> os.stat_result:
        self._materialize()
        return os.fstat(self.fd)

    def _materialize(self) -> None:
        """Copy the existing file's bytes the client has not overwritten into the temp file."""
        if self._base_fd < 0:
            return
        offset = self._covered
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
        os.utime(self.fd, (atime, mtime))

    def commit(self) -> Received:
        """Rename into place (blocking: run it in a thread for big non-sequential files)."""
        if self.failed is not None:
            raise self.failed
        self._materialize()
        size = os.fstat(self.fd).st_size
        if self._sequential and self._hashed_upto == size:
            digest = self._hash.hexdigest()
        else:
            digest = self._rehash()
        os.close(self.fd)
        self.fd = -1
        try:
            os.replace(self.temp, self.final)
        except OSError:
            self.discard()
            raise
        self.done = True
        return Received(self.final.name, size, digest, time.monotonic() - self.started)

    def discard(self) -> None:
        """Drop the upload: close and remove the temporary file (idempotent)."""
        self.done = True
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
