"""What a connection sends: a local file (newest glob match), an export command's output, or a
SQL query written as a delimited file that matches the receiver's spec byte for byte.

Export commands and queries get the "since" date: the start of the last successful transfer,
or the connection's initial date before the first success. Commands see it as ``{since}`` /
``{since_time}`` in their arguments and as ``INGEST_PUSH_SINCE`` / ``INGEST_PUSH_SINCE_TIME``
in their environment; queries as the bind parameters ``:since`` (a date) and ``:since_time``.
"""

from __future__ import annotations

import csv
import glob
import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Date, DateTime, bindparam, create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from ingest_core.durable_files import rename_into_place
from push_agent.connections import ROW_TERMINATORS, Connection
from push_agent.failures import Category, fail


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
    matches = [Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file()]
    if not matches:
        raise fail(Category.TRANSFER, f"no local file matches {pattern}")
    return max(matches, key=lambda p: (p.stat().st_mtime, p.name))


def remote_name_for(conn: Connection, sent: Path) -> str:
    return conn.remote_name or sent.name


def produce(conn: Connection, since: Since, out: Path, command_timeout: float) -> Path:
    """Make what the connection sends; returns its path (``out``, or the matched file)."""
    if conn.source_kind == "file":
        return newest_match(conn.source_path or "")
    if conn.source_kind == "command":
        _run_command(conn, since, out, command_timeout)
        return out
    if conn.source_kind == "query":
        _write_query(conn, since, out)
        return out
    raise fail(Category.TRANSFER, f"connection {conn.name} sends no file (it only picks one up)")


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


def _write_query(conn: Connection, since: Since, out: Path) -> None:
    statement = text(conn.source_query or "")
    wanted = {"since": Date(), "since_time": DateTime(timezone=True)}
    query = conn.source_query or ""
    present = [bindparam(k, type_=t) for k, t in wanted.items() if f":{k}" in query]
    if present:
        statement = statement.bindparams(*present)
    params = {"since": since.day, "since_time": since.instant}
    quoting = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "none": csv.QUOTE_NONE}
    engine = None
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
