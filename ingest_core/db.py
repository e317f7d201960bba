"""The control database: accounts, keys, addresses, contacts, audit trail, bans, file specs, job
state.

SQLite by default (a file under the data root), PostgreSQL when the URL says so. The schema
is owned by Alembic: :func:`open_control_db` upgrades it to the newest revision on first use,
so a fresh checkout and an old deployment both end up on the same schema.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite would drop the offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    institution: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")
    deferred_fetch: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    keys: Mapped[list[AccountKey]] = relationship(
        back_populates="account", cascade="all, delete-orphan", order_by="AccountKey.id"
    )
    ips: Mapped[list[AccountIp]] = relationship(
        back_populates="account", cascade="all, delete-orphan", order_by="AccountIp.id"
    )
    specs: Mapped[list[FileSpec]] = relationship(
        back_populates="account", cascade="all, delete-orphan", order_by="FileSpec.id"
    )
    contacts: Mapped[list[AccountContact]] = relationship(
        back_populates="account", cascade="all, delete-orphan", order_by="AccountContact.id"
    )

    @property
    def active(self) -> bool:
        return self.status == "active"


class AccountKey(Base):
    __tablename__ = "account_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    key_type: Mapped[str] = mapped_column(String(64), nullable=False)
    bits: Mapped[int] = mapped_column(Integer, nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    comment: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    public_key: Mapped[str] = mapped_column(Text, nullable=False)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    account: Mapped[Account] = relationship(back_populates="keys")


class AccountIp(Base):
    __tablename__ = "account_ips"
    __table_args__ = (UniqueConstraint("account_id", "address"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    address: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    account: Mapped[Account] = relationship(back_populates="ips")


class AccountContact(Base):
    """An e-mail address at the client institution that receives the account's alerts."""

    __tablename__ = "account_contacts"
    __table_args__ = (UniqueConstraint("account_id", "email"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    email: Mapped[str] = mapped_column(String(254), nullable=False)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)

    account: Mapped[Account] = relationship(back_populates="contacts")


class AuditEvent(Base):
    """Every registry change: who (OS user), when, what. Kept after an account is deleted."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100), nullable=False)
    account: Mapped[str | None] = mapped_column(String(32), index=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="{}")


class DefenderBan(Base):
    """A source address banned by the brute-force defender; survives restarts."""

    __tablename__ = "defender_bans"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    banned_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    banned_until: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, index=True)
    score: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")


class FileSpec(Base):
    """An approved data file format, frozen at onboarding."""

    __tablename__ = "file_specs"
    __table_args__ = (UniqueConstraint("account_id", "file_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    file_name: Mapped[str] = mapped_column(String(255), nullable=False)
    encoding: Mapped[str] = mapped_column(String(32), nullable=False, default="utf-8")
    bom: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    delimiter: Mapped[str] = mapped_column(String(4), nullable=False)
    terminator: Mapped[str] = mapped_column(String(4), nullable=False)
    quoting: Mapped[str] = mapped_column(String(16), nullable=False, default="none")
    columns: Mapped[str] = mapped_column(Text, nullable=False)  # JSON list of header names
    key_column: Mapped[str | None] = mapped_column(String(128))
    approved_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    approved_by: Mapped[str] = mapped_column(String(100), nullable=False, default="")

    account: Mapped[Account] = relationship(back_populates="specs")


class JobRun(Base):
    """The last local date a scheduled job completed, so a restart catches up once, not twice."""

    __tablename__ = "job_runs"

    job: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_local_date: Mapped[str] = mapped_column(String(10), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class JobClaim(Base):
    """One nightly job (a load or a pool publish) of one account for one scheduled run, claimed
    by the node that does it: the unique key makes it happen once per cluster."""

    __tablename__ = "job_claims"
    __table_args__ = (UniqueConstraint("job", "account", "run_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(16), nullable=False)  # "load" or "pool"
    account: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    # The scheduled run's local date (YYYY-MM-DD), or "manual-..." for an operator's run.
    run_key: Mapped[str] = mapped_column(String(64), nullable=False)
    node: Mapped[str] = mapped_column(String(64), nullable=False)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))


class JournalEvent(Base):
    """What clients did, recorded by whichever node served them, so every node shows the same
    activity; a completed upload's row is also the pre-check's work item (claimed once)."""

    __tablename__ = "journal_events"
    # The pre-check's queue: received files not yet checked.
    __table_args__ = (Index("ix_journal_events_unchecked", "kind", "checked_at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow, index=True)
    node: Mapped[str] = mapped_column(String(64), nullable=False)
    account: Mapped[str | None] = mapped_column(String(32), index=True)
    # The server log's event name: auth.success, auth.failure, file.received, ...
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    address: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, nullable=False, default="{}")  # JSON object
    # file.received only: when and by which node the on-arrival pre-check handled it.
    checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    checked_by: Mapped[str | None] = mapped_column(String(64))


class DefenderFailure(Base):
    """One failed connection's points against its source address, shared by every node."""

    __tablename__ = "defender_failures"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    address: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    points: Mapped[int] = mapped_column(Integer, nullable=False)
    node: Mapped[str] = mapped_column(String(64), nullable=False, default="")


class ClusterNode(Base):
    """A node that serves or loads for this control DB, and when it was last seen alive."""

    __tablename__ = "cluster_nodes"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    draining: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class AccountHolding(Base):
    """What one node holds for one account right now: logged-in sessions and quota bytes
    reserved by uploads in flight. With several nodes, each checks the others' rows before it
    admits a session or reserves (``ingest_core.holdings``)."""

    __tablename__ = "account_holdings"

    account: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sessions: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


@dataclass
class ControlDB:
    engine: Engine
    session: sessionmaker[Any]


_opened: dict[str, ControlDB] = {}
_open_lock = threading.Lock()


SQLITE_FILE_MODE = 0o600
# The PostgreSQL advisory lock key held (for one transaction) while the schema is upgraded:
# the first 8 bytes of blake2b("sis-ingest control schema"), as a signed 64-bit number.
SCHEMA_LOCK_KEY = int.from_bytes(
    hashlib.blake2b(b"sis-ingest control schema", digest_size=8).digest(), "big", signed=True
)


def create_private_sqlite_file(path: Path) -> None:
    """Create an empty SQLite file with mode 0600 before SQLite does (it would use 0644
    minus the caller's umask); SQLite gives the -wal and -shm files the database's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SQLITE_FILE_MODE)
    except FileExistsError:
        return  # an existing database keeps the mode its operator gave it
    try:
        os.fchmod(fd, SQLITE_FILE_MODE)
    finally:
        os.close(fd)


def _enable_wal(cur: sqlite3.Cursor, timeout_s: float = 30.0) -> None:
    """Switch the database to WAL (the file keeps it). When another process switches the same
    new file at that moment, SQLite answers "database is locked" at once instead of waiting
    out the busy timeout: try again until that process is done (then it is a no-op)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def advisory_lock_key(name: str) -> int:
    """A PostgreSQL advisory lock key for ``name``: the first 8 bytes of its blake2b as a
    signed 64-bit number, the same on every node and every Python (``hash()`` is salted per
    process)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def make_engine(url: str) -> Engine:
    """An engine with the per-backend settings we rely on (SQLite: FKs, WAL, busy timeout)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            create_private_sqlite_file(Path(path))
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            _enable_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade_schema(engine: Engine) -> None:
    """Bring the control DB to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Nodes starting at once on one database take turns: the second sees the first's
            # committed schema instead of creating the same tables (and alembic_version) again.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_control_db(url: str) -> ControlDB:
    """The process-wide handle for ``url``; migrates the schema the first time."""
    with _open_lock:
        db = _opened.get(url)
        if db is None:
            engine = make_engine(url)
            upgrade_schema(engine)
            db = ControlDB(engine=engine, session=sessionmaker(engine, expire_on_commit=False))
            _opened[url] = db
        return db


def close_all() -> None:
    """Dispose every opened engine (tests and forked workers call this)."""
    with _open_lock:
        for db in _opened.values():
            db.engine.dispose()
        _opened.clear()
