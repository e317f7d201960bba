"""On-arrival pre-check: validate a file the moment it lands and tell the client the same evening.

Exactly one ``RECEIVED`` line per arrival, on any number of nodes:

- the server node that received an upload records it in the control DB's journal (a
  ``file.received`` row: account, file name, bytes, SHA-256). Every loader daemon polls the
  journal (:func:`claim_arrivals`, about once a second, a cheap query on the index of unchecked
  rows); one statement marks the rows it takes as checked by this node (``FOR UPDATE SKIP
  LOCKED`` on PostgreSQL; a single write on SQLite), so each row is checked by one node only,
  wherever the client's upload landed. A node killed between taking a row and writing its
  line leaves that arrival without a RECEIVED line (the nightly load still loads the file);
- a file put into a folder by other means (an operator's copy) has no journal row: the
  watchdog observer on this node sees it (a *moved* event for a rename into place, a *closed*
  event for a file written in place), waits :data:`WATCH_SETTLE` seconds and checks it
  unless the journal recorded an upload of that name since the file arrived. inotify sees
  only this node's own changes, so a copy made on one node is checked by that node.

In-flight names are ignored. The check runs the same validation as the nightly load and
appends one ``RECEIVED`` line to the folder log: passed (row count, and when it will load) or
the errors. It never loads and never deletes. A file whose name is not usable (not UTF-8, or
holding control characters) is reported as such, escaped, and not read.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update
from watchdog.events import (
    FileClosedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ingest_core import folder_log
from ingest_core.db import JournalEvent, open_control_db, utcnow
from ingest_core.errors import NotFound
from ingest_core.file_names import (
    UNUSABLE_NAME_REASON,
    escape_for_operator,
    undecodable_or_control,
)
from ingest_core.folders import account_folder, accounts_root, is_data_file_name
from ingest_core.schedule import Daily, parse_hhmm, utc_now
from ingest_core.settings import Settings
from ingest_core.structured_log import get_logger, log_limits
from loader.sis_db import open_sis_db
from loader.spec import closest_spec_hint, match_spec, specs_for
from loader.validate import validate_file


def next_load_time(settings: Settings, now: datetime | None = None) -> datetime:
    """When the next nightly load starts, in the configured zone."""
    daily = Daily(parse_hhmm(settings.schedule.loader_time), settings.zone)
    return daily.next_after(now or utc_now()).astimezone(settings.zone)


def precheck_file(settings: Settings, path: Path, now: datetime | None = None) -> str | None:
    """Validate one arrived file and append its RECEIVED line; returns the line (or None if
    the path is not a loadable file of an account folder)."""
    path = Path(path)
    root = accounts_root(settings)
    if path.parent.parent != root or not is_data_file_name(path.name):
        return None
    account = path.parent.name
    folder = account_folder(settings, account)
    if not path.is_file() or path.is_symlink():
        return None
    try:
        specs = specs_for(settings, account)
    except NotFound:  # a folder with no account: nothing to tell anyone
        return None
    spec = match_spec(specs, path.name)
    zone = settings.zone
    if undecodable_or_control(path.name):
        shown = escape_for_operator(path.name)
        detail = f"will NOT load: {UNUSABLE_NAME_REASON}; {closest_spec_hint(specs, shown)}"
    elif spec is None:
        detail = (
            f"will NOT load: {path.name!r} is not an approved file name; "
            f"{closest_spec_hint(specs, path.name)}"
        )
    else:
        try:
            report = validate_file(path, spec, max_errors=settings.loader.max_reported_errors)
        except FileNotFoundError:  # loaded or removed meanwhile: nothing to tell
            return None
        last = open_sis_db(settings.sis_db_url).last_loaded(account, spec.file_name)
        share = settings.loader.min_row_share
        if report.ok and last is not None and last.rows and report.rows < share * last.rows:
            detail = (
                f"will NOT load: it has {report.rows:,} data rows, less than {share:.0%} of the "
                f"{last.rows:,} rows loaded last time; check the export (if the drop is "
                "expected, ask the operator to load it with --force)"
            )
        elif report.ok:
            at = next_load_time(settings, now).isoformat(timespec="minutes")
            detail = f"passed the checks: {report.rows:,} rows; it will load at {at}"
        else:
            detail = f"will NOT load: {report.summary()}; fix the file and upload it again"
    line = folder_log.append(folder, zone, "RECEIVED", path.name, detail, now)
    get_logger(settings.log_dir, "loader", **log_limits(settings)).info(
        "precheck",
        account=account,
        file=escape_for_operator(path.name),
        passed=detail.startswith("passed"),
    )
    return line


FILE_RECEIVED = "file.received"
# How many journal rows one poll takes (the daemon polls again at once after a full batch).
CLAIM_BATCH = 20
# How long the watchdog path waits before checking a file, so the journal row of an upload
# through the server is there to say the journal path has it.
WATCH_SETTLE = 3.0
# How far before a file's arrival (its ctime, in whole seconds) the journal row of its upload
# may be stamped.
ARRIVAL_SLACK = timedelta(seconds=5)


@dataclass(frozen=True)
class Arrival:
    """One completed upload as the journal recorded it."""

    event_id: int
    account: str
    name: str
    bytes: int | None
    sha256: str


def _detail(raw: str) -> dict[str, object]:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def claim_arrivals(settings: Settings, limit: int = CLAIM_BATCH) -> list[Arrival]:
    """Take up to ``limit`` unchecked ``file.received`` rows for this node, oldest first: one
    statement marks them checked (``checked_at``, ``checked_by``) and returns them, so no
    other node takes them too."""
    db = open_control_db(settings.control_db_url)
    table = JournalEvent.__table__
    pending = (
        select(table.c.id)
        .where(table.c.kind == FILE_RECEIVED, table.c.checked_at.is_(None))
        .order_by(table.c.id)
        .limit(limit)
    )
    if db.engine.dialect.name == "postgresql":
        pending = pending.with_for_update(skip_locked=True)
    claim = (
        update(table)
        .where(table.c.id.in_(pending.scalar_subquery()))
        .values(checked_at=utcnow(), checked_by=settings.node_id)
        .returning(table.c.id, table.c.account, table.c.detail)
    )
    with db.engine.begin() as conn:
        rows = conn.execute(claim).all()
    arrivals = []
    for event_id, account, raw in sorted(rows):
        detail = _detail(raw)
        name = detail.get("name")
        if not account or not isinstance(name, str) or not name:
            continue
        size = detail.get("bytes")
        sha = detail.get("sha256")
        arrivals.append(
            Arrival(
                event_id,
                account,
                name,
                size if isinstance(size, int) else None,
                sha if isinstance(sha, str) else "",
            )
        )
    return arrivals


def precheck_arrival(
    settings: Settings, arrival: Arrival, now: datetime | None = None
) -> str | None:
    """The pre-check of one journal arrival: the file now under its name in the account's
    folder (None if it is gone: loaded or removed meanwhile)."""
    if "/" in arrival.name or arrival.name in (".", ".."):
        return None
    try:
        folder = account_folder(settings, arrival.account)
    except Exception:  # an account name that is no folder: nothing to tell anyone
        return None
    return precheck_file(settings, folder.root / arrival.name, now)


def journal_recorded(settings: Settings, account: str, name: str, since: datetime) -> bool:
    """Did a node record an upload of ``name`` into ``account``'s folder at or after ``since``?
    (Then the journal path checks it, and the watchdog path must not.)"""
    db = open_control_db(settings.control_db_url)
    with db.engine.connect() as conn:
        details = conn.scalars(
            select(JournalEvent.detail).where(
                JournalEvent.kind == FILE_RECEIVED,
                JournalEvent.account == account,
                JournalEvent.at >= since,
            )
        ).all()
    return any(_detail(raw).get("name") == name for raw in details)


def _arrival_time(path: Path) -> datetime | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return datetime.fromtimestamp(max(st.st_mtime, st.st_ctime)).astimezone()


class _Arrivals(FileSystemEventHandler):
    def __init__(self, submit: Callable[[Path], None]) -> None:
        self._submit = submit

    def on_moved(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent) and not event.is_directory:
            self._submit(Path(str(event.dest_path)))

    def on_closed(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent) and not event.is_directory:
            self._submit(Path(str(event.src_path)))


class PreCheckWatcher:
    """A watchdog observer on the accounts root plus one worker that runs the checks.

    ``check`` does the work for one path (default: :func:`precheck_file` in the worker
    thread; the daemon passes one that runs it in a child process).
    """

    def __init__(
        self,
        settings: Settings,
        check: Callable[[Path], object] | None = None,
        settle: float = WATCH_SETTLE,
    ) -> None:
        self.settings = settings
        self._check = check or (lambda p: precheck_file(settings, p))
        self._settle = settle
        self._queue: queue.Queue[tuple[Path, float] | None] = queue.Queue()
        self._observer = Observer()
        self._worker = threading.Thread(target=self._work, name="precheck", daemon=True)
        self._log = get_logger(settings.log_dir, "loader", **log_limits(settings))
        self._last: dict[Path, tuple[int, int, int]] = {}

    def start(self) -> None:
        root = accounts_root(self.settings)
        root.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Arrivals(self._enqueue), str(root), recursive=True)
        self._observer.start()
        self._worker.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=10)
        self._queue.put(None)
        self._worker.join(timeout=60)

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued check is done (tests)."""
        done = threading.Event()

        def waiter() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def _enqueue(self, path: Path) -> None:
        if path.parent.parent == accounts_root(self.settings) and is_data_file_name(path.name):
            self._queue.put((path, time.monotonic() + self._settle))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                path, due = item
                time.sleep(max(0.0, due - time.monotonic()))
                if self._is_new_version(path) and not self._in_journal(path):
                    self._check(path)
            except Exception as exc:  # one bad file never stops the watcher
                self._log.error(
                    "precheck_failed",
                    file=escape_for_operator(str(path)),
                    error=escape_for_operator(str(exc)),
                )
            finally:
                self._queue.task_done()

    def _in_journal(self, path: Path) -> bool:
        """An upload the journal recorded is the journal path's to check."""
        arrived = _arrival_time(path)
        if arrived is None:
            return False
        since = arrived.replace(microsecond=0) - ARRIVAL_SLACK
        return journal_recorded(self.settings, path.parent.name, path.name, since)

    def _is_new_version(self, path: Path) -> bool:
        """Skip a second event for the very same file (a rename and a close can both fire)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._last.get(path) == version:
            return False
        self._last[path] = version
        if len(self._last) > 10_000:
            self._last.clear()
        return True
