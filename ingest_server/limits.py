"""Upload limits: file size, account quota and the free-disk reserve, checked while writing.

Each check raises :class:`LimitHit` with one line for the client; the upload is then
discarded by its caller. The quota counts what is in the account folder when the upload
starts (an overwritten file's old size is not counted twice); two uploads racing in the same
account can together pass it by at most one file, which is accepted.
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


def folder_usage(root: Path) -> int:
    """Bytes used by the regular files in an account folder (recursively, symlinks skipped)."""
    total = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class UploadLimits:
    """The limits one upload runs under, with the folder's usage measured at its start."""

    settings: LimitSettings
    root: Path
    used_by_others: int
    written_since_disk_check: int = 0

    @classmethod
    def for_upload(cls, settings: LimitSettings, root: Path, replaced_bytes: int) -> UploadLimits:
        used = folder_usage(root) - replaced_bytes if settings.account_quota_bytes else 0
        limits = cls(settings=settings, root=root, used_by_others=max(used, 0))
        limits.check_disk(0)
        return limits

    def check(self, new_size: int, added: int) -> None:
        """Raise LimitHit if a file growing to ``new_size`` (``added`` just now) crosses one."""
        s = self.settings
        if s.max_file_bytes and new_size > s.max_file_bytes:
            raise LimitHit(
                "max_file_bytes",
                f"file too large: the most accepted per file is {s.max_file_bytes} bytes",
            )
        if s.account_quota_bytes and self.used_by_others + new_size > s.account_quota_bytes:
            raise LimitHit(
                "account_quota_bytes",
                f"account quota exceeded: the folder may hold at most "
                f"{s.account_quota_bytes} bytes",
            )
        self.written_since_disk_check += added
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
