"""The pool file: exact bytes, atomic replacement, both sources, refusals, failure handling."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from ingest_core import folder_log
from ingest_core.errors import Refused
from ingest_core.settings import PoolSettings
from loader.pool import import_ids, publish_pool, publish_pools, show_pool


@pytest.fixture
def deferred(settings, onboard):
    return onboard(settings, "defer", deferred_fetch=True)


def test_pool_file_exact_bytes_and_pool_line(deferred, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbfU0002\r\nU0001\n\n  U0003  \n")
    assert import_ids(deferred.settings, deferred.name, ids) == 3
    result = publish_pool(deferred.settings, deferred.name)
    assert result.ok and result.count == 3
    assert deferred.folder.pool_file.read_bytes() == b"U0001\r\nU0002\r\nU0003\r\n"
    line = folder_log.read_lines(deferred.folder)[-1]
    assert line.split(" ", 1)[1] == "POOL applicant_pool.txt 3 active applicant IDs"
    leftovers = [p.name for p in deferred.folder.root.iterdir() if p.name.startswith(".ingest-p")]
    assert leftovers == []
    view = show_pool(deferred.settings, deferred.name)
    assert view.ids_in_source == 3 and view.ids_in_file == 3 and view.published
    assert view.imported_at is not None


def test_show_tells_a_list_never_imported_from_an_empty_one(deferred, tmp_path):
    view = show_pool(deferred.settings, deferred.name)
    assert view.imported_at is None and view.ids_in_source is None
    empty = tmp_path / "none.txt"
    empty.write_bytes(b"\r\n")
    import_ids(deferred.settings, deferred.name, empty)
    view = show_pool(deferred.settings, deferred.name)
    assert view.imported_at is not None and view.ids_in_source == 0


def test_import_replaces_the_previous_ids_and_refuses_bad_files(deferred, tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("A1\nA2\n")
    import_ids(deferred.settings, deferred.name, first)
    dup = tmp_path / "dup.txt"
    dup.write_text("B1\nB2\nB1\n")
    with pytest.raises(Refused, match=r"line 3: applicant ID 'B1' repeats line 1"):
        import_ids(deferred.settings, deferred.name, dup)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("B1\nB 2\n")
    with pytest.raises(Refused, match="line 2: applicant ID 'B 2' contains a space"):
        import_ids(deferred.settings, deferred.name, spaced)
    second = tmp_path / "b.txt"
    second.write_text("B1\n")
    import_ids(deferred.settings, deferred.name, second)
    publish_pool(deferred.settings, deferred.name)
    assert deferred.folder.pool_file.read_bytes() == b"B1\r\n"


def test_pool_needs_a_deferred_fetch_account(acme, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("X\n")
    with pytest.raises(Refused, match="not a deferred-fetch account"):
        import_ids(acme.settings, acme.name, ids)
    assert publish_pools(acme.settings) == []  # acme is not deferred-fetch


def test_query_source_against_another_database(deferred, tmp_path):
    crm = tmp_path / "crm.db"
    with sqlite3.connect(crm) as conn:
        conn.execute("CREATE TABLE applicants (org TEXT, uuuid TEXT, active INTEGER)")
        conn.executemany(
            "INSERT INTO applicants VALUES (?, ?, ?)",
            [("defer", "Z9", 1), ("defer", "Z1", 1), ("defer", "Z5", 0), ("other", "Q", 1)],
        )
    pool = PoolSettings(
        source="query",
        query_url=f"sqlite:///{crm}",
        query="SELECT uuuid FROM applicants WHERE org = :account AND active = 1 ORDER BY uuuid",
    )
    result = publish_pool(deferred.settings.replace(pool=pool), deferred.name)
    assert result.ok and result.count == 2
    assert deferred.folder.pool_file.read_bytes() == b"Z1\r\nZ9\r\n"


def test_failed_publish_keeps_the_previous_pool_file_and_logs_an_error(deferred, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("K1\n")
    import_ids(deferred.settings, deferred.name, ids)
    assert publish_pool(deferred.settings, deferred.name).ok
    broken = PoolSettings(source="query", query_url=f"sqlite:///{tmp_path}/x.db", query="SELEC")
    result = publish_pool(deferred.settings.replace(pool=broken), deferred.name)
    assert not result.ok
    assert deferred.folder.pool_file.read_bytes() == b"K1\r\n"
    line = folder_log.read_lines(deferred.folder)[-1]
    assert " ERROR applicant_pool.txt the pool file was not updated" in line
    assert "SELEC" not in line  # internals go to the operators, not the client's log


@pytest.mark.postgres
def test_pool_table_in_postgres(settings, pg_url, onboard, tmp_path):
    on = onboard(settings.replace(sis_db_url=pg_url), "pgdefer", deferred_fetch=True)
    ids = tmp_path / "ids.txt"
    ids.write_text("P2\nP1\n")
    assert import_ids(on.settings, on.name, ids) == 2
    assert publish_pool(on.settings, on.name).ok
    assert on.folder.pool_file.read_bytes() == b"P1\r\nP2\r\n"


def test_temporary_pool_files_of_a_killed_publish_are_removed(deferred, tmp_path):
    """A publish killed mid-write leaves a hidden temporary file (it counts against the
    account's quota); the next publish removes those older than an hour, and leaves a fresh
    one alone (another publish may be writing it)."""
    ids = tmp_path / "ids.txt"
    ids.write_text("K1\n")
    import_ids(deferred.settings, deferred.name, ids)
    stale, fresh = deferred.folder.pool_temp("dead"), deferred.folder.pool_temp("busy")
    stale.write_bytes(b"K0\r\n" * 1000)
    fresh.write_bytes(b"K0\r\n")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert publish_pool(deferred.settings, deferred.name).ok
    assert not stale.exists() and fresh.exists()
    assert deferred.folder.pool_file.read_bytes() == b"K1\r\n"
