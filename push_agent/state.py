"""The agent's state file: connections, runs, pinned fingerprints, schedule anchors (SQLite).

Its own tables, created with ``metadata.create_all``: the agent never shares a database with
the server. Runs are history and outlive a deleted connection on purpose: a connection made
again under the same name resumes from its last successful transfer (nothing is resent).
"""

from __future__ import annotations

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
    insert,
    select,
    update,
)

from ingest_core.db import UTCDateTime, make_engine, utcnow

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
)

TRANSFER_TRIGGERS = ("scheduled", "manual")


class State:
    """One open state file. Rows come back as plain dicts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.engine: Engine = make_engine(f"sqlite:///{path}")
        metadata.create_all(self.engine)

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
        self, name: str, trigger: str, since: str | None, at: datetime | None = None
    ) -> int:
        """Record a run's start; ``at`` comes from the caller's (injectable) clock."""
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(runs).values(
                    connection=name, trigger=trigger, started_at=at or utcnow(), since=since
                )
            )
            return int(result.inserted_primary_key[0])

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
            .where(runs.c.trigger.in_(TRANSFER_TRIGGERS))
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
