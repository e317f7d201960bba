"""The SIS database: one table per account and spec, replaced whole by each load.

A load never shows a reader a half-loaded or empty table: rows go into a staging table with
the backend's bulk path (SQLite raw ``executemany`` of rows; PostgreSQL ``COPY FROM STDIN`` of
whole blocks of COPY text, for a clean file mostly the file's own text, so no value is split
out and joined again), and the staging table replaces the live one in the SAME transaction
that marks the load done. A process killed at any moment leaves the transaction uncommitted,
so the previous data stays.

``sis_loads`` records every run. A row is committed as ``running`` before the load starts, so
a run killed midway still leaves a trace; the next run of that spec marks it ``interrupted``.
``sis_pool_applicants`` holds the active applicant IDs that ``ingestctl pool import`` fills.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    insert,
    select,
    update,
)

from ingest_core.db import UTCDateTime, make_engine, utcnow
from ingest_core.errors import IngestError

STAGING_SUFFIX = "__staging"
KEY_INDEX_SUFFIX = "__key"
NEW_KEY_INDEX_SUFFIX = "__key_new"
MAX_TABLE_NAME = 40  # PostgreSQL cuts identifiers at 63 bytes; suffixes must still fit
PROGRESS_EVERY = 10_000
SQLITE_BUSY_TIMEOUT_MS = 15 * 60 * 1000

metadata = MetaData()

sis_loads = Table(
    "sis_loads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account", String(32), nullable=False, index=True),
    Column("spec_file", String(255), nullable=False),
    Column("table_name", String(128), nullable=False),
    Column("file_name", String(255)),
    Column("rows", Integer),
    Column("sha256", String(64)),
    Column("started", UTCDateTime, nullable=False),
    Column("finished", UTCDateTime),
    Column("status", String(16), nullable=False),
    Column("message", Text, nullable=False, default=""),
)

pool_applicants = Table(
    "sis_pool_applicants",
    metadata,
    Column("account", String(32), primary_key=True),
    Column("uuuid", String(255), primary_key=True),
)

# One row per account whose applicant list was imported (even an empty one): what tells "no
# active applicants" (publish an empty pool file) from "never set up" (refuse to publish).
pool_imports = Table(
    "sis_pool_imports",
    metadata,
    Column("account", String(32), primary_key=True),
    Column("imported", UTCDateTime, nullable=False),
    Column("count", Integer, nullable=False),
)

# Statuses a sis_loads row can have.
RUNNING = "running"
LOADED = "loaded"
REFUSED = "refused"  # the file broke a rule (validation, row-count guard)
FAILED = "failed"  # the database or the machine failed
INTERRUPTED = "interrupted"  # the process died mid-load (found by the next run)
NO_FILE = "no_file"


class SwapAborted(IngestError):
    """Raised by a ``before_swap`` check to roll the load back with a reason."""


class TableSource(Protocol):
    """A file's rows, validated on the way, in the form each backend's bulk path takes.

    Each method starts a new pass; a load calls exactly one of them, once.
    """

    def rows(self) -> Iterator[Sequence[str]]:
        """The rows as tuples of values (SQLite)."""
        ...

    def copy_blocks(self) -> Iterator[tuple[int, str]]:
        """(row count, text) per block in ``COPY ... FROM STDIN`` text format (PostgreSQL)."""
        ...

    def report_everything(self) -> None:
        """The load will be refused: make the report complete (the key's duplicates, with
        their lines, are found here, with a second pass over the file)."""
        ...


def _build_key_index(
    cur: Any,
    index: str,
    staging: str,
    key_column: str,
    duplicate: type[Exception],
    source: TableSource,
    before_swap: Callable[[int], str | None],
    total: int,
) -> None:
    """The UNIQUE index on the key column, which is also the load's uniqueness check: when
    the driver raises ``duplicate``, the file is read again to say where, and refused."""
    try:
        cur.execute(f"CREATE UNIQUE INDEX {index} ON {staging} ({quote_ident(key_column)})")
    except duplicate:
        source.report_everything()
        before_swap(total)  # raises SwapAborted with the duplicates and their lines
        raise IngestError("the database found a duplicate key that the validator did not") from None


@dataclass(frozen=True)
class LoadRecord:
    id: int
    account: str
    spec_file: str
    table_name: str
    file_name: str | None
    rows: int | None
    sha256: str | None
    started: datetime
    finished: datetime | None
    status: str
    message: str


def _fold_wal(cur: sqlite3.Cursor) -> None:
    """Checkpoint SQLite's WAL into the database and truncate it, without waiting long on
    readers. After a load it holds the whole new table; after a failed one, pages nobody
    will read, and on a full disk that space is what the next run needs."""
    cur.execute("PRAGMA busy_timeout=1000")
    cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def quote_ident(name: str) -> str:
    """Double-quote an identifier (the same rule on SQLite and PostgreSQL)."""
    return '"' + name.replace('"', '""') + '"'


def advisory_key(table: str) -> int:
    """A stable signed 64-bit key for a table (never Python's per-process ``hash``)."""
    digest = hashlib.blake2b(f"sis-ingest:{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SisDB:
    """One SIS database (SQLite file or PostgreSQL), opened once per process and URL."""

    def __init__(self, url: str, lock_timeout_ms: int = 2000, swap_attempts: int = 30) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.lock_timeout_ms = lock_timeout_ms
        self.swap_attempts = swap_attempts
        self.engine: Engine = make_engine(url)
        if self.is_sqlite:
            # pysqlite would otherwise commit DDL behind our back: we issue BEGIN ourselves.
            @event.listens_for(self.engine, "connect")
            def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None
                # One writer at a time: another account's load holds the write lock for as
                # long as its file takes, so wait for it rather than fail after 30 s.
                dbapi_conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")

            @event.listens_for(self.engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN")

        metadata.create_all(self.engine, checkfirst=True)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- the load ---------------------------------------------------------------------------

    def begin_load(
        self, account: str, spec_file: str, table: str, file_name: str | None, sha256: str | None
    ) -> int:
        """Commit a ``running`` row (and mark older unfinished runs of this spec interrupted)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(sis_loads)
                .where(
                    sis_loads.c.account == account,
                    sis_loads.c.spec_file == spec_file,
                    sis_loads.c.status == RUNNING,
                )
                .values(
                    status=INTERRUPTED,
                    message="the run stopped before it finished (process killed or crashed); "
                    "the data loaded before it stayed in place",
                )
            )
            result = conn.execute(
                insert(sis_loads).values(
                    account=account,
                    spec_file=spec_file,
                    table_name=table,
                    file_name=file_name,
                    sha256=sha256,
                    started=utcnow(),
                    status=RUNNING,
                    message="",
                )
            )
            return int(result.inserted_primary_key[0])

    def finish_load(
        self, load_id: int, status: str, rows: int | None, message: str, sha256: str = ""
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "rows": rows,
            "message": message,
            "finished": utcnow(),
        }
        if sha256:
            values["sha256"] = sha256
        with self.engine.begin() as conn:
            conn.execute(update(sis_loads).where(sis_loads.c.id == load_id).values(**values))

    def record(
        self, account: str, spec_file: str, table: str, status: str, message: str, **extra: Any
    ) -> int:
        """One finished row in a single step (no file, refused before loading)."""
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(sis_loads).values(
                    account=account,
                    spec_file=spec_file,
                    table_name=table,
                    started=now,
                    finished=now,
                    status=status,
                    message=message,
                    **extra,
                )
            )
            return int(result.inserted_primary_key[0])

    def replace_table(
        self,
        load_id: int,
        table: str,
        columns: tuple[str, ...],
        key_column: str | None,
        source: TableSource,
        before_swap: Callable[[int], str | None] = lambda _n: None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Load ``source`` into staging and swap it for ``table``; returns the row count.

        ``before_swap(rows)`` runs after the last row and before the swap; raising there
        (e.g. :class:`SwapAborted` for a validation failure) rolls everything back. It may
        return the file's SHA-256, recorded with the load. The load row ``load_id`` is marked
        ``loaded`` in the swap's own transaction. ``progress(rows)`` is called each time
        another :data:`PROGRESS_EVERY` rows are in (with the count so far).
        """
        if len(table) > MAX_TABLE_NAME:
            raise IngestError(f"table name {table!r} is longer than {MAX_TABLE_NAME} characters")
        load = self._replace_sqlite if self.is_sqlite else self._replace_postgres
        return load(load_id, table, columns, key_column, source, before_swap, progress)

    def _mark_loaded(self, cur: Any, load_id: int, rows: int, sha256: str | None) -> None:
        mark = "?" if self.is_sqlite else "%s"
        finished: Any = utcnow()
        if self.is_sqlite:  # SQLAlchemy's SQLite DateTime stores naive UTC text in this form
            finished = finished.strftime("%Y-%m-%d %H:%M:%S.%f")
        cur.execute(
            f"UPDATE sis_loads SET status = {mark}, rows = {mark}, finished = {mark}, "
            f"message = '', sha256 = COALESCE({mark}, sha256) WHERE id = {mark}",
            (LOADED, rows, finished, sha256, load_id),
        )

    def _replace_sqlite(
        self,
        load_id: int,
        table: str,
        columns: tuple[str, ...],
        key_column: str | None,
        source: TableSource,
        before_swap: Callable[[int], str | None],
        progress: Callable[[int], None] | None,
    ) -> int:
        live, staging = quote_ident(table), quote_ident(table + STAGING_SUFFIX)
        cols = ", ".join(f"{quote_ident(c)} TEXT" for c in columns)
        rows = source.rows()
        insert_sql = f"INSERT INTO {staging} VALUES ({', '.join('?' for _ in columns)})"
        raw = self.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            dbapi.isolation_level = None
            cur = dbapi.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(f"DROP TABLE IF EXISTS {staging}")
                cur.execute(f"CREATE TABLE {staging} ({cols})")
                total = 0
                while True:  # chunks, so progress needs no Python call per row
                    cur.executemany(insert_sql, itertools.islice(rows, PROGRESS_EVERY))
                    got = max(cur.rowcount, 0)
                    total += got
                    if got < PROGRESS_EVERY:
                        break
                    if progress is not None:
                        progress(total)
                # The old table (and with it its index's name) goes first; all of it is
                # rolled back if a check below fails.
                cur.execute(f"DROP TABLE IF EXISTS {live}")
                if key_column:
                    index = quote_ident(table + KEY_INDEX_SUFFIX)
                    _build_key_index(
                        cur, index, staging, key_column, sqlite3.IntegrityError,
                        source, before_swap, total,
                    )  # fmt: skip
                sha256 = before_swap(total)
                cur.execute(f"ALTER TABLE {staging} RENAME TO {live}")
                self._mark_loaded(cur, load_id, total, sha256)
                cur.execute("COMMIT")
            except BaseException:
                if dbapi.in_transaction:
                    cur.execute("ROLLBACK")
                with contextlib.suppress(sqlite3.Error):
                    _fold_wal(cur)
                raise
            _fold_wal(cur)
            cur.close()
        finally:
            raw.close()
        return total

    def _replace_postgres(
        self,
        load_id: int,
        table: str,
        columns: tuple[str, ...],
        key_column: str | None,
        source: TableSource,
        before_swap: Callable[[int], str | None],
        progress: Callable[[int], None] | None,
    ) -> int:
        import psycopg

        live, staging = quote_ident(table), quote_ident(table + STAGING_SUFFIX)
        col_list = ", ".join(quote_ident(c) for c in columns)
        # The key column sorts bytewise: its index builds in half the time (PostgreSQL uses
        # abbreviated keys only for the C collation) and IDs have no linguistic order anyway.
        cols = ", ".join(
            f"{quote_ident(c)} TEXT" + (' COLLATE "C"' if c == key_column else "") for c in columns
        )
        raw = self.engine.raw_connection()
        try:
            pg: psycopg.Connection[Any] = raw.driver_connection
            if pg.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                pg.rollback()
            pg.autocommit = False
            try:
                with pg.cursor() as cur:
                    # Nodes sharing this database: one load per table at a time (freed at
                    # commit, rollback or disconnect; never held across a pooled connection).
                    cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (advisory_key(table),))
                    if not cur.fetchone()[0]:
                        raise IngestError(
                            f"another loader (another node?) is loading table {table} right now"
                        )
                    cur.execute(f"DROP TABLE IF EXISTS {staging}")
                    cur.execute(f"CREATE TABLE {staging} ({cols})")
                    total = 0
                    # FREEZE (allowed: staging was created in this transaction) also keeps a
                    # REPEATABLE READ reader whose snapshot predates the swap from seeing the
                    # new table empty; it sees the whole new data instead.
                    copy_sql = f"COPY {staging} ({col_list}) FROM STDIN WITH (FREEZE)"
                    # Only blocks validated whole come out of copy_blocks(), and none once an
                    # error was found: before_swap() then refuses and all is rolled back. No
                    # writer thread: with ~32 KB blocks it only adds GIL contention (measured
                    # 2.2 s without, 2.5-2.8 s with, at 1M rows).
                    with cur.copy(copy_sql) as copy:
                        for count, text in source.copy_blocks():
                            copy.write(text)
                            total += count
                            if progress is not None and total % PROGRESS_EVERY < count:
                                progress(total)
                    if key_column:
                        new_index = quote_ident(table + NEW_KEY_INDEX_SUFFIX)
                        _build_key_index(
                            cur, new_index, staging, key_column, psycopg.errors.UniqueViolation,
                            source, before_swap, total,
                        )  # fmt: skip
                    sha256 = before_swap(total)
                    self._swap_postgres(cur, table, live, staging, key_column)
                    self._mark_loaded(cur, load_id, total, sha256)
                pg.commit()
            except BaseException:
                pg.rollback()
                raise
        finally:
            raw.close()
        return total

    def _swap_postgres(
        self, cur: Any, table: str, live: str, staging: str, key_column: str | None
    ) -> None:
        """DROP + RENAME under a short lock timeout, retried: readers keep working meanwhile."""
        import psycopg

        cur.execute("SAVEPOINT swap")
        for attempt in range(1, self.swap_attempts + 1):
            try:
                cur.execute(f"SET LOCAL lock_timeout = '{int(self.lock_timeout_ms)}ms'")
                cur.execute(f"DROP TABLE IF EXISTS {live}")
                cur.execute(f"ALTER TABLE {staging} RENAME TO {live}")
                if key_column:
                    cur.execute(
                        f"ALTER INDEX {quote_ident(table + NEW_KEY_INDEX_SUFFIX)} "
                        f"RENAME TO {quote_ident(table + KEY_INDEX_SUFFIX)}"
                    )
                cur.execute("SET LOCAL lock_timeout = 0")
                cur.execute("RELEASE SAVEPOINT swap")
                return
            except psycopg.errors.LockNotAvailable:
                cur.execute("ROLLBACK TO SAVEPOINT swap")
                if attempt == self.swap_attempts:
                    raise IngestError(
                        f"table {table} stayed in use by readers through {attempt} attempts to "
                        "replace it; the previous data stays; the next run will try again"
                    ) from None
                time.sleep(min(0.1 * attempt, 2.0))
            except psycopg.errors.DependentObjectsStillExist:
                raise IngestError(
                    f"table {table} cannot be replaced because views or other objects depend on "
                    "it; drop them or point them at the table through a function"
                ) from None

    # -- reads ------------------------------------------------------------------------------

    def last_loaded(self, account: str, spec_file: str) -> LoadRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(sis_loads)
                .where(
                    sis_loads.c.account == account,
                    sis_loads.c.spec_file == spec_file,
                    sis_loads.c.status == LOADED,
                )
                .order_by(sis_loads.c.id.desc())
                .limit(1)
            ).first()
        return LoadRecord(**row._mapping) if row else None

    def loads(self, account: str | None = None, limit: int = 100) -> list[LoadRecord]:
        query = select(sis_loads).order_by(sis_loads.c.id.desc()).limit(limit)
        if account is not None:
            query = query.where(sis_loads.c.account == account)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [LoadRecord(**r._mapping) for r in reversed(rows)]

    def table_rows(self, table: str) -> list[tuple[str, ...]]:
        """Every row of a live table in load order (tests and small tables only)."""
        with self.engine.connect() as conn:
            result = conn.exec_driver_sql(f"SELECT * FROM {quote_ident(table)}")
            return [tuple(r) for r in result]

    # -- pool applicants --------------------------------------------------------------------

    def replace_applicants(self, account: str, ids: Iterable[str]) -> int:
        """Replace an account's applicant IDs, and record the import, in one transaction;
        returns the count."""
        with self.engine.begin() as conn:
            conn.execute(delete(pool_applicants).where(pool_applicants.c.account == account))
            conn.execute(delete(pool_imports).where(pool_imports.c.account == account))
            batch: list[dict[str, str]] = []
            count = 0
            for uuuid in ids:
                batch.append({"account": account, "uuuid": uuuid})
                count += 1
                if len(batch) >= 10_000:
                    conn.execute(insert(pool_applicants), batch)
                    batch.clear()
            if batch:
                conn.execute(insert(pool_applicants), batch)
            conn.execute(
                insert(pool_imports).values(account=account, imported=utcnow(), count=count)
            )
        return count

    def applicants_imported(self, account: str) -> datetime | None:
        """When the account's applicant list was last imported (None: never)."""
        with self.engine.connect() as conn:
            return conn.scalar(
                select(pool_imports.c.imported).where(pool_imports.c.account == account)
            )

    def applicants(self, account: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    select(pool_applicants.c.uuuid)
                    .where(pool_applicants.c.account == account)
                    .order_by(pool_applicants.c.uuuid)
                )
            )

    def applicant_count(self, account: str) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(pool_applicants)
                    .where(pool_applicants.c.account == account)
                )
                or 0
            )


_open: dict[str, SisDB] = {}
_open_lock = threading.Lock()


def open_sis_db(url: str) -> SisDB:
    """The process-wide handle for ``url`` (schema created on first use)."""
    with _open_lock:
        db = _open.get(url)
        if db is None:
            db = SisDB(url)
            _open[url] = db
        return db


def close_sis_dbs() -> None:
    with _open_lock:
        for db in _open.values():
            db.dispose()
        _open.clear()
