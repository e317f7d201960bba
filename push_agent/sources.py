"""What a connection sends: a local file (newest glob match), an export command's output, or a
SQL query written as a delimited file that matches the receiver's spec byte for byte.

Export commands and queries get the "since" date: the start of the last successful transfer,
or the connection's initial date before the first success. Commands see it as ``{since}`` /
``{since_time}`` in their arguments and as ``INGEST_PUSH_SINCE`` / ``INGEST_PUSH_SINCE_TIME``
in their environment; queries as the bind parameters ``:since`` (a date) and ``:since_time``.

What was produced is checked before anything is sent: an export with no data (no bytes, only
blank lines, or a query's header and no rows) fails the run unless the connection allows empty
files (``allow_empty``), and with ``min_line_share`` set, a file with fewer lines than that share
of the last successful transfer's fails as cut short. Both fail as a transfer failure, like an
export command that exits with an error: the since date stays, nothing reaches the server.
"""

from __future__ import annotations

import csv
import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, DateTime, bindparam, create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from ingest_core.durable_files import rename_into_place
from push_agent.connections import (
    ROW_TERMINATORS,
    Connection,
    matching_files,
    store_sent_lines,
)
from push_agent.failures import Category, fail

if TYPE_CHECKING:
    from push_agent.agent import Agent

# A file this small with nothing but blank lines is empty; larger ones are not read for it.
BLANK_CHECK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Since:
    """Where the next export starts: a local date and the UTC instant behind it."""

    day: date
    instant: datetime
    from_success: bool

    @property
    def text(self) -> str:
        return self.day.isoformat()


def newest_match(pattern: str) -> Path:
    matches = matching_files(pattern)
    if not matches:
        raise fail(Category.TRANSFER, f"no local file matches {pattern}")
    return max(matches, key=lambda p: (p.stat().st_mtime, p.name))


def remote_name_for(conn: Connection, sent: Path) -> str:
    return conn.remote_name or sent.name


def produce(conn: Connection, since: Since, out: Path, command_timeout: float) -> Path:
    """Make what the connection sends and check it (see the module's doc); returns its path
    (``out``, or the matched file)."""
    if conn.source_kind == "file":
        made = newest_match(conn.source_path or "")
        check_export(conn, made)
        return made
    if conn.source_kind == "command":
        _run_command(conn, since, out, command_timeout)
        check_export(conn, out)
        return out
    if conn.source_kind == "query":
        rows = _write_query(conn, since, out)
        check_export(conn, out, rows)
        return out
    raise fail(Category.TRANSFER, f"connection {conn.name} sends no file (it only picks one up)")


def count_lines(path: Path) -> int:
    """Lines in the file: its line breaks, plus a last line without one."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _no_data(path: Path) -> str | None:
    """How the file is empty ("0 bytes", "only blank lines"), or None when it holds data."""
    size = path.stat().st_size
    if size == 0:
        return "0 bytes"
    if size <= BLANK_CHECK_BYTES and not path.read_bytes().strip():
        return "only blank lines"
    return None


def check_export(conn: Connection, path: Path, rows: int | None = None) -> None:
    """Fail an export with no data (unless allowed) or cut short (see the module's doc)."""
    allow = f"'ingest-push connection edit {conn.name} --allow-empty'"
    if conn.source_kind == "query":
        if rows == 0:
            if conn.allow_empty:
                return
            holds = "only its header" if conn.header else "nothing"
            raise fail(
                Category.TRANSFER,
                f"the export query returned no rows (the file would hold {holds}), so nothing "
                f"was sent; if no rows is normal for this connection, allow it with {allow}",
            )
    else:
        empty = _no_data(path)
        if empty is not None:
            if conn.allow_empty:
                return
            what = (
                "the export command produced no data"
                if conn.source_kind == "command"
                else f"the local file {path} holds no data"
            )
            raise fail(
                Category.TRANSFER,
                f"{what} ({empty}), so nothing was sent; if an empty file is normal for this "
                f"connection, allow it with {allow}",
            )
    last = conn.last_sent_lines
    if conn.min_line_share and last:
        lines = count_lines(path)
        if lines < conn.min_line_share * last:
            share = f"{conn.min_line_share * 100:g}%"
            raise fail(
                Category.TRANSFER,
                f"the file to send has {lines} lines, fewer than {share} of "
                f"the {last} lines of the last successful transfer, so it looks cut short and "
                "nothing was sent; if it is complete, lower the share or turn the check off "
                f"with 'ingest-push connection edit {conn.name} --min-line-share 0'",
            )


def remember_sent(agent: Agent, conn: Connection, sent: Path) -> None:
    """After a successful transfer: its line count, for the next run's ``min_line_share``
    check. Never fails the run (the upload succeeded); a problem is logged."""
    try:
        store_sent_lines(agent, conn.name, count_lines(sent))
    except OSError as exc:
        agent.log.warning("sent_lines_not_recorded", connection=conn.name, error=str(exc))


def export_to(conn: Connection, since: Since, out: Path, command_timeout: float) -> Path:
    """The manual download: write what would be sent to ``out`` (temp name, then rename)."""
    out = out.expanduser().resolve()
    temp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.part")
    try:
        made = produce(conn, since, temp, command_timeout)
        if made != temp:
            shutil.copyfile(made, temp)
        rename_into_place(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return out


def _run_command(conn: Connection, since: Since, out: Path, timeout: float) -> None:
    values = {"since": since.text, "since_time": since.instant.isoformat()}
    try:
        argv = [part.format(**values) for part in shlex.split(conn.source_command or "")]
    except (ValueError, KeyError, IndexError) as exc:
        raise fail(Category.TRANSFER, f"the export command cannot be parsed ({exc})") from None
    env = {
        **os.environ,
        "INGEST_PUSH_SINCE": values["since"],
        "INGEST_PUSH_SINCE_TIME": values["since_time"],
        "INGEST_PUSH_CONNECTION": conn.name,
    }
    try:
        with open(out, "wb") as handle:
            result = subprocess.run(
                argv,
                stdout=handle,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=env,
                timeout=timeout,
                check=False,
            )
    except FileNotFoundError:
        raise fail(Category.TRANSFER, f"the export command {argv[0]!r} was not found") from None
    except subprocess.TimeoutExpired:
        raise fail(Category.TRANSFER, f"the export command ran longer than {timeout:g} s") from None
    except OSError as exc:
        raise fail(Category.TRANSFER, f"the export command could not start ({exc})") from None
    if result.returncode != 0:
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1][:200] if lines else "no message"
        raise fail(
            Category.TRANSFER,
            f"the export command exited with status {result.returncode} ({last})",
        )


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _write_query(conn: Connection, since: Since, out: Path) -> int:
    """Write the query's result to ``out``; returns how many rows it had."""
    statement = text(conn.source_query or "")
    wanted = {"since": Date(), "since_time": DateTime(timezone=True)}
    query = conn.source_query or ""
    present = [bindparam(k, type_=t) for k, t in wanted.items() if f":{k}" in query]
    if present:
        statement = statement.bindparams(*present)
    params = {"since": since.day, "since_time": since.instant}
    quoting = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "none": csv.QUOTE_NONE}
    engine = None
    rows = 0
    try:
        engine = create_engine(conn.source_url or "")
        with engine.connect() as db, open(out, "w", encoding="utf-8", newline="") as handle:
            result = db.execute(statement, {p.key: params[p.key] for p in present})
            writer = csv.writer(
                handle,
                delimiter=conn.delimiter,
                lineterminator=ROW_TERMINATORS[conn.row_terminator],
                quoting=quoting[conn.quoting],
                escapechar=None,
            )
            if conn.header:
                writer.writerow(list(result.keys()))
            for row in result:
                writer.writerow([_cell(v) for v in row])
                rows += 1
    except csv.Error as exc:
        raise fail(
            Category.TRANSFER, f"the query result cannot be written without quotes ({exc})"
        ) from None
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0][:200]
        raise fail(Category.TRANSFER, f"the export query failed ({reason})") from None
    finally:
        if engine is not None:
            engine.dispose()
    return rows
