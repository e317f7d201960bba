"""Upload limits: file size, account quota and the free-disk reserve, checked while writing.

Each check raises :class:`LimitHit` with one line for the client; the upload is then
discarded by its caller. The account quota is kept by the ledger (``ledger.py``): an upload
reserves its bytes there before writing them, so uploads racing in one account, in any
session or worker, cannot pass it together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ingest_core.settings import LimitSettings

# Free space is asked of the file system at most once per this many bytes written.
DISK_CHECK_EVERY = 4 * 1024 * 1024


class LimitHit(Exception):
    """An upload would cross a limit; ``kind`` names which one (for the audit log)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class UploadLimits:
    """The per-file limits one upload runs under (the account quota is the ledger's)."""

    settings: LimitSettings
    root: Path
    written_since_disk_check: int = 0

    @classmethod
    def for_upload(cls, settings: LimitSettings, root: Path) -> UploadLimits:
        limits = cls(settings=settings, root=root)
        limits.check_disk(0)
        return limits

    def refusal(self, size: int, offset: int, end: int) -> LimitHit | None:
        """Why a file of ``size`` bytes may not be written from ``offset`` to ``end`` (a hole
        too far past its end, or past the file size limit); None if it may."""
        s = self.settings
        if s.max_hole_bytes and offset > size + s.max_hole_bytes:
            return LimitHit(
                "max_hole_bytes",
                f"write refused: it starts {offset - size} bytes past the end of the file; "
                f"writes may start at most {s.max_hole_bytes} bytes past it",
            )
        if s.max_file_bytes and end > s.max_file_bytes:
            return LimitHit(
                "max_file_bytes",
                f"file too large: the most accepted per file is {s.max_file_bytes} bytes",
            )
        return None

    def check_growth(self, size: int, offset: int, end: int) -> None:
        """Raise LimitHit if growing a file of ``size`` bytes by writing from ``offset`` to
        ``end`` crosses a limit (see :meth:`refusal`) or the free-disk reserve."""
        refusal = self.refusal(size, offset, end)
        if refusal is not None:
            raise refusal
        self.written_since_disk_check += end - size
        if self.written_since_disk_check >= DISK_CHECK_EVERY:
            self.written_since_disk_check = 0
            self.check_disk(0)

    def check_disk(self, more: int) -> None:
        reserve = self.settings.free_disk_reserve_bytes
        if reserve and free_bytes(self.root) - more < reserve:
            raise LimitHit(
                "free_disk_reserve_bytes",
                "server disk is nearly full: upload refused, try again later",
            )


def quota_refusal(quota: int, used: int | None, needed: int) -> LimitHit:
    """What a client hears when its account's quota has no room for more: the quota, what the
    folder holds and what this upload needed, so the client knows what to remove."""
    holds = f"; it holds {used} (files stored and uploads in progress)" if used is not None else ""
    return LimitHit(
        "account_quota_bytes",
        f"account quota exceeded: the folder may hold at most {quota} bytes{holds}, "
        f"and this upload needs {needed} more: remove files or ask the operators for more",
    )
