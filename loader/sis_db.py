"""The SIS database: one table per account and spec, replaced whole by each load.

A load never shows a reader a half-loaded or empty table: rows go into a staging table with
the backend's bulk path (SQLite raw ``executemany`` of rows; PostgreSQL ``COPY FROM STDIN`` of
whole blocks of COPY text, for a clean file mostly the file's own text, so no value is split
out and joined again), and the staging table replaces the live one in the SAME transaction
that marks the load done. A process killed at any moment leaves the transaction uncommitted,
so the previous data stays. For a spec with a key column, the same transaction first counts
what the load changes against the live table, by key (:meth:`SisDB._compare`: rows added,
removed, changed), recorded with the load.

Two namespaces that cannot collide, whatever the account and file names:

- the data tables, one per account and spec, named ``sis_<account>_<file stem>``
  (:func:`loader.spec.table_name`: always ``sis`` then ``[a-z0-9_]``, never ``__``), sit where
  the institution's applications read them: on PostgreSQL in the connection's default
  schema (the first schema of its ``search_path`` other than ``sis_ingest``, normally
  ``public``), on SQLite in the main database;
- the service's own tables sit apart: on PostgreSQL in the schema ``sis_ingest``
  (``sis_ingest.loads``, ``sis_ingest.pool_applicants``, ``sis_ingest.pool_imports``), on
  SQLite under the prefix ``ingest_`` (``ingest_loads``, ...), which no data table name has.

The ``loads`` table records every run. A row is committed as ``running`` before the load
starts, so a run killed midway still leaves a trace; the next run of that spec marks it
``interrupted``. ``pool_applicants`` holds the active applicant IDs that ``ingestctl pool
import`` fills, each with its ``position`` in the imported file (the pool file keeps that
order), ``pool_imports`` when each account's list was imported.

A database made by an earlier version kept the service tables beside the data, as
``sis_loads``, ``sis_pool_applicants`` and ``sis_pool_imports``: opening it moves them into
their namespace, in one transaction that only one process at a time runs (see
:meth:`SisDB._open_namespaces`). The same transaction adds the columns a later version gave
a service table (:data:`ADDED_COLUMNS`) to a table made before them, moved or not.
"""

from __future__ import annotations

import contextlib
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
    Connection,
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
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateColumn

from ingest_core.db import UTCDateTime, advisory_lock_key, make_engine, utcnow
from ingest_core.errors import IngestError

STAGING_SUFFIX = "__staging"
KEY_INDEX_SUFFIX = "__key"
NEW_KEY_INDEX_SUFFIX = "__key_new"
MAX_TABLE_NAME = 40  # PostgreSQL cuts identifiers at 63 bytes; suffixes must still fit
PROGRESS_EVERY = 10_000
SQLITE_BUSY_TIMEOUT_MS = 15 * 60 * 1000
_SQLITE_BEGIN = "sqlite_begin"  # execution option: the statement that opens a transaction

# PostgreSQL, comparing a load with the live table (:meth:`SisDB._postgres_compare_plan`):
# the key order correlation from which a table counts as sorted by key, the key ranges per
# process compared side by side then (more than one: a process that falls behind on a busy
# machine leaves its next range to the others), and the work_mem of the hash join otherwise:
# the planner, without statistics of staging, takes a text value for 32 bytes and so asks
# for batches the rows do not need; at 128MB the staged rows of a 1M-row x 20-column load
# (about 270 MB in the hash table) are joined in one batch (64MB: 8 batches, 1.3-1.6 s
# against 0.7-0.9 s). The hash table holds what staging holds, and at most work_mem x
# hash_mem_multiplier x (workers + 1) of the database server's memory; beyond that it
# spills to temporary files.
SORTED_CORRELATION = 0.9
COMPARE_RANGES_PER_PROCESS = 2
COMPARE_WORK_MEM = "128MB"
# SQLite, the same comparison of a live table not in key order: the page cache it may fill
# (KiB; the connection's default is 2 MiB). The UNIQUE key index of a 1M-row load of UUID
# keys is 45 MB: held whole, such a table is compared in 2.3-2.4 s instead of 3.0-3.3 s; the
# loader's peak memory stays under 200 MB (137 MB at 1M rows). How many rows, at each of
# four places along the live table, tell whether it is in key order.
SQLITE_COMPARE_CACHE_KIB = 64 * 1024
SQLITE_ORDER_SAMPLE = 64

SERVICE_SCHEMA = "sis_ingest"  # PostgreSQL: the schema of the service's own tables
SQLITE_SERVICE_PREFIX = "ingest_"  # SQLite: data table names all start with "sis"
# Lock key of the namespace set-up on PostgreSQL (a space: no table name gives this key).
_NAMESPACE_LOCK = "service tables"


@dataclass(frozen=True)
class ServiceTables:
    """The service's own tables, named for one backend."""

    metadata: MetaData
    loads: Table
    pool_applicants: Table
    pool_imports: Table

    def all(self) -> tuple[Table, ...]:
        return (self.loads, self.pool_applicants, self.pool_imports)


def service_tables(is_sqlite: bool) -> ServiceTables:
    """The service tables in their own namespace: the ``sis_ingest`` schema on PostgreSQL,
    the ``ingest_`` prefix on SQLite (which has no schemas within one database file)."""
    metadata = MetaData(schema=None if is_sqlite else SERVICE_SCHEMA)
    prefix = SQLITE_SERVICE_PREFIX if is_sqlite else ""
    loads = Table(
        f"{prefix}loads",
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
        # What the load changed in the live table, by key (None: no key column, a first
        # load, or a run that did not load): see :class:`LoadChanges`.
        Column("added", Integer),
        Column("removed", Integer),
        Column("changed", Integer),
    )
    pool_applicants = Table(
        f"{prefix}pool_applicants",
        metadata,
        Column("account", String(32), primary_key=True),
        Column("uuuid", String(255), primary_key=True),
        # 0-based place in the imported list: the pool file keeps the import's order.
        Column("position", Integer, nullable=False, server_default="0"),
    )
    # One row per account whose applicant list was imported (even an empty one): what tells
    # "no active applicants" (publish an empty pool file) from "never set up" (refuse).
    pool_imports = Table(
        f"{prefix}pool_imports",
        metadata,
        Column("account", String(32), primary_key=True),
        Column("imported", UTCDateTime, nullable=False),
        Column("count", Integer, nullable=False),
    )
    return ServiceTables(metadata, loads, pool_applicants, pool_imports)


SQLITE_TABLES = service_tables(is_sqlite=True)
POSTGRES_TABLES = service_tables(is_sqlite=False)

# Where versions before the namespaces kept the service tables (beside the data tables), by
# the name of the table each one becomes.
LEGACY_SERVICE_TABLES = {
    "loads": "sis_loads",
    "pool_applicants": "sis_pool_applicants",
    "pool_imports": "sis_pool_imports",
}

# Columns added to a service table after its first version, by the table's short name: a
# table without them is still the service's table, and gets them when the database is
# opened. Each has a server default or is nullable, so the rows already there take it
# (``position`` 0: an older list keeps the order of its IDs, the tie-break of
# :meth:`SisDB.applicants`; ``added``/``removed``/``changed`` NULL: not known for older loads).
ADDED_COLUMNS: dict[str, tuple[str, ...]] = {
    "pool_applicants": ("position",),
    "loads": ("added", "removed", "changed"),
}


# Statuses a loads row can have.
RUNNING = "running"
LOADED = "loaded"
REFUSED = "refused"  # the file broke a rule (validation, row-count guard)
FAILED = "failed"  # the database or the machine failed
INTERRUPTED = "interrupted"  # the process died mid-load (found by the next run)
NO_FILE = "no_file"


@dataclass(frozen=True)
class LoadChanges:
    """What a load changes in the live table, compared by key before the swap: keys only in
    the new file (``added``), keys only in the live table (``removed``), keys in both whose
    row differs in any other column (``changed``). ``previous``: the live table's rows (its
    keys) before the load."""

    previous: int
    added: int
    removed: int
    changed: int

    def summary(self) -> str:
        """``120 new, 35 gone, 410 changed`` (the LOADED line)."""
        return f"{self.added:,} new, {self.removed:,} gone, {self.changed:,} changed"


@dataclass(frozen=True)
class ComparePlan:
    """How PostgreSQL runs a load's comparison (:meth:`SisDB._postgres_compare_plan`)."""

    saved: list[tuple[str, str]]  # settings changed for it, with the values to put back
    cuts: tuple[str, ...]  # key values (ascending, bytewise) between ranges compared apart


def _range_cuts(bounds: Sequence[str], ranges: int) -> tuple[str, ...]:
    """Up to ``ranges - 1`` key values that split ``bounds`` (a key histogram: equal numbers
    of rows between neighbours) into ``ranges`` parts of about equal rows, ascending in
    bytewise order (the order of the key's ``COLLATE "C"``; Python's order of str is the same:
    code points, the order of their UTF-8 bytes)."""
    ordered = sorted(set(bounds))
    if len(ordered) < 3 or ranges < 2:
        return ()
    picked = {ordered[round(i * (len(ordered) - 1) / ranges)] for i in range(1, ranges)}
    return tuple(sorted(picked))


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
    # What the load changed, by key (None: no key column, a first load, not loaded, or a
    # load recorded before these columns existed).
    added: int | None = None
    removed: int | None = None
    changed: int | None = None


@dataclass(frozen=True)
class Streak:
    """A spec's runs since its last successful load (see :meth:`SisDB.streak`)."""

    last_loaded: LoadRecord | None
    missed: int  # runs since then that did not load it
    by_status: dict[str, int]  # those runs by status (no_file, refused, failed, interrupted)
    recent: list[LoadRecord]  # the newest of those runs, oldest first


def _sqlite_in_key_order(cur: sqlite3.Cursor, live: str, key: str) -> bool:
    """Are the live table's rows in the order of their keys (or the reverse), as far as
    :data:`SQLITE_ORDER_SAMPLE` rows at each of four places along it, and the places one after
    the other, tell? Keys compare as SQLite's BINARY collation does (UTF-8 bytes, which is
    Python's code point order)."""
    cur.execute(f"SELECT max(rowid) FROM {live}")
    last = int(cur.fetchone()[0] or 0)
    directions: set[bool] = set()
    before: list[str] = []  # the last key of the place before (the places follow each other)
    starts = [0, last // 4, last // 2, 3 * last // 4, last]
    for start, end in itertools.pairwise(starts):
        cur.execute(
            f"SELECT {key} FROM {live} WHERE rowid > ? AND rowid <= ? ORDER BY rowid LIMIT ?",
            (start, end, SQLITE_ORDER_SAMPLE),
        )
        keys = before + [str(k) for (k,) in cur.fetchall()]
        directions |= {a < b for a, b in itertools.pairwise(keys) if a != b}
        if len(directions) > 1:
            return False
        before = keys[-1:]
    return True


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
    return advisory_lock_key(f"sis-ingest:{table}")


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
                # "BEGIN IMMEDIATE" where a transaction must hold the write lock from its
                # first statement (a deferred one that reads first cannot wait for it).
                conn.exec_driver_sql(conn.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))

        self.tables = SQLITE_TABLES if self.is_sqlite else POSTGRES_TABLES
        # PostgreSQL: the schema data tables live in (named in every statement, so that a
        # search_path that would now find the sis_ingest schema first never moves them).
        self.data_schema: str | None = None
        self._open_namespaces()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- namespaces -------------------------------------------------------------------------

    def _open_namespaces(self) -> None:
        """Create the service tables in their namespace, moving those an earlier version made
        beside the data tables, in one transaction that one process at a time runs (SQLite:
        the write lock from BEGIN IMMEDIATE; PostgreSQL: an advisory lock). Idempotent: a
        second process finds the work done."""
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                self.data_schema = self._postgres_data_schema(conn)
            inspector = inspect(conn)
            if all(
                inspector.has_table(t.name, schema=t.schema) for t in self.tables.all()
            ) and not self._missing_columns(conn):
                return  # the usual open: no lock, so it never waits for a load's write lock
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
                with conn.begin():
                    self._move_legacy_service_tables(conn, None)
                    self.tables.metadata.create_all(conn, checkfirst=True)
                    self._add_missing_columns(conn)
            return
        with self.engine.begin() as conn:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(_NAMESPACE_LOCK)}
            )
            self.data_schema = self._postgres_data_schema(conn)
            exists = conn.scalar(
                text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"),
                {"schema": SERVICE_SCHEMA},
            )
            if not exists:  # checked first: a role without CREATE may use a schema a DBA made
                conn.exec_driver_sql(f"CREATE SCHEMA {quote_ident(SERVICE_SCHEMA)}")
            self._move_legacy_service_tables(conn, self.data_schema)
            self.tables.metadata.create_all(conn, checkfirst=True)
            self._add_missing_columns(conn)

    def _missing_columns(self, conn: Connection) -> list[Column[Any]]:
        """The :data:`ADDED_COLUMNS` that the existing service tables lack (a table made by a
        version before them)."""
        inspector = inspect(conn)
        missing: list[Column[Any]] = []
        for table in self.tables.all():
            if not inspector.has_table(table.name, schema=table.schema):
                continue
            added = ADDED_COLUMNS.get(table.name.removeprefix(SQLITE_SERVICE_PREFIX), ())
            if not added:
                continue
            present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
            missing.extend(table.c[name] for name in added if name not in present)
        return missing

    def _add_missing_columns(self, conn: Connection) -> None:
        """Add the :data:`ADDED_COLUMNS` a service table lacks, declared exactly as a fresh
        database declares them (each has a server default, which the existing rows take).
        Runs under the set-up's lock, after a re-check, so a second process adds nothing."""
        for column in self._missing_columns(conn):
            table = self.engine.dialect.identifier_preparer.format_table(column.table)
            spec = CreateColumn(column).compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {spec}")

    @staticmethod
    def _postgres_data_schema(conn: Connection) -> str:
        """The schema unqualified names create tables in, leaving out the service's own (a
        role named sis_ingest has it first in its default search_path once it exists)."""
        schema = conn.scalar(
            text(
                "SELECT name FROM unnest(current_schemas(false)) WITH ORDINALITY AS s(name, n) "
                "WHERE name <> :service ORDER BY n LIMIT 1"
            ),
            {"service": SERVICE_SCHEMA},
        )
        if schema is None:
            path = conn.scalar(text("SHOW search_path"))
            raise IngestError(
                f"the SIS database has no schema for the data tables: its search_path ({path}) "
                f"names no existing schema other than {SERVICE_SCHEMA}; create one (or set "
                "search_path to public)"
            )
        return str(schema)

    def _move_legacy_service_tables(self, conn: Connection, schema: str | None) -> None:
        """Move the service tables of an earlier version out of the data namespace.

        A table is moved only when it still is the service's table (its columns, but for
        any that :data:`ADDED_COLUMNS` gave it later, and its primary key): a client's table
        that replaced it (the collision these namespaces end; data tables never have a
        primary key) is that client's data and stays where it is. Indexes get the names a
        fresh database gives them; the added columns come after the move
        (:meth:`_add_missing_columns`). Import records whose applicant lists did not survive
        are dropped, so publishing asks for a new import instead of sending clients an empty
        pool file.
        """
        inspector = inspect(conn)
        present = set(inspector.get_table_names(schema=schema))
        moved: set[str] = set()
        for table in self.tables.all():
            new_name = table.name
            legacy = LEGACY_SERVICE_TABLES[new_name.removeprefix(SQLITE_SERVICE_PREFIX)]
            if legacy not in present or inspector.has_table(new_name, schema=table.schema):
                continue
            columns = {c["name"] for c in inspector.get_columns(legacy, schema=schema)}
            key = inspector.get_pk_constraint(legacy, schema=schema)["constrained_columns"]
            expected = {c.name for c in table.columns}
            added = set(ADDED_COLUMNS.get(new_name.removeprefix(SQLITE_SERVICE_PREFIX), ()))
            if not (expected - added <= columns <= expected) or key != [
                c.name for c in table.primary_key.columns
            ]:
                continue
            for index in inspector.get_indexes(legacy, schema=schema):
                old_index = quote_ident(str(index["name"]))
                conn.exec_driver_sql(
                    f"DROP INDEX {old_index}"
                    if self.is_sqlite
                    else f"DROP INDEX {quote_ident(str(schema))}.{old_index}"
                )
            if self.is_sqlite:
                conn.exec_driver_sql(
                    f"ALTER TABLE {quote_ident(legacy)} RENAME TO {quote_ident(new_name)}"
                )
            else:
                conn.exec_driver_sql(
                    f"ALTER TABLE {quote_ident(str(schema))}.{quote_ident(legacy)} "
                    f"SET SCHEMA {quote_ident(SERVICE_SCHEMA)}"
                )
                in_schema = f"{quote_ident(SERVICE_SCHEMA)}.{quote_ident(legacy)}"
                conn.exec_driver_sql(f"ALTER TABLE {in_schema} RENAME TO {quote_ident(new_name)}")
                self._rename_postgres_companions(conn, legacy, new_name)
            for index in table.indexes:
                index.create(conn, checkfirst=True)
            moved.add(table.name)
        if self.tables.pool_imports.name in moved and self.tables.pool_applicants.name not in moved:
            conn.execute(delete(self.tables.pool_imports))

    @staticmethod
    def _rename_postgres_companions(conn: Connection, legacy: str, new_name: str) -> None:
        """The primary key and id sequence named after the old table take the new name."""
        schema = quote_ident(SERVICE_SCHEMA)
        companions = conn.execute(
            text(
                "SELECT c.relname, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND c.relkind IN ('i', 'S') "
                "AND c.relname IN (:pkey, :sequence)"
            ),
            {
                "schema": SERVICE_SCHEMA,
                "pkey": f"{legacy}_pkey",
                "sequence": f"{legacy}_id_seq",
            },
        ).all()
        for name, kind in companions:
            what = "SEQUENCE" if kind == "S" else "INDEX"
            renamed = new_name + name[len(legacy) :]
            conn.exec_driver_sql(
                f"ALTER {what} {schema}.{quote_ident(name)} RENAME TO {quote_ident(renamed)}"
            )

    def _data_table(self, table: str) -> str:
        """A data table's name for SQL: quoted, and on PostgreSQL with its schema."""
        if self.data_schema is None:
            return quote_ident(table)
        return f"{quote_ident(self.data_schema)}.{quote_ident(table)}"

    def service_table_name(self, name: str) -> str:
        """Where a service table is, for people: ``pool_applicants`` is
        ``sis_ingest.pool_applicants`` on PostgreSQL, ``ingest_pool_applicants`` on SQLite."""
        table = {t.name.removeprefix(SQLITE_SERVICE_PREFIX): t for t in self.tables.all()}[name]
        return table.fullname

    def _loads_table_sql(self) -> str:
        """The loads table's name for hand-written SQL (with its schema on PostgreSQL)."""
        return self.engine.dialect.identifier_preparer.format_table(self.tables.loads)

    # -- the load ---------------------------------------------------------------------------

    def begin_load(
        self, account: str, spec_file: str, table: str, file_name: str | None, sha256: str | None
    ) -> int:
        """Commit a ``running`` row (and mark older unfinished runs of this spec interrupted)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(self.tables.loads)
                .where(
                    self.tables.loads.c.account == account,
                    self.tables.loads.c.spec_file == spec_file,
                    self.tables.loads.c.status == RUNNING,
                )
                .values(
                    status=INTERRUPTED,
                    message="the run stopped before it finished (process killed or crashed); "
                    "the data loaded before it stayed in place",
                )
            )
            result = conn.execute(
                insert(self.tables.loads).values(
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
            conn.execute(
                update(self.tables.loads).where(self.tables.loads.c.id == load_id).values(**values)
            )

    def record(
        self, account: str, spec_file: str, table: str, status: str, message: str, **extra: Any
    ) -> int:
        """One finished row in a single step (no file, refused before loading)."""
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(self.tables.loads).values(
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
        on_changes: Callable[[LoadChanges], None] | None = None,
    ) -> int:
        """Load ``source`` into staging and swap it for ``table``; returns the row count.

        ``before_swap(rows)`` runs after the last row and before the swap; raising there
        (e.g. :class:`SwapAborted` for a validation failure) rolls everything back. It may
        return the file's SHA-256, recorded with the load. The load row ``load_id`` is marked
        ``loaded`` in the swap's own transaction. ``progress(rows)`` is called each time
        another :data:`PROGRESS_EVERY` rows are in (with the count so far).

        With a key column and a live table that has it, the staged rows are compared with the
        live ones after ``before_swap`` (:meth:`_compare`, in SQL, in the same transaction):
        the counts are recorded with the load and given to ``on_changes``, which may refuse
        the load by raising (:class:`SwapAborted`) like ``before_swap``.
        """
        if len(table) > MAX_TABLE_NAME:
            raise IngestError(f"table name {table!r} is longer than {MAX_TABLE_NAME} characters")
        load = self._replace_sqlite if self.is_sqlite else self._replace_postgres
        return load(load_id, table, columns, key_column, source, before_swap, progress, on_changes)

    def _mark_loaded(
        self, cur: Any, load_id: int, rows: int, sha256: str | None, changes: LoadChanges | None
    ) -> None:
        mark = "?" if self.is_sqlite else "%s"
        finished: Any = utcnow()
        if self.is_sqlite:  # SQLAlchemy's SQLite DateTime stores naive UTC text in this form
            finished = finished.strftime("%Y-%m-%d %H:%M:%S.%f")
        counts = (changes.added, changes.removed, changes.changed) if changes else (None,) * 3
        cur.execute(
            f"UPDATE {self._loads_table_sql()} SET status = {mark}, rows = {mark}, "
            f"finished = {mark}, message = '', sha256 = COALESCE({mark}, sha256), "
            f"added = {mark}, removed = {mark}, changed = {mark} WHERE id = {mark}",
            (LOADED, rows, finished, sha256, *counts, load_id),
        )

    def _live_columns(self, cur: Any, table: str) -> list[str]:
        """The live data table's columns, in order; empty when there is no such table."""
        if self.is_sqlite:
            cur.execute("SELECT name FROM pragma_table_info(?)", (table,))
        else:
            cur.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (self._data_table(table),),
            )
        return [str(name) for (name,) in cur.fetchall()]

    def _compare(
        self,
        cur: Any,
        table: str,
        staging: str,
        columns: tuple[str, ...],
        key_column: str,
        total: int,
    ) -> LoadChanges | None:
        """Count the keys the staged rows add, remove and change against the live table, in
        one SQL pass inside the load's transaction; None on a first load (no live table) or
        when the live table lacks the key column (the spec changed its key).

        SQLite: one scan of the live table, each row looked up by key through staging's
        UNIQUE key index. PostgreSQL: see :meth:`_postgres_compare_plan`. The key comparison
        is bytewise (``COLLATE "C"``, the key column's own collation on PostgreSQL, so its
        index serves). A changed row: same key, any other column the two tables share
        different (NULL-safe); a column only one of them has is not compared.
        """
        live_columns = self._live_columns(cur, table)
        if key_column not in live_columns:
            return None
        live = self._data_table(table)
        key = quote_ident(key_column)
        distinct = "IS NOT" if self.is_sqlite else "IS DISTINCT FROM"
        others = [quote_ident(c) for c in columns if c != key_column and c in live_columns]
        differs = " OR ".join(f"s.{c} {distinct} l.{c}" for c in others) or "1 = 0"
        collate = "" if self.is_sqlite else ' COLLATE "C"'
        counts = (
            f"count(*) AS previous, count(s.{key}) AS matched, "
            f"count(CASE WHEN s.{key} IS NOT NULL AND ({differs}) THEN 1 END) AS changed"
        )
        join = f"FROM {live} AS l LEFT JOIN {staging} AS s ON s.{key} = l.{key}{collate}"
        if self.is_sqlite:
            # Each live row, in the live table's order, looks its key up in staging's key
            # index. Rows in key order walk the index from end to end; any other order jumps
            # about it, and then a page cache that holds the whole index keeps the lookups in
            # memory (pages are taken as they are read; the connection's size is put back).
            # In key order it would only cost: 0.1 s more and 60 MB at 1M rows.
            cur.execute("PRAGMA cache_size")
            cache_size = int(cur.fetchone()[0])
            if not _sqlite_in_key_order(cur, live, key):
                cur.execute(f"PRAGMA cache_size = -{SQLITE_COMPARE_CACHE_KIB}")
            try:
                cur.execute(f"SELECT {counts} {join}")
                previous, matched, changed = (int(n or 0) for n in cur.fetchone())
            finally:
                cur.execute(f"PRAGMA cache_size = {cache_size}")
            return LoadChanges(previous, total - matched, previous - matched, changed)
        plan = self._postgres_compare_plan(cur, table, key_column)
        if not plan.cuts:
            cur.execute(f"SELECT {counts} {join}")
        else:
            # One range of keys per arm: rows with equal keys fall in the same range on both
            # sides, so the arms' counts add up to the whole table's. A Parallel Append runs
            # the arms in worker processes, each a merge join over its part of both indexes.
            from psycopg import sql

            bounds: list[str | None] = [None, *plan.cuts, None]
            arms = []
            for low, high in itertools.pairwise(bounds):
                on, where = "", []
                for op, bound in ((">=", low), ("<", high)):
                    if bound is not None:
                        value = sql.Literal(bound).as_string(cur)
                        on += f" AND s.{key} {op} {value}{collate}"
                        where.append(f"l.{key} {op} {value}{collate}")
                arms.append(f"SELECT {counts} {join}{on} WHERE {' AND '.join(where)}")
            cur.execute(
                "SELECT sum(previous)::bigint, sum(matched)::bigint, sum(changed)::bigint "
                f"FROM ({' UNION ALL '.join(arms)}) AS arms"
            )
        previous, matched, changed = (int(n or 0) for n in cur.fetchone())
        for name, value in plan.saved:  # the rest of the transaction plans as it did before
            cur.execute("SELECT set_config(%s, %s, true)", (name, value))
        return LoadChanges(previous, total - matched, previous - matched, changed)

    def _postgres_compare_plan(self, cur: Any, table: str, key_column: str) -> ComparePlan:
        """Planner settings for the comparison (``SET LOCAL``, previous values returned to be
        put back), and the key values that split it into ranges.

        Staging has no statistics yet (an ANALYZE would cost more than the comparison), so
        the planner cannot know what it should: a live table whose rows follow the order of
        their keys (``pg_stats`` correlation, from autovacuum's ANALYZE, of
        :data:`SORTED_CORRELATION` or more: an export sorted by ID, as most are, and the next
        night's file is too) is compared by merge joins over the two UNIQUE key indexes
        (nearly sequential reads, no memory), one per range of keys, the ranges cut at the
        live key's histogram bounds and run side by side by ``max_parallel_workers_per_gather``
        workers and this process (one ordered pass when that setting is 0); any other table
        with a parallel hash join given :data:`COMPARE_WORK_MEM`, so that it does not spill
        to disk in batches, and left to the workers (``parallel_leader_participation`` off:
        on two cores the leader joining too made every process slower, 0.69 s against 0.76 s
        at 1M rows; with no worker free the leader still runs it alone). JIT compilation is
        off either way: below its optimizing threshold the compiled expressions ran slower
        than the interpreter here, and compiling costs too.
        """
        cur.execute(
            "SELECT s.correlation, s.histogram_bounds::text::text[], "
            "current_setting('max_parallel_workers_per_gather')::int, c.collname = 'C' "
            "FROM pg_stats AS s "
            "JOIN pg_attribute AS a ON a.attrelid = to_regclass(%s) AND a.attname = s.attname "
            "JOIN pg_collation AS c ON c.oid = a.attcollation "
            "WHERE s.schemaname = %s AND s.tablename = %s AND s.attname = %s",
            (self._data_table(table), self.data_schema, table, key_column),
        )
        row = cur.fetchone()
        in_key_order = row is not None and row[0] is not None
        in_key_order = in_key_order and abs(float(row[0])) >= SORTED_CORRELATION
        cuts: tuple[str, ...] = ()
        settings = {"jit": "off"}
        if in_key_order:
            settings |= {"enable_hashjoin": "off", "enable_sort": "off"}
            bounds, workers, bytewise = row[1], row[2], row[3]
            # Ranges only over a key index in bytewise order (a table loaded before the key
            # was COLLATE "C" has another): each range would otherwise sort the table again.
            if bounds and workers > 0 and bytewise:
                cuts = _range_cuts(bounds, COMPARE_RANGES_PER_PROCESS * (workers + 1))
            if not cuts:  # one pass: a parallel merge join reads staging in every process
                settings["max_parallel_workers_per_gather"] = "0"
        else:  # never lower a work_mem set larger for this database or role
            cur.execute(
                "SELECT pg_size_bytes(current_setting('work_mem')) < pg_size_bytes(%s)",
                (COMPARE_WORK_MEM,),
            )
            if cur.fetchone()[0]:
                settings["work_mem"] = COMPARE_WORK_MEM
            settings["parallel_leader_participation"] = "off"
        saved: list[tuple[str, str]] = []
        for name, value in settings.items():
            cur.execute("SELECT current_setting(%s), set_config(%s, %s, true)", (name, name, value))
            saved.append((name, cur.fetchone()[0]))
        return ComparePlan(saved, cuts)

    def _replace_sqlite(
        self,
        load_id: int,
        table: str,
        columns: tuple[str, ...],
        key_column: str | None,
        source: TableSource,
        before_swap: Callable[[int], str | None],
        progress: Callable[[int], None] | None,
        on_changes: Callable[[LoadChanges], None] | None,
    ) -> int:
        live, staging = self._data_table(table), self._data_table(table + STAGING_SUFFIX)
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
                changes = None
                if key_column:
                    # The old table's key index goes first (SQLite cannot rename an index:
                    # the new one takes its name); the old table stays until the comparison
                    # is done. All of it is rolled back if a check below fails.
                    index = quote_ident(table + KEY_INDEX_SUFFIX)
                    cur.execute(f"DROP INDEX IF EXISTS {index}")
                    _build_key_index(
                        cur, index, staging, key_column, sqlite3.IntegrityError,
                        source, before_swap, total,
                    )  # fmt: skip
                sha256 = before_swap(total)
                if key_column:
                    changes = self._compare(cur, table, staging, columns, key_column, total)
                    if changes is not None and on_changes is not None:
                        on_changes(changes)
                cur.execute(f"DROP TABLE IF EXISTS {live}")
                cur.execute(f"ALTER TABLE {staging} RENAME TO {live}")
                self._mark_loaded(cur, load_id, total, sha256, changes)
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
        on_changes: Callable[[LoadChanges], None] | None,
    ) -> int:
        import psycopg

        live, staging = self._data_table(table), self._data_table(table + STAGING_SUFFIX)
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
                    changes = None
                    if key_column:
                        changes = self._compare(cur, table, staging, columns, key_column, total)
                        if changes is not None and on_changes is not None:
                            on_changes(changes)
                    self._swap_postgres(cur, table, live, staging, key_column)
                    self._mark_loaded(cur, load_id, total, sha256, changes)
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
                cur.execute(f"ALTER TABLE {staging} RENAME TO {quote_ident(table)}")
                if key_column:
                    cur.execute(
                        f"ALTER INDEX {self._data_table(table + NEW_KEY_INDEX_SUFFIX)} "
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
        loads = self.tables.loads
        with self.engine.connect() as conn:
            row = conn.execute(
                select(loads)
                .where(
                    loads.c.account == account,
                    loads.c.spec_file == spec_file,
                    loads.c.status == LOADED,
                )
                .order_by(loads.c.id.desc())
                .limit(1)
            ).first()
        return LoadRecord(**row._mapping) if row else None

    def streak(self, account: str, spec_file: str, recent: int = 5) -> Streak:
        """The spec's runs since its last successful load: how many (each recorded run that
        did not load it: no file, refused, failed, interrupted) and the newest ``recent`` of
        them. The alerts and the feed's state are worked out from this, so every node and
        every command sees the same count."""
        loads = self.tables.loads
        last = self.last_loaded(account, spec_file)
        since = (
            loads.c.account == account,
            loads.c.spec_file == spec_file,
            loads.c.status != RUNNING,
            loads.c.id > (last.id if last else 0),
        )
        with self.engine.connect() as conn:
            counts = conn.execute(
                select(loads.c.status, func.count()).where(*since).group_by(loads.c.status)
            ).all()
            rows = conn.execute(
                select(loads).where(*since).order_by(loads.c.id.desc()).limit(recent)
            ).all()
        by_status = {str(status): int(n) for status, n in counts}
        return Streak(
            last,
            sum(by_status.values()),
            by_status,
            [LoadRecord(**r._mapping) for r in reversed(rows)],
        )

    def loads(self, account: str | None = None, limit: int = 100) -> list[LoadRecord]:
        loads = self.tables.loads
        query = select(loads).order_by(loads.c.id.desc()).limit(limit)
        if account is not None:
            query = query.where(loads.c.account == account)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [LoadRecord(**r._mapping) for r in reversed(rows)]

    def table_rows(self, table: str) -> list[tuple[str, ...]]:
        """Every row of a live table in load order (tests and small tables only)."""
        with self.engine.connect() as conn:
            result = conn.exec_driver_sql(f"SELECT * FROM {self._data_table(table)}")
            return [tuple(r) for r in result]

    def data_table_loaders(self, table: str) -> set[str] | None:
        """The accounts whose loads filled data table ``table``; None when no such table
        exists. An empty set: the table was made by something other than the loader (the
        institution's own table): approval must not hand it to a client's file."""
        loads = self.tables.loads
        with self.engine.connect() as conn:
            if not inspect(conn).has_table(table, schema=self.data_schema):
                return None
            return set(
                conn.scalars(
                    select(loads.c.account)
                    .where(loads.c.table_name == table, loads.c.status == LOADED)
                    .distinct()
                )
            )

    # -- pool applicants --------------------------------------------------------------------

    def replace_applicants(self, account: str, ids: Iterable[str]) -> int:
        """Replace an account's applicant IDs, and record the import, in one transaction;
        returns the count. Each ID keeps its place in ``ids`` (``position``, from 0), the
        order :meth:`applicants` returns them in."""
        applicants, imports = self.tables.pool_applicants, self.tables.pool_imports
        with self.engine.begin() as conn:
            conn.execute(delete(applicants).where(applicants.c.account == account))
            conn.execute(delete(imports).where(imports.c.account == account))
            batch: list[dict[str, Any]] = []
            count = 0
            for uuuid in ids:
                batch.append({"account": account, "uuuid": uuuid, "position": count})
                count += 1
                if len(batch) >= 10_000:
                    conn.execute(insert(applicants), batch)
                    batch.clear()
            if batch:
                conn.execute(insert(applicants), batch)
            conn.execute(insert(imports).values(account=account, imported=utcnow(), count=count))
        return count

    def applicants_imported(self, account: str) -> datetime | None:
        """When the account's applicant list was last imported (None: never)."""
        imports = self.tables.pool_imports
        with self.engine.connect() as conn:
            return conn.scalar(select(imports.c.imported).where(imports.c.account == account))

    def applicants(self, account: str) -> list[str]:
        """The account's applicant IDs in the order they were imported. Rows imported before
        the ``position`` column all have position 0 and come in the order of the ID (the order
        the pool file had then)."""
        applicants = self.tables.pool_applicants
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    select(applicants.c.uuuid)
                    .where(applicants.c.account == account)
                    .order_by(applicants.c.position, applicants.c.uuuid)
                )
            )

    def applicant_count(self, account: str) -> int:
        applicants = self.tables.pool_applicants
        with self.engine.connect() as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(applicants)
                    .where(applicants.c.account == account)
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
