"""Where everything of an account lives on disk: the one place these paths are computed.

Layout under the data root::

    accounts/<name>/                    the account's SSH folder (the client's whole world)
    accounts/<name>/sis_loader.log      the loader's result log (read-only for the client)
    accounts/<name>/applicant_pool.txt  the pool file of deferred-fetch accounts (read-only)
    accounts/<name>/.ingest-upload-*    uploads in flight (hidden, never loaded)
    accounts/<name>/.ingest-*           other service files (hidden from clients' listings)
    locks/<name>.lock                   one loader run per account at a time
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ingest_core.settings import Settings

ACCOUNTS_DIR = "accounts"
LOCKS_DIR = "locks"
FOLDER_MODE = 0o750
LOG_FILE_NAME = "sis_loader.log"
POOL_FILE_NAME = "applicant_pool.txt"
SERVICE_PREFIX = ".ingest-"
UPLOAD_TEMP_PREFIX = ".ingest-upload-"
POOL_TEMP_PREFIX = ".ingest-pool-"
LOG_TRIM_TEMP_PREFIX = ".ingest-log-trim-"
LOG_LOCK_NAME = ".ingest-log.lock"
# A temporary file of ours not touched for this long was left by a process that died.
STALE_TEMP_SECONDS = 3600
PARTIAL_SUFFIXES = (".filepart", ".part", ".partial", ".tmp")

READ_ONLY_NAMES = frozenset({LOG_FILE_NAME, POOL_FILE_NAME})


@dataclass(frozen=True)
class AccountFolder:
    """The paths of one account's folder."""

    name: str
    root: Path

    @property
    def log_file(self) -> Path:
        return self.root / LOG_FILE_NAME

    @property
    def pool_file(self) -> Path:
        return self.root / POOL_FILE_NAME

    @property
    def log_lock(self) -> Path:
        return self.root / LOG_LOCK_NAME

    def upload_temp(self, token: str) -> Path:
        """Hidden temporary name for an upload, in the same folder. It does not carry the
        final name, so a name of up to 255 bytes (the file system's limit) can be uploaded."""
        return self.root / f"{UPLOAD_TEMP_PREFIX}{token}"

    def pool_temp(self, token: str) -> Path:
        """Hidden temporary name a new pool file is written under."""
        return self.root / f"{POOL_TEMP_PREFIX}{token}"

    def log_trim_temp(self) -> Path:
        """Hidden temporary name a trimmed log is written under (one trim at a time: the
        log's lock is held)."""
        return self.root / f"{LOG_TRIM_TEMP_PREFIX}{os.getpid()}"

    def remove_stale(self, prefix: str, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove our temporary files with ``prefix`` not modified for ``older_than``
        seconds (left by a process that was killed); returns how many."""
        removed = 0
        now = time.time()
        for path in self.root.glob(f"{prefix}*"):
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime >= older_than:
                    path.unlink()
                    removed += 1
        return removed

    def candidate_files(self) -> list[Path]:
        """Complete data files a loader may look at (not temp, partial, log or pool files).

        Names are whatever the folder holds, undecodable bytes (as os.fsdecode's lone
        surrogates) and control characters included: listing never fails on them, and the
        caller decides with ``file_names.undecodable_or_control`` whether it can use one.
        """
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_file() and not p.is_symlink() and is_data_file_name(p.name)
        )


def accounts_root(settings: Settings) -> Path:
    return settings.data_root / ACCOUNTS_DIR


def account_folder(settings: Settings, name: str) -> AccountFolder:
    return AccountFolder(name=name, root=accounts_root(settings) / name)


def lock_path(settings: Settings, name: str) -> Path:
    return settings.data_root / LOCKS_DIR / f"{name}.lock"


def is_read_only_name(name: str) -> bool:
    """Files the service writes and the client may only read."""
    return name in READ_ONLY_NAMES


def is_service_name(name: str) -> bool:
    """Service-internal files: never listed to, opened by or replaced by a client."""
    return name.startswith(SERVICE_PREFIX)


def is_in_flight_name(name: str) -> bool:
    """Uploads not yet complete: our hidden temp files and the clients' own partial names."""
    return name.startswith((UPLOAD_TEMP_PREFIX, POOL_TEMP_PREFIX)) or name.endswith(
        PARTIAL_SUFFIXES
    )


def is_data_file_name(name: str) -> bool:
    """A name the loader may consider: visible, complete, not one of the service's own files."""
    return not name.startswith(".") and not is_in_flight_name(name) and not is_read_only_name(name)


def upload_owner(pid: int | None = None) -> str:
    """Which process on which machine writes an upload (part of its temporary name), so the
    files of a process that died are removed at once, and never another node's on shared
    storage."""
    return f"{_host_tag()}-{pid or os.getpid()}"


@functools.cache
def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _remove_uploads(settings: Settings, prefix: str, older_than: float) -> int:
    root = accounts_root(settings)
    if not root.is_dir():
        return 0
    folders = (account_folder(settings, entry.name) for entry in root.iterdir())
    return sum(f.remove_stale(prefix, older_than) for f in folders if f.root.is_dir())


def remove_stale_uploads(settings: Settings, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Temporary upload files left by a crashed server (not touched for an hour)."""
    return _remove_uploads(settings, UPLOAD_TEMP_PREFIX, older_than)


def remove_uploads_of(settings: Settings, pid: int) -> int:
    """Temporary upload files of a server process of this machine that has exited (blocking:
    it lists every account folder)."""
    return _remove_uploads(settings, f"{UPLOAD_TEMP_PREFIX}{upload_owner(pid)}-", 0.0)


def ensure_base_folders(settings: Settings) -> None:
    """Create the data root, accounts, locks, log and host key folders (idempotent)."""
    for folder, mode in (
        (settings.data_root, 0o750),
        (accounts_root(settings), 0o750),
        (settings.data_root / LOCKS_DIR, 0o750),
        (settings.log_dir, 0o750),
        (settings.server.host_key_dir, 0o700),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, mode)


def create_account_folder(settings: Settings, name: str) -> AccountFolder:
    folder = account_folder(settings, name)
    accounts_root(settings).mkdir(parents=True, exist_ok=True)
    folder.root.mkdir(mode=FOLDER_MODE, exist_ok=True)
    os.chmod(folder.root, FOLDER_MODE)
    return folder
