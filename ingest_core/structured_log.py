"""Structured JSON-lines logs (structlog) in the log folder, one file per component.

One event per line with an ISO UTC timestamp. Callers pass facts (account, address,
fingerprint, byte counts), never key material, passwords or file contents.

The logs stay bounded whatever a client does:

- A file is rotated by size (``NAME.jsonl`` -> ``NAME.jsonl.1`` ... ``.N``). Several processes
  append to one file (the server's listener and its workers), so rotation happens under an
  ``flock`` on a lock file in the log folder, and a process whose open file was renamed away
  (by another process or by an external logrotate) notices and reopens: no signal needed.
- When the log folder's disk has less than the free-disk reserve left, info lines are counted
  instead of written (warnings and errors still go out while a small hard floor remains);
  once space returns one ``log.resumed`` line says how many were dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ingest_core.settings import LimitSettings, LogSettings

if TYPE_CHECKING:
    from ingest_core.settings import Settings

LOG_FILE_MODE = 0o640
# How often a process compares its open file with the one at the path (a logrotate rename).
REOPEN_CHECK_SECONDS = 1.0
# After a failed rotation (the folder not writable), the file grows on until this many seconds.
ROTATION_RETRY_SECONDS = 60.0
# How often the free space of the log folder's filesystem is measured (statvfs).
DISK_CHECK_SECONDS = 5.0
# Below this much free space even warnings and errors are dropped (the disk must not fill up
# to the last byte because of our logs); never more than half the reserve.
HARD_FLOOR_BYTES = 16 * 1024**2
# A service's start and stop lines are kept like warnings when the disk is nearly full: there
# are a handful a day, and operators (and the tests) need to see that a service runs.
KEPT_EVENT_SUFFIXES = (".started", ".stopping", ".stopped")
# The record attribute that carries the event name from structlog to the file handler.
_EVENT_NAME = "sis_event"

_DEFAULT_MAX_BYTES = LogSettings.max_bytes
_DEFAULT_BACKUPS = LogSettings.backups
_DEFAULT_DISK_RESERVE = LimitSettings.free_disk_reserve_bytes


def log_limits(settings: Settings) -> dict[str, int]:
    """The keyword arguments of :func:`get_logger` that come from the settings, so every
    caller passes the same ones: ``get_logger(dir, "loader", **log_limits(settings))``."""
    return {
        "max_bytes": settings.logs.max_bytes,
        "backups": settings.logs.backups,
        "disk_reserve": settings.limits.free_disk_reserve_bytes,
    }


def log_file(log_dir: Path, component: str) -> Path:
    return log_dir / f"{component}.jsonl"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class DiskReserveGuard:
    """Decides per line whether the log folder's disk can still take it.

    Free space is measured at most every ``DISK_CHECK_SECONDS`` (a statvfs per line would cost
    more than the line). Below ``reserve`` only warnings, errors and start/stop lines pass;
    below the hard floor nothing does. Dropped lines are counted for the ``log.resumed`` line.
    """

    def __init__(
        self,
        folder: Path,
        reserve: int,
        clock: Callable[[], float] = time.monotonic,
        free_bytes: Callable[[Path], int] = _free_bytes,
    ) -> None:
        self.folder = folder
        self.reserve = reserve
        self.clock = clock
        self.free_bytes = free_bytes
        self.dropped = 0
        self.free = -1  # unknown until the first check
        self._next_check = 0.0

    @property
    def hard_floor(self) -> int:
        return min(self.reserve // 2, HARD_FLOOR_BYTES)

    def refresh(self) -> None:
        """Measure the free space if the last measure is older than DISK_CHECK_SECONDS."""
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + DISK_CHECK_SECONDS
        try:
            self.free = self.free_bytes(self.folder)
        except OSError:
            self.free = -1  # cannot tell: write, and let a real ENOSPC be counted

    def measure_soon(self) -> None:
        self._next_check = 0.0

    def low(self) -> bool:
        """Below the reserve (info lines are dropped)."""
        return bool(self.reserve) and 0 <= self.free < self.reserve

    def admits(self, level: int, event: str) -> bool:
        if not self.low():
            return True
        if self.free < self.hard_floor:
            return False
        return level >= logging.WARNING or event.endswith(KEPT_EVENT_SUFFIXES)


class RotatingJsonLinesHandler(logging.Handler):
    """Appends one JSON line per record to ``path``, rotating it by size; safe with several
    processes appending to the same file.

    Each line is one ``write`` on an ``O_APPEND`` descriptor, so lines of different processes
    never interleave. A file is rotated only once it has reached ``max_bytes``, and every
    process checks its own file's size before each line: a process still holding a file that
    another one rotated away sees it full and reopens instead of writing on: only a line racing
    the rotation itself lands in ``.1``, none in a file already deleted (with ``backups`` > 0).
    Renames made by anyone else (logrotate with ``create``) are noticed within
    ``REOPEN_CHECK_SECONDS``.
    """

    def __init__(
        self,
        path: Path,
        component: str,
        max_bytes: int = _DEFAULT_MAX_BYTES,
        backups: int = _DEFAULT_BACKUPS,
        disk_reserve: int = _DEFAULT_DISK_RESERVE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.path = path
        self.component = component
        self.max_bytes = max_bytes
        self.backups = backups
        self.clock = clock
        self.guard = DiskReserveGuard(path.parent, disk_reserve, clock)
        self.lock_path = path.parent / f".{path.name}.lock"
        self._fd: int | None = None
        self._next_identity_check = 0.0
        self._paused_written = False
        self._line_cut = False  # a full disk cut our last line short
        self._rotation_retry_at = 0.0

    # -- the logging.Handler side -------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # The message only: the JSON already holds any traceback (format_exc_info); the
            # stdlib Formatter would append it raw, over several lines.
            line = record.getMessage()
        except Exception:
            self.handleError(record)
            return
        event = str(getattr(record, _EVENT_NAME, ""))
        self.write_event_line(line, record.levelno, event)

    def close(self) -> None:
        with self.lock:
            self._close_file()
        super().close()

    # -- writing ------------------------------------------------------------------------------

    def write_event_line(self, line: str, level: int, event: str) -> bool:
        """Write one rendered line unless the disk reserve says no; True if it was written."""
        with self.lock:
            guard = self.guard
            guard.refresh()
            if not guard.admits(level, event):
                guard.dropped += 1
                self._note_pause()
                return False
            if not guard.low() and (guard.dropped or self._paused_written):
                self._resume()
            if self._write(line):
                return True
            guard.dropped += 1
            return False

    def _note_pause(self) -> None:
        """One warning line when info lines start being dropped (if the floor allows it)."""
        if self._paused_written or self.guard.free < self.guard.hard_floor:
            return
        self._paused_written = self._write(
            self._own_line(
                "log.paused",
                "warning",
                free_bytes=self.guard.free,
                reserve_bytes=self.guard.reserve,
                reason="the log folder's disk is nearly full: info lines are counted, not "
                "written, until space returns",
            )
        )

    def _resume(self) -> None:
        """The ``log.resumed`` line; the count is kept until that line is on disk."""
        dropped = self.guard.dropped
        if dropped:
            line = self._own_line(
                "log.resumed", "warning", dropped_lines=dropped, free_bytes=self.guard.free
            )
            if not self._write(line):
                return
        self.guard.dropped -= dropped
        self._paused_written = False

    def _own_line(self, event: str, level: str, **fields: Any) -> str:
        """A line the handler writes about itself, shaped like structlog's."""
        return json.dumps(
            {
                "component": self.component,
                "pid": os.getpid(),
                **fields,
                "event": event,
                "level": level,
                "timestamp": _now_iso(),
            },
            default=str,
        )

    def _write(self, line: str) -> bool:
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self._line_cut:
            data = b"\n" + data  # end the piece a full disk cut off: this line stays whole
        try:
            fd = self._ready_file()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                self._line_cut = True
                view = view[written:]
            self._line_cut = False
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.guard.measure_soon()  # the last measure is out of date
            else:
                self._report_error(exc)
            return False
        return True

    def _report_error(self, exc: OSError) -> None:
        if logging.raiseExceptions:
            print(f"sis-ingest: cannot write {self.path}: {exc}", file=sys.stderr)

    # -- the open file, rotation, reopening ---------------------------------------------------

    def _ready_file(self) -> int:
        """The descriptor to write the next line to: reopened if the file at the path is
        another one, rotated first if it is full."""
        if self._fd is None:
            self._open()
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if self.max_bytes and size >= self.max_bytes and self.clock() >= self._rotation_retry_at:
            try:
                self._rotate_or_reopen()
            except OSError as exc:  # e.g. the folder turned read-only: keep the file we have
                self._rotation_retry_at = self.clock() + ROTATION_RETRY_SECONDS
                self._report_error(exc)
                if self._fd is None:
                    self._open()
        else:
            now = self.clock()
            if now >= self._next_identity_check:
                self._next_identity_check = now + REOPEN_CHECK_SECONDS
                if not self._path_is_open_file():
                    self._open()
        assert self._fd is not None
        return self._fd

    def _path_is_open_file(self) -> bool:
        assert self._fd is not None
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino)

    def _open(self) -> None:
        """(Re)open the path for appending; a file we create gets LOG_FILE_MODE exactly,
        whatever the umask."""
        self._close_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
            os.fchmod(fd, LOG_FILE_MODE)
        except FileExistsError:
            fd = os.open(self.path, flags | os.O_CREAT, LOG_FILE_MODE)
        self._fd = fd
        self._next_identity_check = self.clock() + REOPEN_CHECK_SECONDS

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _rotate_or_reopen(self) -> None:
        """Our file is full: under the folder's rotation lock, reopen if someone else already
        rotated it, else rotate it ourselves. The lock file is opened per rotation, so a
        forked child never shares the parent's lock."""
        lock_fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not self._path_is_open_file():
                self._open()  # rotated by another process (or logrotate)
                assert self._fd is not None
                if os.fstat(self._fd).st_size < self.max_bytes:
                    return
            self._rotate()
            self._open()
        finally:
            os.close(lock_fd)  # releases the flock

    def _rotate(self) -> None:
        """NAME -> NAME.1 -> ... -> NAME.<backups>; the oldest falls off the end."""
        if self.backups <= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        for number in range(self.backups - 1, 0, -1):
            older = _numbered(self.path, number)
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, _numbered(self.path, number + 1))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, _numbered(self.path, 1))


def _numbered(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def _render_with_event_name(logger: Any, method_name: str, event_dict: Any) -> Any:
    """The JSON line for the stdlib logger, with the event name beside it for the handler's
    disk-reserve decision (structlog passes a final ``(args, kwargs)`` through)."""
    name = str(event_dict.get("event", ""))
    line = _json_renderer(logger, method_name, event_dict)
    return (line,), {"extra": {_EVENT_NAME: name}}


_json_renderer = structlog.processors.JSONRenderer(sort_keys=False, default=str)
_configured: dict[str, tuple[logging.Logger, RotatingJsonLinesHandler]] = {}
_lock = threading.Lock()

# Called with every event logged to one (folder, component) in this process, before it is
# rendered: how the server's activity journal gets its rows (ingest_core.journal).
EventSink = Callable[[dict[str, Any]], None]
_sinks: dict[str, tuple[EventSink, ...]] = {}


def _logger_key(log_dir: Path, component: str) -> str:
    return f"{log_dir}:{component}"


def add_event_sink(log_dir: Path, component: str, sink: EventSink) -> None:
    """Also hand every event of ``component``'s log (this process) to ``sink``; it must be
    quick and never block (the server's event loop calls it)."""
    key = _logger_key(log_dir, component)
    with _lock:
        _sinks[key] = (*_sinks.get(key, ()), sink)


def remove_event_sink(log_dir: Path, component: str, sink: EventSink) -> None:
    key = _logger_key(log_dir, component)
    with _lock:
        kept = tuple(s for s in _sinks.get(key, ()) if s != sink)
        if kept:
            _sinks[key] = kept
        else:
            _sinks.pop(key, None)


def _to_sinks(key: str) -> Callable[[Any, str, Any], Any]:
    """The processor that shows each event to the sinks of its log; a failing sink costs
    the log line nothing."""

    def process(logger: Any, method_name: str, event_dict: Any) -> Any:
        for sink in _sinks.get(key, ()):
            try:
                sink(event_dict)
            except Exception:  # the log line matters more than its copy
                continue
        return event_dict

    return process


def _stdlib_logger(
    log_dir: Path, component: str, echo: bool, max_bytes: int, backups: int, disk_reserve: int
) -> tuple[logging.Logger, RotatingJsonLinesHandler]:
    # Not from logging.getLogger: one logger per (folder, component), so two log folders in
    # one process (tests) never steal each other's handler.
    logger = logging.Logger(f"sis_ingest.{component}", logging.INFO)
    logger.propagate = False
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = RotatingJsonLinesHandler(
        log_file(log_dir, component), component, max_bytes, backups, disk_reserve
    )
    logger.addHandler(handler)
    if echo:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    return logger, handler


def get_logger(
    log_dir: Path,
    component: str,
    echo: bool = False,
    *,
    max_bytes: int = _DEFAULT_MAX_BYTES,
    backups: int = _DEFAULT_BACKUPS,
    disk_reserve: int = _DEFAULT_DISK_RESERVE,
    **bound: Any,
) -> Any:
    """A structlog logger that writes JSON lines to ``<log_dir>/<component>.jsonl``.

    ``max_bytes`` (0: never rotated by us), ``backups`` and ``disk_reserve`` come from the
    settings (``**log_limits(settings)``); the newest values given win for the file.
    """
    key = _logger_key(log_dir, component)
    with _lock:
        configured = _configured.get(key)
        if configured is None:
            configured = _stdlib_logger(log_dir, component, echo, max_bytes, backups, disk_reserve)
            _configured[key] = configured
        std, handler = configured
        with handler.lock:
            handler.max_bytes, handler.backups = max_bytes, backups
            handler.guard.reserve = disk_reserve
    return structlog.wrap_logger(
        std,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _to_sinks(key),
            structlog.processors.format_exc_info,
            _render_with_event_name,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        component=component,
        **bound,
    )


def log_files(log_dir: Path, component: str) -> list[Path]:
    """A component's log files, oldest first: ``NAME.jsonl.N`` (or ``.N.gz`` from logrotate's
    ``compress``) ... ``NAME.jsonl.1``, then ``NAME.jsonl``."""
    current = log_file(log_dir, component)
    numbered: list[tuple[int, Path]] = []
    for path in log_dir.glob(f"{current.name}.*"):
        number = path.name[len(current.name) + 1 :].removesuffix(".gz")
        if number.isdigit():
            numbered.append((int(number), path))
    numbered.sort(key=lambda pair: (-pair[0], pair[1].name))
    return [path for _, path in numbered] + [current]


def iter_events(log_dir: Path, component: str) -> Iterator[dict[str, Any]]:
    """Every event of a component's logs, oldest first, the rotated files included; lines
    that are not a JSON object (a line cut by a full disk) are skipped. Split on ``\\n``
    only, as the writer does."""
    for path in log_files(log_dir, component):
        opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rb") as handle:
                for line in handle:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield event
        except (FileNotFoundError, EOFError, gzip.BadGzipFile):
            continue  # rotated away while we listed, or a .gz still being written


def read_events(log_dir: Path, component: str) -> list[dict[str, Any]]:
    """Parse a component's JSON-lines logs, rotated ones included (tests read them)."""
    return list(iter_events(log_dir, component))
