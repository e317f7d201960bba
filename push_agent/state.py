"""The agent's state file: connections, runs, pinned fingerprints, schedule anchors (SQLite).

Its own tables, created with ``metadata.create_all``: the agent never shares a database with
the server. Runs are history and outlive a deleted connection on purpose: a connection made
again under the same name resumes from its last successful transfer (nothing is resent).

There are no migrations: a column added to a table here is added to an older state file when
it is opened (``ALTER TABLE ... ADD COLUMN``), so every new column is nullable or has a default.
A state file that cannot be opened or written (a full disk, most often) is one
:class:`StateUnavailable` line, never a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from ingest_core.db import UTCDateTime, make_engine, utcnow
from ingest_core.errors import IngestError

metadata = MetaData()

connections = Table(
    "connections",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("remote_dir", Text, nullable=False),
    Column("username", String(255), nullable=False),
    Column("auth", String(16), nullable=False),
    Column("frequency", String(64), nullable=False),
    Column("source_kind", String(16), nullable=False),
    Column("source_path", Text),
    Column("source_command", Text),
    Column("source_url", Text),
    Column("source_query", Text),
    Column("delimiter", String(8), nullable=False, default=","),
    Column("header", Boolean, nullable=False, default=True),
    Column("row_terminator", String(8), nullable=False, default="crlf"),
    Column("quoting", String(16), nullable=False, default="minimal"),
    Column("remote_name", Text),
    Column("pool_remote", Text),
    Column("pool_local", Text),
    Column("verify_fingerprint", Boolean, nullable=False, default=True),
    Column("since_initial", String(10), nullable=False),
    Column("notify", Text, nullable=False, default="[]"),
    Column("bind_address", String(64)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Test and Save: no transfer before a passing test (and a confirmed fingerprint if enabled).
    Column("test_passed_at", UTCDateTime),
    Column("pinned_fingerprint", String(128)),
    Column("seen_fingerprint", String(128)),
    # The last scheduled instant the daemon has handled; the next run is the one after it.
    Column("schedule_anchor", UTCDateTime, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(64), nullable=False, index=True),
    # "scheduled", "manual" (ingest-push run) or "test" (Test and Save).
    Column("trigger", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("ok", Boolean),
    Column("since", String(10)),
    Column("remote_file", Text),
    Column("bytes", Integer),
    Column("attempts", Integer),
    Column("category", String(32)),
    Column("message", Text),
    Column("cause", Text),
    Column("fingerprint", String(128)),
    # NULL: the run itself (its upload moves the since-date); "pool": the pool file pickup of
    # a run that also uploaded, recorded apart so that one never fails the other.
    Column("part", String(8)),
    # How many times the daemon took this run up again after the agent stopped in it.
    Column("restarts", Integer),
    # JSON list of the temporary names this run uploaded to (removed by the next run if the
    # agent stopped before it could remove them itself).
    Column("remote_temps", Text),
    # JSON list of every failed attempt: [{"category": ..., "cause": ...}, ...].
    Column("attempt_causes", Text),
)

TRANSFER_TRIGGERS = ("scheduled", "manual")
PART_POOL = "pool"
# Below this much free space, a failed write on the state's disk is called a full disk.
LOW_DISK_BYTES = 1024 * 1024


class StateUnavailable(IngestError):
    """The state file cannot be read or written; the message says why in plain words."""


def free_bytes(folder: Path) -> int | None:
    """Free space for this process on the disk holding ``folder`` (root may use the reserve)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
    return int(blocks * stats.f_frsize)


def describe_state_error(exc: BaseException, path: Path) -> str:
    """One line for a state file SQLite could not use ("disk I/O error" on a full disk)."""
    free = free_bytes(path.parent)
    if free is not None and free < LOW_DISK_BYTES:
        return (
            f"the disk holding the agent's state folder {path.parent} is full ({free} bytes "
            "free): nothing was changed; free some space there, then run the command again"
        )
    orig = getattr(exc, "orig", None) or exc
    reason = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    return (
        f"the agent's state file {path} cannot be used ({reason}): nothing was changed; check "
        "the disk and the file's permissions, then run the command again"
    )


def _add_missing_columns(engine: Engine) -> None:
    """Columns this version added to a table of an older state file (no migrations)."""
    with engine.begin() as conn:
        present_tables = set(inspect(conn).get_table_names())
        for table in metadata.sorted_tables:
            if table.name not in present_tables:
                continue
            have = {c["name"] for c in inspect(conn).get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                clause = f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'
                default = getattr(column.default, "arg", None)
                if isinstance(default, bool | int | float | str):
                    clause += f" DEFAULT {_sql_literal(default)}"
                    if not column.nullable:
                        clause += " NOT NULL"
                conn.execute(text(clause))


def _sql_literal(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


class State:
    """One open state file. Rows come back as plain dicts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.engine: Engine = make_engine(f"sqlite:///{path}")
        with self.guard():
            metadata.create_all(self.engine)
            _add_missing_columns(self.engine)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn SQLite's "disk I/O error" and the like into one plain line."""
        try:
            yield
        except SQLAlchemyError as exc:
            raise StateUnavailable(describe_state_error(exc, self.path)) from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- connections -------------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(connections).where(connections.c.name == name)).first()
        return dict(row._mapping) if row else None

    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(connections).order_by(connections.c.name)).all()
        return [dict(r._mapping) for r in rows]

    def insert(self, values: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(connections).values(**values))

    def update(self, name: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(connections).where(connections.c.name == name).values(**values))

    def delete(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(connections).where(connections.c.name == name))

    # -- runs ----------------------------------------------------------------------------------

    def start_run(
        self,
        name: str,
        trigger: str,
        since: str | None,
        at: datetime | None = None,
        part: str | None = None,
    ) -> int:
        """Record a run's start; ``at`` comes from the caller's (injectable) clock."""
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(runs).values(
                    connection=name,
                    trigger=trigger,
                    started_at=at or utcnow(),
                    since=since,
                    part=part,
                )
            )
            return int(result.inserted_primary_key[0])

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        return dict(row._mapping) if row else None

    def unfinished_runs(self) -> list[dict[str, Any]]:
        """Runs started and never finished: the agent stopped in them (or they run now)."""
        query = select(runs).where(runs.c.finished_at.is_(None)).order_by(runs.c.id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def restart_run(self, run_id: int) -> None:
        """The daemon takes an unfinished run up again (counted: once only)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(restarts=func.coalesce(runs.c.restarts, 0) + 1)
            )

    def add_remote_temp(self, run_id: int, path: str) -> None:
        """Remember a temporary name on the server before uploading to it."""
        with self.engine.begin() as conn:
            row = conn.execute(select(runs.c.remote_temps).where(runs.c.id == run_id)).first()
            temps = json.loads(row[0]) if row and row[0] else []
            temps.append(path)
            conn.execute(
                update(runs).where(runs.c.id == run_id).values(remote_temps=json.dumps(temps))
            )

    def stale_temps(self, name: str) -> dict[int, list[str]]:
        """Temporary names earlier runs of ``name`` may have left on the server, by run."""
        query = select(runs.c.id, runs.c.remote_temps).where(
            runs.c.connection == name, runs.c.remote_temps.is_not(None)
        )
        with self.engine.connect() as conn:
            return {r[0]: json.loads(r[1]) for r in conn.execute(query).all() if r[1]}

    def forget_temps(self, run_ids: list[int]) -> None:
        if not run_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(update(runs).where(runs.c.id.in_(run_ids)).values(remote_temps=None))

    def finish_run(self, run_id: int, ok: bool, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(ok=ok, finished_at=utcnow(), **values)
            )

    def last_success(self, name: str) -> dict[str, Any] | None:
        """The last successful transfer (tests do not count: they send no data)."""
        query = (
            select(runs)
            .where(runs.c.connection == name, runs.c.ok.is_(True))
            .where(runs.c.trigger.in_(TRANSFER_TRIGGERS), runs.c.part.is_(None))
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    def last_failure(self, name: str) -> dict[str, Any] | None:
        query = (
            select(runs)
            .where(runs.c.connection == name, runs.c.ok.is_(False))
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        query = (
            select(runs)
            .where(runs.c.connection == name)
            .order_by(runs.c.started_at.desc(), runs.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def last_run_started(self, name: str) -> datetime | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(runs.c.started_at)
                .where(runs.c.connection == name)
                .order_by(runs.c.started_at.desc())
                .limit(1)
            ).first()
        return row[0] if row else None
