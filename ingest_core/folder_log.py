"""The account folder's result log: the one plain-text file a client reads to learn what happened.

One line per event, newest last: ``ISO-timestamp-with-offset STATUS file detail``. Lines are
appended with O_APPEND and fsync'ed, never rewritten; trimming old lines writes a new file
and renames it over the old one, so a reader sees either the old or the new file, whole.

Writer and readers agree on what a line is: text up to a line feed (LF). The writer escapes every
control character and line separator (U+2028, U+0085, CR...) of a file name or a detail, so a
name can never start a line of its own (a forged entry), and readers split on LF only.

Operators may edit the log by hand, so any line is tolerated: a line whose timestamp is
missing, unparsable or has no offset is kept as it is, and left out of every comparison
(the retention trim keeps it). A log saved without a final line feed gets one before the
next event, so the event starts a line of its own.

The log is never followed through a symbolic link, and only a regular file is read or
written (O_NOFOLLOW, then fstat): a link planted there once sent the appends to a file outside
the folder. Such a log is refused with :class:`UnsafeLogFile`, and nothing repairs it behind
the operators' back: the link (or FIFO, or folder) stays until an operator replaces it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from ingest_core.durable_files import replace_file
from ingest_core.file_names import escape_for_operator
from ingest_core.folders import LOG_TRIM_TEMP_PREFIX, AccountFolder

# SKIPPED: a file whose name matches no approved one (told once per arrival, not a failure);
# WARNING: a file not loaded, to be deleted soon; REMOVED: deleted, never loaded (retention);
# LATE: an approved file that loaded before has not loaded for several runs in a row.
STATUSES = (
    "LOADED",
    "NO FILE",
    "ERROR",
    "RECEIVED",
    "POOL",
    "SKIPPED",
    "WARNING",
    "REMOVED",
    "LATE",
)

# Never through a link, never blocking on a FIFO someone put there, never inherited.
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeLogFile(OSError):
    """The log's name holds something other than a regular file (a symbolic link, a FIFO, a
    folder): it is neither read nor written, and left as it is for an operator to replace."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(
            errno.ELOOP if what == "a symbolic link" else errno.EINVAL,
            f"{path} is {what}, not a regular file; the folder log is never read or written "
            f"through it: replace it with a regular file (e.g. rm it; the next event creates "
            f"a new log)",
        )
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


def format_line(when: datetime, status: str, file_name: str, detail: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown folder log status {status!r}")
    if when.tzinfo is None:
        raise ValueError("folder log timestamps must carry an offset")
    # One event, one line: whitespace (line breaks included) becomes spaces, and whatever
    # control character is left is escaped, like the file name.
    flat = escape_for_operator(" ".join(detail.split()))
    return (
        f"{when.isoformat(timespec='seconds')} {status} {_file_field(file_name)} {flat}".rstrip()
        + "\n"
    )


def _file_field(file_name: str) -> str:
    r"""The file name as one field, escaped (any name: undecodable bytes show as ``\xff``),
    and quoted (JSON string) when it holds a space or a quote."""
    if not file_name:
        return "-"
    file_name = escape_for_operator(file_name)
    if any(c.isspace() for c in file_name) or file_name.startswith('"'):
        return json.dumps(file_name, ensure_ascii=False)
    return file_name


def line_time(line: str) -> datetime | None:
    """When a line says it happened; None for a line whose timestamp is missing, unparsable
    or without an offset (a hand edit): such a line is never compared with anything."""
    try:
        when = datetime.fromisoformat(line.split(" ", 1)[0])
    except (ValueError, TypeError, OverflowError):
        return None
    return when if when.utcoffset() is not None else None


def parse_line(line: str) -> dict[str, str]:
    """Split ``time STATUS file detail`` back into its fields (the inverse of format_line).

    A line the service did not write (no timestamp with an offset, or no known status)
    comes back whole as the detail, with the other fields empty."""
    stamp, _, rest = line.partition(" ")
    status = next((s for s in STATUSES if rest.startswith(s + " ") or rest == s), "")
    if not status or line_time(line) is None:
        return {"time": "", "status": "", "file": "", "detail": line}
    rest = rest[len(status) :].lstrip()
    if rest.startswith('"'):
        try:
            file_name, end = json.JSONDecoder().raw_decode(rest)
            return {
                "time": stamp,
                "status": status,
                "file": file_name,
                "detail": rest[end:].lstrip(),
            }
        except ValueError:
            pass
    file_name, _, detail = rest.partition(" ")
    return {"time": stamp, "status": status, "file": file_name, "detail": detail}


@contextmanager
def _locked(folder: AccountFolder) -> Iterator[None]:
    """Serialize writers of one log (appenders and the trimmer) across processes."""
    fd = os.open(folder.log_lock, os.O_RDWR | os.O_CREAT | _SAFE_OPEN, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append(
    folder: AccountFolder,
    zone: ZoneInfo,
    status: str,
    file_name: str,
    detail: str,
    when: datetime | None = None,
) -> str:
    """Append one durable line to the account's log and return it.

    All or nothing: a write cut short (a full disk) is cut back off, so the log never holds
    half a line for the next one to run into. A log whose last line has no line feed (saved
    by hand) gets one first. Raises :class:`UnsafeLogFile` when the name is not a regular file.
    """
    line = format_line((when or datetime.now(zone)).astimezone(zone), status, file_name, detail)
    data = line.encode("utf-8")
    with _locked(folder):
        fd = _open_log(folder.log_file, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size  # appends only happen under the lock
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, f"short write to {folder.log_file}")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    return line


def _open_log(path: Path, flags: int) -> int:
    """Open the log itself, never what a link points at; refuse anything but a regular file."""
    try:
        fd = os.open(path, flags | _SAFE_OPEN, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeLogFile(path, "a symbolic link") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):  # a folder; a FIFO nobody reads
            raise UnsafeLogFile(path, _kind(os.lstat(path).st_mode)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeLogFile(path, _kind(mode))
    return fd


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def check_writable(folder: AccountFolder) -> None:
    """Raise :class:`UnsafeLogFile` now if the log could not take a line (a link, a FIFO...),
    so a caller can refuse to act before it has done anything the client would not hear of."""
    with contextlib.suppress(FileNotFoundError):  # the first append creates it
        os.close(_open_log(folder.log_file, os.O_RDONLY))


def read_lines(folder: AccountFolder) -> list[str]:
    """The log's lines, split on LF only, as written (never on U+2028, U+0085 or CR).

    Bytes that are not UTF-8 (a hand edit, an older writer) come back as lone surrogates,
    so a line is never lost and :func:`trim` writes it back byte for byte. Raises
    :class:`UnsafeLogFile` rather than read through a link or from a FIFO.
    """
    try:
        fd = _open_log(folder.log_file, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def trim(folder: AccountFolder, retention_days: int, now: datetime) -> int:
    """Drop lines older than the retention; returns how many were dropped. A line without a
    readable timestamp carrying an offset is kept: nothing says it is old."""
    cutoff = now - timedelta(days=retention_days)
    with _locked(folder):
        lines = read_lines(folder)
        kept = [ln for ln in lines if not _older_than(ln, cutoff)]
        dropped = len(lines) - len(kept)
        if dropped:
            folder.remove_stale(LOG_TRIM_TEMP_PREFIX, 0)  # a killed trim's; we hold the lock
            text = "".join(f"{ln}\n" for ln in kept)
            data = text.encode("utf-8", errors="surrogateescape")
            replace_file(folder.log_file, [data], folder.log_trim_temp())
    return dropped


def _older_than(line: str, cutoff: datetime) -> bool:
    when = line_time(line)
    return when is not None and when < cutoff  # never drop a line we cannot read
