"""Where everything of an account lives on disk: the one place these paths are computed.

Layout under the data root::

    accounts/<name>/                    the account's SSH folder (the client's whole world)
    accounts/<name>/sis_loader.log      the loader's result log (read-only for the client)
    accounts/<name>/applicant_pool.txt  the pool file of deferred-fetch accounts (read-only)
    accounts/<name>/.ingest-upload-<node>-<pid>-<random>
                                        uploads in flight (hidden, never loaded): the name
                                        says which node and process writes it
    accounts/<name>/.ingest-*           other service files (hidden from clients' listings)
    locks/<name>.lock                   one loader run per account at a time
    nodes/<node>                        touched by each serving node's heartbeat
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest_core.settings import Settings, safe_node_name

ACCOUNTS_DIR = "accounts"
LOCKS_DIR = "locks"
NODES_DIR = "nodes"
FOLDER_MODE = 0o750
LOG_FILE_NAME = "sis_loader.log"
POOL_FILE_NAME = "applicant_pool.txt"
SERVICE_PREFIX = ".ingest-"
UPLOAD_TEMP_PREFIX = ".ingest-upload-"
POOL_TEMP_PREFIX = ".ingest-pool-"
LOG_TRIM_TEMP_PREFIX = ".ingest-log-trim-"
LOG_LOCK_NAME = ".ingest-log.lock"
# A pool or log temporary file not touched for this long was left by a process that died
# (uploads' temporary files are removed by their node's rules instead: ingest_core/nodes.py).
STALE_TEMP_SECONDS = 3600
PARTIAL_SUFFIXES = (".filepart", ".part", ".partial", ".tmp")

READ_ONLY_NAMES = frozenset({LOG_FILE_NAME, POOL_FILE_NAME})


@dataclass(frozen=True)
class AccountFolder:
    """The paths of one account's folder."""

    name: str
    root: Path
    node: str = ""  # the node whose uploads this view writes ("": this machine's host name)

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
        """Hidden temporary name for an upload, in the same folder: the node's id, then
        ``token`` (``upload_owner()`` and a random part), so a leftover says which node and
        process wrote it. It does not carry the final name, so a name of up to 255 bytes
        (the file system's limit) can be uploaded."""
        return self.root / f"{UPLOAD_TEMP_PREFIX}{node_tag(self.node)}-{token}"

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
    return AccountFolder(name=name, root=accounts_root(settings) / name, node=settings.node_id)


def lock_path(settings: Settings, name: str) -> Path:
    return settings.data_root / LOCKS_DIR / f"{name}.lock"


def nodes_dir(settings: Settings) -> Path:
    """Where each node's marker lives (one file per node, touched by its heartbeat)."""
    return settings.data_root / NODES_DIR


def node_marker(settings: Settings, node: str) -> Path:
    return nodes_dir(settings) / node_tag(node)


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


node_tag = safe_node_name  # a node's name as it goes into temporary file names
_UPLOAD_TEMP = re.compile(r"^(?P<node>[A-Za-z0-9._-]{1,64})-(?P<pid>[0-9]{1,10})-[0-9a-f]+$")


def upload_owner(pid: int | None = None) -> str:
    """Which process writes an upload (the part of its temporary name after the node's id),
    so the files of a process that died are removed at once."""
    return str(pid or os.getpid())


def upload_writer(name: str) -> tuple[str, int] | None:
    """(node tag, pid) of the process that wrote the upload temporary file ``name``; None
    for any other name (or one this version did not write)."""
    if not name.startswith(UPLOAD_TEMP_PREFIX):
        return None
    found = _UPLOAD_TEMP.match(name[len(UPLOAD_TEMP_PREFIX) :])
    return (found["node"], int(found["pid"])) if found else None


def upload_node(name: str) -> str | None:
    """The node tag in the upload temporary file ``name`` (None: not one this version wrote)."""
    writer = upload_writer(name)
    return writer[0] if writer else None


def files_under(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every file entry under ``root``, subfolders included, never following a symlink
    (blocking: it lists them all); folders that cannot be listed are passed over."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                stack.append(Path(entry.path))
            else:
                yield entry


def upload_temp_files(settings: Settings) -> Iterator[Path]:
    """Every upload temporary file under every account folder, subfolders included (blocking:
    it lists them all; symlinks are never followed)."""
    root = accounts_root(settings)
    for entry in files_under(root):
        if entry.name.startswith(UPLOAD_TEMP_PREFIX) and Path(entry.path).parent != root:
            yield Path(entry.path)


def remove_upload_temps(settings: Settings, doomed: Callable[[Path], bool]) -> int:
    """Remove the upload temporary files for which ``doomed(path)`` is true; how many."""
    removed = 0
    for path in upload_temp_files(settings):
        with contextlib.suppress(OSError):
            if doomed(path):
                path.unlink()
                removed += 1
    return removed


def remove_uploads_of_node(settings: Settings) -> int:
    """Every upload temporary file this node wrote, whatever its age: at start, none of its
    processes runs any more (blocking)."""
    tag = node_tag(settings.node_id)
    return remove_upload_temps(settings, lambda path: upload_node(path.name) == tag)


def remove_uploads_of(settings: Settings, pid: int) -> int:
    """Upload temporary files of a server process of this node that has exited (blocking:
    it lists every account folder)."""
    writer = (node_tag(settings.node_id), pid)
    return remove_upload_temps(settings, lambda p: upload_writer(p.name) == writer)


def ensure_base_folders(settings: Settings) -> None:
    """Create the data root, accounts, locks, log and host key folders (idempotent)."""
    for folder, mode in (
        (settings.data_root, 0o750),
        (accounts_root(settings), 0o750),
        (settings.data_root / LOCKS_DIR, 0o750),
        (nodes_dir(settings), 0o750),
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
