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
    assert deferred.folder.pool_file.read_bytes() == b"U0002\r\nU0001\r\nU0003\r\n"
    line = folder_log.read_lines(deferred.folder)[-1]
    assert line.split(" ", 1)[1] == "POOL applicant_pool.txt 3 active applicant IDs"
    leftovers = [p.name for p in deferred.folder.root.iterdir() if p.name.startswith(".ingest-p")]
    assert leftovers == []
    view = show_pool(deferred.settings, deferred.name)
    assert view.ids_in_source == 3 and view.ids_in_file == 3 and view.published
    assert view.imported_at is not None
    assert view.source == "table ingest_pool_applicants"


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
    assert "the previous pool file stays" in line


def test_a_publish_before_any_import_promises_nothing_that_is_not_so(deferred):
    """No mail server set up and no pool file yet: the client is told neither that the
    operators were mailed nor that a previous pool file stays."""
    assert not deferred.settings.smtp.host
    assert not publish_pool(deferred.settings, deferred.name).ok
    line = folder_log.read_lines(deferred.folder)[-1]
    assert " ERROR applicant_pool.txt the pool file was not updated" in line
    assert "the operators see it in the service's log" in line
    assert "no pool file has been published yet" in line
    assert "notified" not in line and "previous pool file" not in line


@pytest.mark.postgres
def test_pool_table_in_postgres(settings, pg_url, onboard, tmp_path):
    on = onboard(settings.replace(sis_db_url=pg_url), "pgdefer", deferred_fetch=True)
    ids = tmp_path / "ids.txt"
    ids.write_text("P2\nP1\n")
    assert import_ids(on.settings, on.name, ids) == 2
    assert publish_pool(on.settings, on.name).ok
    assert on.folder.pool_file.read_bytes() == b"P2\r\nP1\r\n"
    assert show_pool(on.settings, on.name).source == "table sis_ingest.pool_applicants"


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


# -- what an applicant ID may be, on both databases, through the CLI ---------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def pool_on(request, settings, config_file, onboard):
    """A deferred-fetch account on each backend, with a first list imported and published."""
    url = settings.sis_db_url
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        config_file.write_text(f'sis_db_url = "{url}"\n' + config_file.read_text())
    on = onboard(settings.replace(sis_db_url=url), "defer", deferred_fetch=True)
    first = on.folder.root.parent / "first.txt"
    first.write_text("K1\nK2\n")
    import_ids(on.settings, on.name, first)
    assert publish_pool(on.settings, on.name).ok
    return on


def _unchanged(on) -> None:
    from loader.sis_db import open_sis_db

    assert sorted(open_sis_db(on.settings.sis_db_url).applicants(on.name)) == ["K1", "K2"]
    assert on.folder.pool_file.read_bytes() == b"K1\r\nK2\r\n"


def test_ids_outside_the_rule_are_refused_with_every_line(pool_on, ingestctl, workdir):
    (workdir / "ids.txt").write_text(
        'A1\nA,1\n"A2"\n=cmd|x\n-dash\nok.id_2-x\n\u00e91\n' + "x" * 65 + "\nA1\nB 2\n",
        encoding="utf-8",
    )
    done = ingestctl("pool", "import", pool_on.name, "ids.txt")
    assert done.returncode == 1 and done.stdout == ""
    (error,) = done.stderr.splitlines()
    assert "ids.txt: nothing imported, 8 lines to fix" in error
    assert "1 to 64 ASCII letters, digits, '-', '_' and '.', starting with a letter" in error
    for expected in (
        "line 2: applicant ID 'A,1' contains ','",
        "line 3: applicant ID '\"A2\"' contains '\"'",
        "line 4: applicant ID '=cmd|x' contains '='",
        "line 5: applicant ID '-dash' starts with '-'",
        "line 7: applicant ID 'é1' contains 'é'",
        "line 8: applicant ID 'xxxx",
        "has 65 characters, more than 64",
        "line 9: applicant ID 'A1' repeats line 1",
        "line 10: applicant ID 'B 2' contains a space",
    ):
        assert expected in error, expected
    assert "line 6" not in error
    _unchanged(pool_on)
    assert publish_pool(pool_on.settings, pool_on.name).ok
    _unchanged(pool_on)


def test_at_most_twenty_bad_lines_are_listed_with_the_count(pool_on, ingestctl, workdir):
    (workdir / "ids.txt").write_text("".join(f"bad id {i}\n" for i in range(30)))
    done = ingestctl("pool", "import", pool_on.name, "ids.txt")
    assert done.returncode == 1
    assert "30 lines to fix" in done.stderr and "line 20: " in done.stderr
    assert "line 21: " not in done.stderr and done.stderr.rstrip().endswith("; and 10 more")
    _unchanged(pool_on)


def test_a_folder_is_not_an_id_file(pool_on, ingestctl, workdir):
    (workdir / "exports").mkdir()
    done = ingestctl("pool", "import", pool_on.name, "exports")
    assert done.returncode == 1
    assert done.stderr.strip() == "ingestctl: exports: is a folder, not a file; name the file " + (
        "of applicant IDs"
    )
    assert "not found" not in done.stderr
    _unchanged(pool_on)


def test_the_pool_file_keeps_the_import_order(pool_on, ingestctl, workdir):
    (workdir / "ids.txt").write_text("Z9\nA1\nM5\n")
    assert ingestctl("pool", "import", pool_on.name, "ids.txt").returncode == 0
    assert ingestctl("pool", "publish", pool_on.name).returncode == 0
    assert pool_on.folder.pool_file.read_bytes() == b"Z9\r\nA1\r\nM5\r\n"
    # A new import replaces the order with its own, past the size of one insert batch.
    ids = [f"N{i:05d}" for i in range(12_000)][::-1]
    (workdir / "ids.txt").write_text("".join(f"{v}\n" for v in ids))
    assert ingestctl("pool", "import", pool_on.name, "ids.txt").returncode == 0
    assert ingestctl("pool", "publish", pool_on.name).returncode == 0
    assert pool_on.folder.pool_file.read_bytes() == "".join(f"{v}\r\n" for v in ids).encode()


def test_no_pool_file_is_published_that_a_symlinked_log_cannot_report(pool_on, tmp_path):
    outside = tmp_path / "outside.log"
    outside.write_text("elsewhere\n")
    before = folder_log.read_lines(pool_on.folder)
    pool_on.folder.log_file.rename(tmp_path / "saved.log")
    pool_on.folder.log_file.symlink_to(outside)
    ids = tmp_path / "ids.txt"
    ids.write_text("K3\n")
    import_ids(pool_on.settings, pool_on.name, ids)
    result = publish_pool(pool_on.settings, pool_on.name)
    assert not result.ok and "is a symbolic link, not a regular file" in result.message
    assert pool_on.folder.pool_file.read_bytes() == b"K1\r\nK2\r\n"  # the previous file stays
    assert outside.read_text() == "elsewhere\n" and pool_on.folder.log_file.is_symlink()
    assert (tmp_path / "saved.log").read_text().splitlines() == before
