"""The account folder's result log: the one plain-text file a client reads to learn what happened.

One line per event, newest last: ``ISO-timestamp-with-offset STATUS file detail``. Lines are
appended with O_APPEND and fsync'ed, never rewritten; trimming old lines writes a new file
and renames it over the old one, so a reader sees either the old or the new file, whole.

Writer and readers agree on what a line is: text up to a line feed (LF). The writer escapes every
control character and line separator (U+2028, U+0085, CR...) of a file name or a detail, so a
name can never start a line of its own (a forged entry), and readers split on LF only.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ingest_core.durable_files import replace_file
from ingest_core.file_names import escape_for_operator
from ingest_core.folders import LOG_TRIM_TEMP_PREFIX, AccountFolder

STATUSES = ("LOADED", "NO FILE", "ERROR", "RECEIVED", "POOL")


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


def parse_line(line: str) -> dict[str, str]:
    """Split ``time STATUS file detail`` back into its fields (the inverse of format_line)."""
    stamp, _, rest = line.partition(" ")
    status = next((s for s in STATUSES if rest.startswith(s + " ") or rest == s), "")
    rest = rest[len(status) :].lstrip() if status else rest
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
    fd = os.open(folder.log_lock, os.O_RDWR | os.O_CREAT, 0o600)
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
    half a line for the next one to run into.
    """
    line = format_line((when or datetime.now(zone)).astimezone(zone), status, file_name, detail)
    data = line.encode("utf-8")
    with _locked(folder):
        fd = os.open(folder.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            size = os.fstat(fd).st_size  # appends only happen under the lock
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


def read_lines(folder: AccountFolder) -> list[str]:
    """The log's lines, split on LF only, as written (never on U+2028, U+0085 or CR).

    Bytes that are not UTF-8 (a hand edit, an older writer) come back as lone surrogates,
    so a line is never lost and :func:`trim` writes it back byte for byte.
    """
    try:
        data = folder.log_file.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def trim(folder: AccountFolder, retention_days: int, now: datetime) -> int:
    """Drop lines older than the retention; returns how many were dropped."""
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
    stamp = line.split(" ", 1)[0]
    try:
        return datetime.fromisoformat(stamp) < cutoff
    except ValueError:
        return False  # never drop a line we cannot read
