"""The SIS table swap: readers never see half a load; a killed load leaves the old data.

Run on SQLite and on a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import REPO
from sample_files import COLUMNS, make_spec, people, render, write

from ingest_core import folder_log
from loader.nightly import load_file, run_account
from loader.sis_db import INTERRUPTED, LOADED, SisDB, open_sis_db
from loader.spec import table_name

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def account(request, acme, onboard, settings, kit):
    if request.param == "sqlite":
        on = acme
    else:
        on = onboard(settings.replace(sis_db_url=request.getfixturevalue("pg_url")), "pgacme")
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    return on


def _rows(on) -> list[tuple[str, ...]]:
    return open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec))


def test_load_replaces_table_and_records_the_run(account, kit):
    before = _rows(account)
    assert [r[0] for r in before] == ["U0000000", "U0000001", "U0000002"]
    kit.write_data(account.data_file, 5, start=100)
    digests = [hashlib.sha256(kit.data_text(3).encode()).hexdigest()]
    digests.append(hashlib.sha256(account.data_file.read_bytes()).hexdigest())
    result = run_account(account.settings, account.name)
    assert result.ok, result.summary()
    assert [r[0] for r in _rows(account)] == [f"U{i:07d}" for i in range(100, 105)]
    assert not account.data_file.exists()
    loads = open_sis_db(account.settings.sis_db_url).loads(account.name)
    done = [r for r in loads if r.status == LOADED]
    assert [r.rows for r in done] == [3, 5]
    assert [r.sha256 for r in done] == digests  # hashed in the load's own pass
    assert all(r.finished is not None for r in done)


# A child that starts a real nightly run and stops inside the load's transaction (at the
# first progress report, 10,000 rows in), waiting to be killed.
CHILD = """
import json, sys
from pathlib import Path
from ingest_core.settings import settings_from_mapping
from loader.nightly import run_account
cfg = json.loads(sys.argv[1])
settings = settings_from_mapping(cfg, Path(cfg["data_root"]))
def progress(account, file_name, rows):
    print(rows, flush=True)
    sys.stdin.readline()
run_account(settings, sys.argv[2], progress=progress)
print("finished", flush=True)
"""


def test_kill_9_midway_keeps_previous_data_and_file(account, kit):
    old = _rows(account)
    kit.write_data(account.data_file, 25_000, start=1000)
    content = account.data_file.read_bytes()
    s = account.settings
    cfg = {
        "data_root": str(s.data_root),
        "log_dir": str(s.log_dir),
        "control_db_url": s.control_db_url,
        "sis_db_url": s.sis_db_url,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), account.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None
        # Mid-load, inside the transaction (PostgreSQL counts whole blocks: 10,000 or a few more)
        assert 10_000 <= int(child.stdout.readline()) < 20_000
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert _rows(account) == old
    assert account.data_file.read_bytes() == content
    assert open_sis_db(s.sis_db_url).loads(account.name)[-1].status == "running"

    result = run_account(s, account.name)
    assert result.ok, result.summary()
    rows = _rows(account)
    assert len(rows) == 25_000 and rows[0][0] == "U0001000"
    assert not account.data_file.exists()
    statuses = [r.status for r in open_sis_db(s.sis_db_url).loads(account.name)]
    assert statuses[-2:] == [INTERRUPTED, LOADED]


def test_sqlite_reader_holding_the_table_sees_old_rows_then_new(acme, kit):
    kit.write_data(acme.data_file, 3)
    assert run_account(acme.settings, acme.name).ok
    table = table_name(acme.spec)
    path = acme.settings.sis_db_url.split("///", 1)[1]
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        cursor = reader.execute(f'SELECT "UUUID" FROM "{table}" ORDER BY rowid')
        first = cursor.fetchone()

        kit.write_data(acme.data_file, 4, start=50)
        result = load_file(acme.settings, acme.spec, acme.data_file)
        assert result.ok, result.message

        assert [first, *cursor.fetchall()] == [("U0000000",), ("U0000001",), ("U0000002",)]
        reader.execute("COMMIT")
        fresh = reader.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        assert fresh == (4,)
    finally:
        reader.close()


@pytest.mark.postgres
def test_postgres_swap_waits_for_a_reader_and_never_shows_partial_data(acme_pg, kit):
    on = acme_pg
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    table = table_name(on.spec)
    conninfo = on.settings.sis_db_url.replace("postgresql+psycopg", "postgresql")
    db = SisDB(on.settings.sis_db_url, lock_timeout_ms=100, swap_attempts=200)
    kit.write_data(on.data_file, 6, start=70)
    with psycopg.connect(conninfo) as reader:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        seen = reader.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        outcome: list[object] = []
        loader = threading.Thread(
            target=lambda: outcome.append(load_file(on.settings, on.spec, on.data_file, db=db))
        )
        loader.start()
        time.sleep(1.0)  # the swap is queued behind our ACCESS SHARE lock meanwhile
        assert loader.is_alive() and not outcome, "the swap did not wait for the reader"
        again = reader.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        reader.execute("COMMIT")
        loader.join(timeout=60)
        assert seen == again == (3,)
        assert outcome and outcome[0].ok, outcome
        assert reader.execute(f'SELECT count(*) FROM "{table}"').fetchone() == (6,)
    db.dispose()


@pytest.mark.postgres
def test_postgres_reader_that_never_lets_go_fails_the_load_cleanly(acme_pg, kit):
    on = acme_pg
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    table = table_name(on.spec)
    conninfo = on.settings.sis_db_url.replace("postgresql+psycopg", "postgresql")
    db = SisDB(on.settings.sis_db_url, lock_timeout_ms=50, swap_attempts=3)
    kit.write_data(on.data_file, 6, start=70)
    with psycopg.connect(conninfo) as reader:
        reader.execute("BEGIN")
        reader.execute(f'SELECT count(*) FROM "{table}"')
        result = load_file(on.settings, on.spec, on.data_file, db=db)
        reader.execute("COMMIT")
    db.dispose()
    assert result.status == "failed"
    assert "stayed in use by readers" in result.internal_error
    assert "will be loaded at the next run" in result.message
    assert len(open_sis_db(on.settings.sis_db_url).table_rows(table)) == 3
    assert on.data_file.exists()


def test_staging_and_live_tables_after_loads(account, kit):
    """No staging table is left behind, and the key column is indexed."""
    kit.write_data(account.data_file, 4, start=10)
    assert run_account(account.settings, account.name).ok
    db = open_sis_db(account.settings.sis_db_url)
    from sqlalchemy import inspect

    names = inspect(db.engine).get_table_names()
    table = table_name(account.spec)
    assert table in names and not any(n.endswith("__staging") for n in names)
    indexes = inspect(db.engine).get_indexes(table)
    assert [i["column_names"] for i in indexes] == [["UUUID"]]
    assert indexes[0]["unique"]  # readers can count on one row per key


def test_postgres_key_column_sorts_bytewise_and_lookups_use_its_index(acme_pg, kit):
    """The key column is COLLATE "C" (its index builds faster) and a reader's plain
    ``WHERE key = ...`` still finds the index."""
    kit.write_data(acme_pg.data_file, 50)
    assert run_account(acme_pg.settings, acme_pg.name).ok
    table = table_name(acme_pg.spec)
    url = acme_pg.settings.sis_db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        collations = dict(
            conn.execute(
                "SELECT column_name, collation_name FROM information_schema.columns "
                "WHERE table_name = %s",
                (table,),
            ).fetchall()
        )
        assert collations["UUUID"] == "C"
        assert collations["first_name"] is None  # other columns keep the database's
        conn.execute("SET enable_seqscan = off")
        plan = conn.execute(
            f'EXPLAIN SELECT * FROM "{table}" WHERE "UUUID" = %s', ("U0000007",)
        ).fetchall()
        assert "Index" in " ".join(row[0] for row in plan)
        ordered = conn.execute(f'SELECT "UUUID" FROM "{table}" ORDER BY 1').fetchall()
        assert [r[0] for r in ordered] == sorted(r[0] for r in ordered)


def test_sqlite_wal_is_checkpointed_after_a_load(acme, kit):
    kit.write_data(acme.data_file, 20_000)
    assert run_account(acme.settings, acme.name).ok
    wal = Path(acme.settings.sis_db_url.split("///", 1)[1] + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_sqlite_second_account_waits_for_the_first_accounts_load(settings, onboard, kit):
    """SQLite has one writer: a load of another account waits for it instead of failing."""
    first, second = onboard(settings, "first"), onboard(settings, "second")
    kit.write_data(first.data_file, 25_000)
    kit.write_data(second.data_file, 5)
    cfg = {
        "data_root": str(settings.data_root),
        "log_dir": str(settings.log_dir),
        "control_db_url": settings.control_db_url,
        "sis_db_url": settings.sis_db_url,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), "first"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "10000"  # first holds the write lock now
        results: list[object] = []
        waiting = threading.Thread(target=lambda: results.append(run_account(settings, "second")))
        waiting.start()
        time.sleep(0.5)
        assert not results, "the second load did not wait for the write lock"
        child.stdin.write("\n\n\n")  # let the first load go on to the end
        child.stdin.flush()
        assert child.stdout.read().strip().endswith("finished")
        assert child.wait(timeout=60) == 0
        waiting.join(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert results and results[0].ok, results
    assert not first.data_file.exists() and not second.data_file.exists()
    assert len(open_sis_db(settings.sis_db_url).table_rows(table_name(first.spec))) == 25_000


@pytest.mark.postgres
def test_postgres_repeatable_read_snapshot_from_before_the_swap_never_sees_an_empty_table(
    acme_pg, kit
):
    on = acme_pg
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    table = table_name(on.spec)
    conninfo = on.settings.sis_db_url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(conninfo) as reader:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT 1")  # the snapshot is taken now, before the load commits
        kit.write_data(on.data_file, 6, start=70)
        assert load_file(on.settings, on.spec, on.data_file).ok
        count = reader.execute(f'SELECT count(*) FROM "{table}"').fetchone()
        reader.execute("COMMIT")
    assert count == (6,)  # without COPY FREEZE this is (0,): an empty table


@pytest.mark.postgres
def test_postgres_one_load_per_table_across_nodes(acme_pg, kit):
    """Another node holding the table's advisory lock makes this load fail cleanly."""
    from loader.sis_db import advisory_key

    on = acme_pg
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    conninfo = on.settings.sis_db_url.replace("postgresql+psycopg", "postgresql")
    kit.write_data(on.data_file, 4, start=9)
    with psycopg.connect(conninfo) as other_node:
        other_node.execute("BEGIN")
        other_node.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key(table_name(on.spec)),))
        result = load_file(on.settings, on.spec, on.data_file)
        other_node.execute("COMMIT")
    assert result.status == "failed" and "another loader" in result.internal_error
    assert len(_rows(on)) == 3
    assert load_file(on.settings, on.spec, on.data_file).ok


@pytest.mark.postgres
def test_postgres_loads_exactly_the_values_sqlite_loads(settings, pg_url, tmp_path):
    """PostgreSQL is fed COPY text (mostly the file's own), SQLite the rows: same table."""
    from loader.validate import ValidationReport, iter_rows

    rows = people(4000)  # several 32 KiB blocks: most go to COPY as the file's own text
    rows[3][1] = "back\\slash \\N and \\."
    rows[5][2] = "  padded  "
    rows[7][3] = "Zoë 東京 😀"
    rows[9][4] = ""
    rows[3500][2] = "van der  Berg"
    quoted = [list(r) for r in rows]
    quoted[11][1] = 'tab\tand "quote" and, comma'
    quoted[12][2] = "\t tabs and spaces around \t"
    comma = [list(r) for r in rows]
    comma[13][1] = "tab\tinside"
    comma[14][2] = "\ttab-padded\t"
    comma[15][3] = "\\\\server\\share"
    cases = {
        "tab_crlf_no_final_end.txt": (
            render(COLUMNS, rows, terminator="\r\n", final_terminator=False),
            {"terminator": "\r\n"},
        ),
        "quoted_all.csv": (render(COLUMNS, quoted, delimiter=",", quoting="all"), {
            "delimiter": ",", "quoting": "all"}),
        "comma_bare.csv": (render(COLUMNS, comma, delimiter=","), {"delimiter": ","}),
    }  # fmt: skip
    pg_settings = settings.replace(sis_db_url=pg_url)
    for name, (content, fmt) in cases.items():
        path = write(tmp_path / name, content)
        spec = make_spec(file_name=name, **fmt)
        expected = [tuple(r) for r in iter_rows(path, spec, ValidationReport(name))]
        assert len(expected) == 4000
        loaded = []
        for on in (settings, pg_settings):
            result = load_file(on, spec, path)
            assert result.ok and result.rows == 4000, result.message
            loaded.append(open_sis_db(on.sis_db_url).table_rows(table_name(spec)))
        assert loaded[0] == loaded[1] == expected, name
        assert expected[5][2] == "padded" and expected[3][1] == "back\\slash \\N and \\."
        if name == "comma_bare.csv":
            assert expected[13][1] == "tab\tinside" and expected[14][2] == "tab-padded"
        if name == "quoted_all.csv":
            assert expected[12][2] == "tabs and spaces around"


def test_refused_file_rolls_back_rows_already_loaded(account, kit):
    """Errors found after rows went to the database (a bad line late; a duplicate key, found
    only at the end while the key index is being built): the load is refused and the previous
    table, with its index, stays."""
    on = account
    lines = kit.data_text(20_000, start=100).splitlines(keepends=True)
    bad_line = [*lines[:15_000], "U9999999\tonly three\tfields\n", *lines[15_000:]]
    duplicate = [*lines, lines[1]]
    both = [*bad_line, lines[1]]
    for content, error in (
        (bad_line, "line 15001: 3 fields, expected 4"),
        (duplicate, "line 20002: duplicate key UUUID 'U0000100' (also on line 2"),
        # Every problem is reported, as the pre-check does, not only the first kind found.
        (both, "2 errors: line 15001: 3 fields, expected 4; line 20003: duplicate key"),
    ):
        on.data_file.write_text("".join(content), encoding="utf-8", newline="")
        result = load_file(on.settings, on.spec, on.data_file)
        assert result.status == "refused" and error in result.message, result.message
        assert result.sha256 == hashlib.sha256(on.data_file.read_bytes()).hexdigest()
        assert [r[0] for r in _rows(on)] == ["U0000000", "U0000001", "U0000002"]
    from sqlalchemy import inspect

    engine = open_sis_db(on.settings.sis_db_url).engine
    names = inspect(engine).get_table_names()
    assert not any(n.endswith("__staging") for n in names)
    indexes = inspect(engine).get_indexes(table_name(on.spec))
    assert [i["column_names"] for i in indexes] == [["UUUID"]]
    assert [r.status for r in open_sis_db(on.settings.sis_db_url).loads(on.name)][-3:] == [
        "refused",
        "refused",
        "refused",
    ]


@pytest.mark.postgres
def test_postgres_connection_cut_mid_copy_keeps_previous_data_and_file(acme_pg, kit):
    """The database connection dies in the middle of the COPY (the backend is terminated,
    as a database restart or a network cut would): the previous data stays, the file stays,
    the client's log says so, and the next run loads it."""
    on = acme_pg
    kit.write_data(on.data_file, 3)
    assert run_account(on.settings, on.name).ok
    conninfo = on.settings.sis_db_url.replace("postgresql+psycopg", "postgresql")
    kit.write_data(on.data_file, 50_000, start=100)
    cut: list[int] = []

    def progress(account, file_name, rows):
        if not cut:
            with psycopg.connect(conninfo, autocommit=True) as admin:
                query = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY %%'"
                cut.extend(admin.execute(query).fetchone() or [])
                admin.execute("SELECT pg_terminate_backend(%s)", (cut[0],))

    result = run_account(on.settings, on.name, progress=progress)
    assert cut and not result.ok
    assert on.data_file.exists()
    assert [r[0] for r in _rows(on)] == ["U0000000", "U0000001", "U0000002"]
    line = folder_log.read_lines(on.folder)[-1]
    assert " ERROR sis_hr_user_info.txt not loaded: " in line and "the file stays" in line
    result = run_account(on.settings, on.name)
    assert result.ok, result.summary()
    assert len(_rows(on)) == 50_000 and not on.data_file.exists()
    statuses = [r.status for r in open_sis_db(on.settings.sis_db_url).loads(on.name)]
    assert statuses[-1] == LOADED and statuses[-2] != LOADED
