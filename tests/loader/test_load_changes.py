"""What changed in each load (issue 14, point 6): rows added, removed and changed by key,
counted in SQL against the live table before the swap, in the LOADED line, the load history
and `SisDB.loads()`; the history columns added to an existing database; the removed-keys
guard (`[loader] max_removed_share`) refusing a file, and `--force` loading it.

On SQLite and on a real PostgreSQL, each expectation computed by hand.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import inspect

from ingest_core import folder_log
from loader.nightly import run_account
from loader.sis_db import (
    LOADED,
    REFUSED,
    SQLITE_COMPARE_CACHE_KIB,
    ComparePlan,
    SisDB,
    _range_cuts,
    _sqlite_in_key_order,
    close_sis_dbs,
    open_sis_db,
)
from loader.spec import table_name

HEADER = "UUUID\tfirst_name\tlast_name\temail"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def on(request, settings, config_file, onboard):
    """An onboarded account (key column UUUID) on each backend; the CLI's config names the
    same database."""
    url = settings.sis_db_url
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        config_file.write_text(f'sis_db_url = "{url}"\n' + config_file.read_text())
    return onboard(settings.replace(sis_db_url=url))


def _write(on, *rows: str) -> None:
    on.data_file.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8", newline="")


def _rows(on) -> list[tuple[str, ...]]:
    return open_sis_db(on.settings.sis_db_url).table_rows(table_name(on.spec))


def _loads(on):
    return open_sis_db(on.settings.sis_db_url).loads(on.name)


def _last_line(on) -> str:
    return folder_log.read_lines(on.folder)[-1].split(" ", 1)[1]


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"U{i:07d}\tFirst{i}\tLast{i}\tu{i}@example.edu" for i in range(start, start + n)]


FIRST = (
    "A1\tAnn\tLee\tann@example.edu",
    "B2\tBob\tRay\tbob@example.edu",
    "C3\tCid\tPoe\tcid@example.edu",
    "D4\tDee\tKim\tdee@example.edu",
    "E5\tEve\tFox\teve@example.edu",
    "x6\tXia\tLin\txia@example.edu",
)
SECOND = (
    "A1\tAnn\tLee\tann@example.edu",  # the same
    "B2\tBobby\tRay\tbob@example.edu",  # changed: first_name
    "C3\tCid\tPoe\tcid@example.edu",  # the same
    "D4\tDee\tKim\tdee@example.org",  # changed: email (the last column)
    "F7\tFay\tOrr\tfay@example.edu",  # new
    "G8\tGus\tVon\tgus@example.edu",  # new
    "X6\tXia\tLin\txia@example.edu",  # new: keys compare bytewise, X6 is not x6
    # gone: E5, x6
)


def test_counts_added_removed_changed_by_key(on):
    """By hand: 3 new (F7, G8, X6), 2 gone (E5, x6), 2 changed (B2, D4), 2 the same."""
    _write(on, *FIRST)
    first = run_account(on.settings, on.name)
    assert first.ok, first.summary()
    # A first load has nothing to compare with: no counts, and the line says only the rows.
    assert _last_line(on) == "LOADED sis_hr_user_info.txt 6 rows imported"
    (load,) = _loads(on)
    assert (load.added, load.removed, load.changed) == (None, None, None)

    _write(on, *SECOND)
    second = run_account(on.settings, on.name)
    assert second.ok, second.summary()
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (3 new, 2 gone, 2 changed)"
    )
    assert sorted(r[0] for r in _rows(on)) == ["A1", "B2", "C3", "D4", "F7", "G8", "X6"]
    loads = _loads(on)
    assert [ld.status for ld in loads] == [LOADED, LOADED]
    assert (loads[-1].rows, loads[-1].added, loads[-1].removed, loads[-1].changed) == (7, 3, 2, 2)

    # The same file again: nothing changed, and it says so.
    _write(on, *SECOND)
    assert run_account(on.settings, on.name).ok
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (0 new, 0 gone, 0 changed)"
    )
    assert (_loads(on)[-1].added, _loads(on)[-1].removed, _loads(on)[-1].changed) == (0, 0, 0)


def _analyze(on) -> float:
    """ANALYZE the live table (as autovacuum does after a load); its key's correlation."""
    db = open_sis_db(on.settings.sis_db_url)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(f'ANALYZE "{table_name(on.spec)}"')
        return conn.exec_driver_sql(
            "SELECT correlation FROM pg_stats WHERE tablename = %(t)s AND attname = 'UUUID'",
            {"t": table_name(on.spec)},
        ).scalar()


def _spy_plans(monkeypatch) -> list[ComparePlan]:
    plans: list[ComparePlan] = []
    plan = SisDB._postgres_compare_plan

    def spy(self, *args):
        plans.append(plan(self, *args))
        return plans[-1]

    monkeypatch.setattr(SisDB, "_postgres_compare_plan", spy)
    return plans


def _plan_as_for_a_big_table(pg_url: str, *disabled: str) -> None:
    """Make parallel plans cheap in the test database, and turn off the ``disabled`` plan
    types, so that the planner chooses for a few rows what it chooses for a million."""
    database = pg_url.rsplit("/", 1)[1]
    with open_sis_db(pg_url).engine.begin() as conn:
        for name in (
            "parallel_setup_cost",
            "parallel_tuple_cost",
            "min_parallel_table_scan_size",
            "min_parallel_index_scan_size",
        ):
            conn.exec_driver_sql(f"ALTER DATABASE {database} SET {name} = 0")
        for name in disabled:
            conn.exec_driver_sql(f"ALTER DATABASE {database} SET {name} = off")
    close_sis_dbs()  # new connections take the settings


def _watch_comparisons(monkeypatch, watch: Callable[[Any, str], None]) -> None:
    """From now on the comparisons' cursor calls ``watch(cursor, query)`` before it runs
    each query (in the load's transaction, with the comparison's settings)."""
    compare = SisDB._compare

    class Watched:
        def __init__(self, cur: Any) -> None:
            self._cur = cur

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

        def execute(self, query: Any, *params: Any) -> Any:
            watch(self._cur, str(query))
            return self._cur.execute(query, *params)

    monkeypatch.setattr(
        SisDB, "_compare", lambda self, cur, *args: compare(self, Watched(cur), *args)
    )


def _explain_comparisons(monkeypatch) -> list[dict[str, Any]]:
    """The plans (EXPLAIN ANALYZE, JSON) of the comparisons the loads run from now on: the
    load's cursor runs each comparison query once more under EXPLAIN."""
    explained: list[dict[str, Any]] = []

    def explain(cur: Any, query: str) -> None:
        if "AS previous" in query:
            cur.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}")
            explained.append(cur.fetchone()[0][0]["Plan"])

    _watch_comparisons(monkeypatch, explain)
    return explained


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A plan node and all the nodes under it."""
    return [node, *(n for child in node.get("Plans", []) for n in _nodes(child))]


@pytest.mark.postgres
def test_counts_on_postgres_with_a_live_table_sorted_by_key(settings, onboard, pg_url, monkeypatch):
    """A live table that autovacuum has analyzed (its rows in key order) is compared with
    merge joins over the two key indexes instead of a hash join, in ranges of keys cut at
    the live key's histogram bounds (2 per process: 2 workers and this one): the same counts."""
    on = onboard(settings.replace(sis_db_url=pg_url))
    _write(on, *FIRST)
    assert run_account(on.settings, on.name).ok
    assert _analyze(on) >= 0.9
    plans = _spy_plans(monkeypatch)
    _write(on, *SECOND)
    assert run_account(on.settings, on.name).ok
    assert [[name for name, _ in p.saved] for p in plans] == [
        ["jit", "enable_hashjoin", "enable_sort"]
    ]
    # Histogram A1 B2 C3 D4 E5 x6, 6 ranges: cut at the 2nd to 5th value.
    assert plans[0].cuts == ("B2", "C3", "D4", "E5")
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (3 new, 2 gone, 2 changed)"
    )


@pytest.mark.postgres
def test_counts_on_postgres_in_one_pass_without_parallel_workers(
    settings, onboard, pg_url, monkeypatch
):
    """``max_parallel_workers_per_gather = 0`` (a DBA's choice): one ordered pass, no ranges."""
    on = onboard(settings.replace(sis_db_url=pg_url))
    _write(on, *FIRST)
    assert run_account(on.settings, on.name).ok
    assert _analyze(on) >= 0.9
    database = pg_url.rsplit("/", 1)[1]
    with open_sis_db(pg_url).engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER DATABASE {database} SET max_parallel_workers_per_gather = 0")
    close_sis_dbs()  # new connections take the setting
    plans = _spy_plans(monkeypatch)
    _write(on, *SECOND)
    assert run_account(on.settings, on.name).ok
    assert plans[0].cuts == ()
    assert [name for name, _ in plans[0].saved] == [
        "jit",
        "enable_hashjoin",
        "enable_sort",
        "max_parallel_workers_per_gather",
    ]
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (3 new, 2 gone, 2 changed)"
    )


@pytest.mark.postgres
def test_counts_on_postgres_live_key_in_another_collation(settings, onboard, pg_url, monkeypatch):
    """A live table whose key column is not ``COLLATE "C"`` (made before the key was): one
    pass, no ranges (its index is in another order), and the keys still compare bytewise."""
    on = onboard(settings.replace(sis_db_url=pg_url))
    _write(on, *FIRST)
    assert run_account(on.settings, on.name).ok
    with open_sis_db(pg_url).engine.begin() as conn:
        conn.exec_driver_sql(
            f'ALTER TABLE "{table_name(on.spec)}" ALTER COLUMN "UUUID" TYPE text COLLATE "default"'
        )
    assert _analyze(on) >= 0.9
    plans = _spy_plans(monkeypatch)
    _write(on, *SECOND)
    assert run_account(on.settings, on.name).ok
    assert plans[0].cuts == ()
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (3 new, 2 gone, 2 changed)"
    )


RANGED_FIRST = tuple(f"K{i:03d}\tFirst{i}\tLast{i}\tu{i}@example.edu" for i in range(30))


def _ranged_second() -> tuple[str, ...]:
    rows = {r.split("\t", 1)[0]: r for r in RANGED_FIRST}
    for gone in ("K000", "K010", "K029"):  # below the first cut, on a cut, the last key
        del rows[gone]
    rows["K005"] = "K005\tFirst5\tLast5\tchanged@example.edu"  # on a cut
    rows["K019"] = "K019\tFirstXIX\tLast19\tu19@example.edu"  # on a cut
    rows["K024"] = "K024\tFirst24\tLast24\tu24@example.org"  # on a cut, last column
    for new in ("A1", "K0195", "Z9", "k001"):  # below all, between two, above (bytewise)
        rows[new] = f"{new}\tNew\tRow\t{new}@example.edu"
    return tuple(rows[k] for k in sorted(rows))


@pytest.mark.postgres
def test_counts_on_postgres_key_ranges_run_by_parallel_workers(
    settings, onboard, pg_url, monkeypatch
):
    """The ranges run in parallel worker processes (made cheap here, and the plan steered,
    so that the planner uses them as for a big table), which see the staged rows of the
    load's own transaction: keys on a cut, below the first and above the last are each
    counted once, by hand: 4 new (A1, K0195, Z9, k001), 3 gone (K000, K010, K029),
    3 changed (K005, K019, K024)."""
    on = onboard(settings.replace(sis_db_url=pg_url))
    _write(on, *RANGED_FIRST)
    assert run_account(on.settings, on.name).ok
    assert _analyze(on) >= 0.9
    _plan_as_for_a_big_table(pg_url, "enable_nestloop", "enable_seqscan")
    plans = _spy_plans(monkeypatch)
    explained = _explain_comparisons(monkeypatch)
    _write(on, *_ranged_second())
    assert run_account(on.settings, on.name).ok
    # 30 keys K000-K029, 6 ranges: cut at the 6th, 11th, 15th, 20th and 25th.
    assert plans[0].cuts == ("K005", "K010", "K014", "K019", "K024")
    (plan,) = explained
    gathers = [n for n in _nodes(plan) if n["Node Type"] == "Gather"]
    assert gathers and gathers[0]["Workers Launched"] >= 1, plan
    assert any(n["Node Type"] == "Append" and n["Parallel Aware"] for n in _nodes(plan)), plan
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 31 rows imported (4 new, 3 gone, 3 changed)"
    )
    assert [r[0] for r in _rows(on)] == sorted(r[0] for r in _rows(on))


def _scrambled(rows: tuple[str, ...]) -> tuple[str, ...]:
    """The rows in a fixed order that is not their keys' (an export sorted by name)."""
    return tuple(rows[(i * 7) % len(rows)] for i in range(len(rows)))


@pytest.mark.postgres
@pytest.mark.parametrize("database_work_mem", [None, "1GB"])
def test_counts_on_postgres_with_a_live_table_not_in_key_order(
    settings, onboard, pg_url, monkeypatch, database_work_mem
):
    """A live table whose rows are not in key order is compared with a parallel hash join,
    ``work_mem`` raised for that statement (never lowered where the database sets more: at
    1M rows the staged rows then fit in one batch, see bench/loader_bench.py --shuffled),
    the join left to the parallel workers (the leader only gathers their counts). Counted
    by hand as in the ranged test: 4 new, 3 gone, 3 changed."""
    on = onboard(settings.replace(sis_db_url=pg_url))
    _write(on, *_scrambled(RANGED_FIRST))
    assert run_account(on.settings, on.name).ok
    assert abs(_analyze(on)) < 0.9
    _plan_as_for_a_big_table(pg_url, "enable_nestloop", "enable_mergejoin")
    with open_sis_db(pg_url).engine.begin() as conn:  # the workers a big table gets
        conn.exec_driver_sql(f'ALTER TABLE "{table_name(on.spec)}" SET (parallel_workers = 2)')
    if database_work_mem:
        database = pg_url.rsplit("/", 1)[1]
        with open_sis_db(pg_url).engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {database} SET work_mem = '{database_work_mem}'")
        close_sis_dbs()
    plans = _spy_plans(monkeypatch)
    explained = _explain_comparisons(monkeypatch)
    _write(on, *_scrambled(_ranged_second()))
    assert run_account(on.settings, on.name).ok
    raised = [] if database_work_mem else ["work_mem"]
    assert [name for name, _ in plans[0].saved] == ["jit", *raised, "parallel_leader_participation"]
    assert plans[0].cuts == ()
    (plan,) = explained
    joins = [n for n in _nodes(plan) if n["Node Type"] == "Hash Join"]
    assert joins and joins[0]["Parallel Aware"], plan
    gathers = [n for n in _nodes(plan) if n["Node Type"] == "Gather"]
    assert gathers and gathers[0]["Workers Launched"] >= 1, plan
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 31 rows imported (4 new, 3 gone, 3 changed)"
    )


@pytest.mark.parametrize("scrambled", [False, True], ids=["key order", "another order"])
def test_sqlite_live_table_not_in_key_order_gets_a_larger_page_cache(
    settings, onboard, monkeypatch, scrambled
):
    """SQLite: a live table whose rows are not in key order is compared with a page cache
    that can hold staging's whole key index (one in key order keeps the connection's); the
    connection's own size is back afterwards. Counted by hand: 4 new, 3 gone, 3 changed."""
    on = onboard(settings)
    order = _scrambled if scrambled else (lambda rows: rows)
    _write(on, *order(RANGED_FIRST))
    assert run_account(on.settings, on.name).ok
    executed: list[str] = []
    _watch_comparisons(monkeypatch, lambda _cur, query: executed.append(query))
    _write(on, *order(_ranged_second()))
    assert run_account(on.settings, on.name).ok
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 31 rows imported (4 new, 3 gone, 3 changed)"
    )
    larger = f"PRAGMA cache_size = -{SQLITE_COMPARE_CACHE_KIB}"
    assert (larger in executed) is scrambled
    raw = open_sis_db(on.settings.sis_db_url).engine.raw_connection()
    try:
        assert raw.driver_connection.execute("PRAGMA cache_size").fetchone()[0] == -2000
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("keys", "in_order"),
    [
        ([f"K{i:04d}" for i in range(1000)], True),
        ([f"K{i:04d}" for i in reversed(range(1000))], True),  # read backwards: as good
        ([f"K{(i * 7919) % 1000:04d}" for i in range(1000)], False),
        ([f"K{i:04d}" for i in range(500)] + [f"J{i:04d}" for i in range(500)], False),
        (["b", "a"], True),
        (["b", "a", "c"], False),
        (["Z", "a", "\u00e9"], True),  # bytewise: upper case, lower case, then accented
        (["only"], True),
        ([], True),
    ],
    ids=[
        "ascending",
        "descending",
        "scrambled",
        "two sorted halves",
        "two",
        "three",
        "bytewise",
        "one",
        "empty",
    ],
)
def test_sqlite_key_order_is_read_from_four_places(keys: list[str], in_order: bool) -> None:
    db = sqlite3.connect(":memory:")
    db.execute('CREATE TABLE t ("K" TEXT)')
    db.executemany("INSERT INTO t VALUES (?)", [(k,) for k in keys])
    assert _sqlite_in_key_order(db.cursor(), "t", '"K"') is in_order


def test_range_cuts_are_ascending_bytewise_and_distinct():
    """Cut values come out in the key's bytewise order (upper case before lower case before
    accented letters), each once; a histogram too short to split gives none."""
    bounds = ["b", "B", "é", "a", "A", "Z", "z", "a"]
    assert _range_cuts(bounds, 4) == ("Z", "a", "b")
    assert _range_cuts(["a", "b"], 6) == ()
    assert _range_cuts(["a", "b", "c", "d"], 1) == ()


def test_null_is_not_empty_and_a_single_column_counts(on):
    """A value NULL in the live table (the loader writes empty strings, never NULL: made by
    hand here) and empty in the file is changed; empty in both is not; one column differing
    makes the row changed."""
    _write(
        on,
        "A1\tAnn\t\tann@example.edu",
        "B2\tBob\tRay\tbob@example.edu",
        "C3\tCid\tPoe\tcid@example.edu",
        "D4\tDee\t\tdee@example.edu",
    )
    assert run_account(on.settings, on.name).ok
    with open_sis_db(on.settings.sis_db_url).engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE \"{table_name(on.spec)}\" SET email = NULL WHERE \"UUUID\" IN ('B2', 'C3')"
        )
    _write(
        on,
        "A1\tAnn\t\tann@example.edu",  # empty in both: the same
        "B2\tBob\tRay\t",  # NULL before, empty now: changed
        "C3\tCid\tPoe\tcid@example.edu",  # NULL before, a value now: changed
        "D4\tDee\tKim\tdee@example.edu",  # empty before, a value now: changed
    )
    assert run_account(on.settings, on.name).ok
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 4 rows imported (0 new, 0 gone, 3 changed)"
    )


def test_counts_in_the_history_command(on, ingestctl):
    _write(on, *FIRST)
    assert ingestctl("loader", "run", on.name).returncode == 0
    _write(on, *SECOND)
    done = ingestctl("loader", "run", on.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED sis_hr_user_info.txt 7 rows imported (3 new, 2 gone, 2 changed)" in done.stdout
    history = json.loads(ingestctl("loader", "history", on.name, "--json").stdout)
    assert [(h["added"], h["removed"], h["changed"]) for h in history] == [
        (None, None, None),
        (3, 2, 2),
    ]


def test_a_refused_load_records_no_counts(on):
    _write(on, *FIRST)
    assert run_account(on.settings, on.name).ok
    _write(on, *SECOND, "A1\tAnn\tLee\tdup@example.edu")  # duplicate key: refused
    assert not run_account(on.settings, on.name).ok
    last = _loads(on)[-1]
    assert last.status == REFUSED and (last.added, last.removed, last.changed) == (None,) * 3
    assert sorted(r[0] for r in _rows(on)) == ["A1", "B2", "C3", "D4", "E5", "x6"]


def test_existing_database_gets_the_history_columns(on):
    """A load history table made before the columns: opening the database adds them (the
    old rows have none), and the next load fills them."""
    _write(on, *FIRST)
    assert run_account(on.settings, on.name).ok
    url = on.settings.sis_db_url
    old = SisDB(url)
    loads = old.engine.dialect.identifier_preparer.format_table(old.tables.loads)
    with old.engine.begin() as conn:
        for column in ("added", "removed", "changed"):
            conn.exec_driver_sql(f"ALTER TABLE {loads} DROP COLUMN {column}")
    old.dispose()
    close_sis_dbs()

    reopened = SisDB(url)
    with reopened.engine.connect() as conn:
        table = reopened.tables.loads
        names = {c["name"] for c in inspect(conn).get_columns(table.name, schema=table.schema)}
    assert {"added", "removed", "changed"} <= names
    (load,) = reopened.loads(on.name)
    assert load.status == LOADED and (load.added, load.removed, load.changed) == (None,) * 3
    reopened.dispose()

    _write(on, *SECOND)
    assert run_account(on.settings, on.name).ok
    last = _loads(on)[-1]
    assert (last.added, last.removed, last.changed) == (3, 2, 2)


def test_removed_share_guard_refuses_then_force_loads(on, config_file, ingestctl):
    """``max_removed_share = 0.3``: removing 3 of 10 keys (30%, not more) loads; removing 4
    of the 7 then loaded (57%) is refused like the row-count guard; --force loads it."""
    config_file.write_text(config_file.read_text() + "\n[loader]\nmax_removed_share = 0.3\n")

    def cli(*args: str):
        return ingestctl("loader", "run", on.name, *args, subprocess_=True)

    _write(on, *_ids(10))
    assert cli().returncode == 0
    _write(on, *_ids(7))
    run = cli()
    assert run.returncode == 0, run.stdout + run.stderr
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 7 rows imported (0 new, 3 gone, 0 changed)"
    )

    _write(on, *_ids(3), *_ids(1, start=100))  # 4 of the 7 keys gone, 1 new
    refused = cli()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert on.data_file.exists() and len(_rows(on)) == 7
    line = _last_line(on)
    assert line.startswith("ERROR sis_hr_user_info.txt not loaded: the file would remove 4 of ")
    assert "4 of the 7 keys loaded on " in line and "more than 30%" in line
    assert "ask the operator to load it once with --force" in line
    assert "the SIS data stays as it was" in line
    last = _loads(on)[-1]
    assert last.status == REFUSED and "would remove 4 of the 7 keys" in last.message

    forced = cli("--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert not on.data_file.exists()
    assert sorted(r[0] for r in _rows(on)) == ["U0000000", "U0000001", "U0000002", "U0000100"]
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 4 rows imported (1 new, 4 gone, 0 changed; forced past "
        "the removed-keys guard by an operator)"
    )
    load = _loads(on)[-1]
    assert load.status == LOADED and (load.added, load.removed, load.changed) == (1, 4, 0)
    assert load.message.startswith(
        "forced past the removed-keys guard by an operator: 4 of the 7 keys loaded on "
    )
    audit = json.loads(ingestctl("audit", on.name, "--json").stdout)
    assert [e["detail"]["load_id"] for e in audit if e["action"] == "loader.force"] == [load.id]


def test_guard_is_off_by_default(on):
    _write(on, *_ids(10))
    assert run_account(on.settings, on.name).ok
    _write(on, *_ids(6, start=100))  # every key gone
    assert run_account(on.settings, on.name).ok
    assert _last_line(on) == (
        "LOADED sis_hr_user_info.txt 6 rows imported (6 new, 10 gone, 0 changed)"
    )
