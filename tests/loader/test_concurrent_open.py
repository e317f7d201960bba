"""Several processes opening the same EMPTY SIS database at once all succeed: the service's
tables (schema ``sis_ingest`` on PostgreSQL, ``ingest_*`` tables on SQLite) are created by
one of them, under a lock the others wait for, and found by the rest.

Real processes (forked, none holding a connection from this one), a real SQLite file and a
real PostgreSQL database.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from ingest_core.db import create_private_sqlite_file
from loader.sis_db import _NAMESPACE_LOCK, SERVICE_SCHEMA, SisDB, advisory_key

PROCESSES = 6
ROUNDS = 5
_fork = multiprocessing.get_context("fork")


def _open(url: str, ready: Barrier | Event, errors: Any) -> None:
    """Child: wait for the others (or for the signal), then open the database."""
    try:
        if isinstance(ready, Event):
            ready.set()
        else:
            ready.wait()
        SisDB(url).dispose()
        errors.put("")
    except BaseException as exc:  # reported to the test, never lost in a child's stderr
        errors.put(f"{type(exc).__name__}: {exc}")


def _open_at_once(url: str, before_release: Callable[[], None] = lambda: None) -> list[str]:
    """Open ``url`` from PROCESSES processes started together; their errors."""
    errors = _fork.Queue()
    start = _fork.Barrier(PROCESSES)
    children = [_fork.Process(target=_open, args=(url, start, errors)) for _ in range(PROCESSES)]
    for child in children:
        child.start()
    before_release()
    results = [errors.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    return [r for r in results if r]


def _dsn(pg_url: str) -> str:
    return make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)


def _service_tables_work(url: str) -> None:
    db = SisDB(url)
    try:
        assert db.loads() == []
        assert db.applicants("acme") == []
    finally:
        db.dispose()


def test_processes_open_an_empty_sqlite_database_at_once(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        url = f"sqlite:///{tmp_path / f'sis{round_}.db'}"
        assert _open_at_once(url) == [], f"round {round_}"
        _service_tables_work(url)


@pytest.mark.postgres
def test_processes_open_an_empty_postgres_database_at_once(pg_url: str) -> None:
    for round_ in range(ROUNDS):
        assert _open_at_once(pg_url) == [], f"round {round_}"
        _service_tables_work(pg_url)
        with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:  # empty again
            conn.execute(f'DROP SCHEMA "{SERVICE_SCHEMA}" CASCADE')


def _hold_write_lock(path: Path, held: Event, release: Event) -> None:
    """Child: hold SQLite's write lock on ``path`` (as another opener creating the tables
    does) until told to let go."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    held.set()
    release.wait(120)
    conn.execute("COMMIT")
    conn.close()


def test_sqlite_open_waits_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """The moment that made simultaneous opens fail: a new file's switch to WAL finds
    another connection mid-transaction, and SQLite answers "database is locked" at once
    (no busy wait). The openers now wait for it and then all succeed."""
    path = tmp_path / "sis.db"
    create_private_sqlite_file(path)  # what opening does first: an empty file
    held, release = _fork.Event(), _fork.Event()
    holder = _fork.Process(target=_hold_write_lock, args=(path, held, release))
    holder.start()
    assert held.wait(60)
    errors = _fork.Queue()
    started = [_fork.Event() for _ in range(PROCESSES)]
    children = [
        _fork.Process(target=_open, args=(f"sqlite:///{path}", ev, errors)) for ev in started
    ]
    for child in children:
        child.start()
    for ev in started:
        assert ev.wait(60)
    time.sleep(0.3)  # let them reach the switch to WAL while the lock is held (not asserted)
    release.set()
    holder.join(timeout=60)
    results = [errors.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [r for r in results if r] == []
    _service_tables_work(f"sqlite:///{path}")


@pytest.mark.postgres
def test_postgres_openers_wait_for_the_set_up_lock(pg_url: str) -> None:
    """While one session holds the set-up's advisory lock, every opener of the empty
    database waits on it (seen in pg_locks); released, they all succeed."""
    key = advisory_key(_NAMESPACE_LOCK)
    with psycopg.connect(_dsn(pg_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        # pg_locks splits a bigint advisory key into two 32-bit halves.
        high, low = (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF

        def all_waiting() -> None:
            for _ in range(1200):
                waiting = holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND classid::bigint = %s AND objid::bigint = %s "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = "
                    "current_database())",
                    (high, low),
                ).fetchone()[0]
                if waiting == PROCESSES:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"{waiting} of {PROCESSES} openers waited for the set-up's lock")
            holder.execute("SELECT pg_advisory_unlock(%s)", (key,))

        assert _open_at_once(pg_url, before_release=all_waiting) == []
    _service_tables_work(pg_url)
