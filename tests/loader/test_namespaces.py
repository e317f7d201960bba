"""Client data and the service's own tables live in namespaces that cannot collide, and a
database made before the namespaces is upgraded when it is opened.

The service tables: the ``sis_ingest`` schema on PostgreSQL, the ``ingest_`` prefix on
SQLite. The data tables (``sis_<account>_<stem>``) stay where readers found them. Each test
runs on SQLite and on a real PostgreSQL, through real files, folders and the CLI.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sites import BACKENDS, Site, make_site
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
    text,
)

from ingest_core import folder_log
from ingest_core.db import UTCDateTime, make_engine, utcnow
from ingest_core.folders import account_folder
from ingest_core.settings import Settings
from loader.sis_db import SERVICE_SCHEMA, SisDB, open_sis_db, service_tables


@pytest.fixture(params=BACKENDS)
def site(request, settings: Settings, config_file: Path, ingestctl) -> Site:
    return make_site(request, settings, config_file, ingestctl)


def _service_rows(site: Site, table: str, where: str = "") -> list[tuple[object, ...]]:
    """Rows of a service table read by its documented name (not through SisDB)."""
    name = f"ingest_{table}" if site.is_sqlite else f"{SERVICE_SCHEMA}.{table}"
    with open_sis_db(site.settings.sis_db_url).engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {name} {where}")]


# -- client names that map onto the old service table names --------------------------------


def test_client_tables_named_like_service_tables_leave_the_service_tables_alone(
    site: Site, tmp_path: Path
) -> None:
    """Account ``pool`` + ``applicants.txt`` was ``sis_pool_applicants`` (every account's pool
    IDs) and account ``loads`` + ``_.txt`` was ``sis_loads`` (the load history)."""
    site.ctl("account", "create", "uni", "--deferred-fetch", check=True)
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"A1\r\nA2\r\n")
    site.ctl("pool", "import", "uni", str(ids), check=True)
    site.ctl("account", "create", "pool", check=True)
    site.ctl("account", "create", "loads", check=True)
    for account, sample, content, table in [
        ("pool", "applicants.txt", b"account\tuuuid\nuni\tSAMPLE\n", "sis_pool_applicants"),
        ("pool", "imports.txt", b"account\timported\tcount\nuni\tx\t0\n", "sis_pool_imports"),
        ("loads", "_.txt", b"id\tstage\n1\tsample\n", "sis_loads"),
    ]:
        path = tmp_path / sample
        path.write_bytes(content)
        approved = site.ctl("spec", "approve", account, str(path), check=True)
        assert approved.stdout.splitlines()[-1] == f"loads into table {table}"
    applicants = site.upload("pool", "applicants.txt", b"account\tuuuid\nuni\tINJECTED\n")
    imports = site.upload("pool", "imports.txt", b"account\timported\tcount\nuni\tnever\t9\n")
    history = site.upload("loads", "_.txt", b"id\tstage\n1\tloaded\n2\trunning\n")

    run = site.ctl("loader", "run", "pool", "loads")

    assert run.returncode == 0, run.stdout + run.stderr
    assert not applicants.exists() and not imports.exists() and not history.exists()
    pool_log = folder_log.read_lines(account_folder(site.settings, "pool"))
    assert [line.split(" ", 1)[1] for line in pool_log] == [
        "LOADED applicants.txt 1 rows imported",
        "LOADED imports.txt 1 rows imported",
    ]
    loads_log = folder_log.read_lines(account_folder(site.settings, "loads"))
    assert loads_log[-1].split(" ", 1)[1] == "LOADED _.txt 2 rows imported"
    # The clients' data is where readers look for it, under the names they expect...
    db = open_sis_db(site.settings.sis_db_url)
    assert db.table_rows("sis_pool_applicants") == [("uni", "INJECTED")]
    assert db.table_rows("sis_pool_imports") == [("uni", "never", "9")]
    assert db.table_rows("sis_loads") == [("1", "loaded"), ("2", "running")]
    # ...and the service's own tables, in their namespace, are untouched.
    assert sorted(_service_rows(site, "pool_applicants")) == [("uni", "A1", 0), ("uni", "A2", 1)]
    assert [r[0] for r in _service_rows(site, "pool_imports")] == ["uni"]
    assert [(r.status, r.rows) for r in db.loads("loads")] == [("loaded", 2)]
    assert [(r.status, r.rows) for r in db.loads("pool")] == [("loaded", 1), ("loaded", 1)]
    where = "ingest_pool_applicants" if site.is_sqlite else "sis_ingest.pool_applicants"
    assert db.service_table_name("pool_applicants") == where
    published = site.ctl("pool", "publish", "uni")
    assert published.returncode == 0, published.stdout + published.stderr
    assert account_folder(site.settings, "uni").pool_file.read_bytes() == b"A1\r\nA2\r\n"


def test_approval_refuses_a_table_that_exists_with_someone_elses_data(
    site: Site, tmp_path: Path
) -> None:
    """``a-b`` + ``c.txt`` and ``a_b`` + ``c.txt`` both map to ``sis_a_b_c``; once the first
    spec is removed, its table and data stay, and must not go to the other account."""
    sample = tmp_path / "c.txt"
    sample.write_bytes(b"person_id\tname\nP1\tAda\n")
    for account in ("a-b", "a_b", "inst"):
        site.ctl("account", "create", account, check=True)
    site.ctl("spec", "approve", "a-b", str(sample), "--key", "person_id", check=True)
    site.upload("a-b", "c.txt", b"person_id\tname\nP1\tAda\nP2\tBob\n")
    assert site.ctl("loader", "run", "a-b").returncode == 0
    site.ctl("spec", "remove", "a-b", "c.txt", check=True)

    taken = site.ctl("spec", "approve", "a_b", str(sample))

    assert taken.returncode == 1
    assert taken.stderr.splitlines() == [
        "ingestctl: c.txt would load into table sis_a_b_c, which already exists in the SIS "
        "database and holds data loaded for a-b; approve it under another name (--as)"
    ]
    db = open_sis_db(site.settings.sis_db_url)
    assert db.table_rows("sis_a_b_c") == [("P1", "Ada"), ("P2", "Bob")]
    assert site.ctl("spec", "show", "a_b", "--json", check=True).stdout.strip() == "[]"
    # An application's own table with a loader-like name is not handed to a client either.
    with db.engine.begin() as conn:
        conn.exec_driver_sql('CREATE TABLE sis_inst_people ("x" TEXT)')
    people = tmp_path / "people.txt"
    people.write_bytes(b"person_id\nP1\n")
    own = site.ctl("spec", "approve", "inst", str(people))
    assert own.returncode == 1
    assert "already exists in the SIS database and was not made by the loader" in own.stderr
    # The account that filled the table may approve a new format for it.
    again = site.ctl("spec", "approve", "a-b", str(sample), "--as", "c.csv")
    assert again.returncode == 0, again.stderr


# -- an existing database of the previous version --------------------------------------------


def _legacy_metadata() -> MetaData:
    """The service tables exactly as the version before the namespaces declared them."""
    metadata = MetaData()
    Table(
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
    Table(
        "sis_pool_applicants",
        metadata,
        Column("account", String(32), primary_key=True),
        Column("uuuid", String(255), primary_key=True),
    )
    Table(
        "sis_pool_imports",
        metadata,
        Column("account", String(32), primary_key=True),
        Column("imported", UTCDateTime, nullable=False),
        Column("count", Integer, nullable=False),
    )
    return metadata


DATA_TABLE = "sis_acme_sis_hr_user_info"
DATA_COLUMNS = ("UUUID", "first_name", "last_name", "email")


def _make_legacy_database(url: str, client_took_pool_table: bool = False) -> None:
    """A SIS database as the previous version left it: its service tables beside a data
    table loaded for ``acme`` (and, if asked, ``sis_pool_applicants`` replaced by account
    ``pool``'s data, the collision the namespaces end)."""
    engine = make_engine(url)  # as the previous version made it (WAL, a private file)
    metadata = _legacy_metadata()
    if client_took_pool_table:
        metadata.remove(metadata.tables["sis_pool_applicants"])
    metadata.create_all(engine)
    now = utcnow()
    loaded = {"started": now, "finished": now, "status": "loaded", "message": ""}
    with engine.begin() as conn:
        conn.execute(
            insert(metadata.tables["sis_loads"]),
            [
                {"account": "acme", "spec_file": "sis_hr_user_info.txt", "rows": 3}
                | {"table_name": DATA_TABLE, "file_name": "sis_hr_user_info.txt"}
                | loaded,
            ],
        )
        columns = ", ".join(f'"{c}" TEXT' for c in DATA_COLUMNS)
        conn.exec_driver_sql(f"CREATE TABLE {DATA_TABLE} ({columns})")
        conn.exec_driver_sql(f'CREATE UNIQUE INDEX {DATA_TABLE}__key ON {DATA_TABLE} ("UUUID")')
        for i in range(3):
            conn.execute(
                text(f"INSERT INTO {DATA_TABLE} VALUES (:a, :b, :c, :d)"),
                {"a": f"U{i:07d}", "b": f"First{i}", "c": f"Last{i}", "d": f"u{i}@example.edu"},
            )
        if client_took_pool_table:
            conn.exec_driver_sql('CREATE TABLE sis_pool_applicants ("account" TEXT, "uuuid" TEXT)')
            conn.exec_driver_sql("INSERT INTO sis_pool_applicants VALUES ('uni', 'INJECTED')")
        else:
            conn.execute(
                insert(metadata.tables["sis_pool_applicants"]),
                [{"account": "uni", "uuuid": "A1"}, {"account": "uni", "uuuid": "A2"}],
            )
        conn.execute(
            insert(metadata.tables["sis_pool_imports"]),
            [{"account": "uni", "imported": now, "count": 2}],
        )
    engine.dispose()


def _schema_objects(url: str) -> set[tuple[str, str]]:
    """Every table, index and sequence of the database, as (kind, qualified name)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                query = "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%'"
            else:
                query = (
                    "SELECT c.relkind::text, n.nspname || '.' || c.relname FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname IN ('public', 'sis_ingest') AND c.relkind IN ('r','i','S')"
                )
            return {(str(kind), str(name)) for kind, name in conn.exec_driver_sql(query)}
    finally:
        engine.dispose()


def _pool_columns(url: str) -> list[dict[str, object]]:
    """The pool applicants table's columns as the database reports them (type, NULL, default)
    and its primary key, in their order."""
    table = service_tables(url.startswith("sqlite")).pool_applicants
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            columns = inspector.get_columns(table.name, schema=table.schema)
            key = inspector.get_pk_constraint(table.name, schema=table.schema)
    finally:
        engine.dispose()
    described = [
        {"name": c["name"], "type": str(c["type"]), "nullable": c["nullable"]}
        | {"default": c["default"]}
        for c in columns
    ]
    return [*described, {"primary key": key["constrained_columns"]}]


def _make_database_without_position(url: str) -> None:
    """A SIS database as the version just before ``position`` left it: the service tables
    already in their namespace, ``pool_applicants`` with only ``account`` and ``uuuid``, and
    a list imported for ``uni`` (in the file's order B2, A1, C3; that version kept no order)."""
    is_sqlite = url.startswith("sqlite")
    tables = service_tables(is_sqlite)
    metadata = tables.metadata
    metadata.remove(tables.pool_applicants)
    applicants = Table(
        tables.pool_applicants.name,
        metadata,
        Column("account", String(32), primary_key=True),
        Column("uuuid", String(255), primary_key=True),
    )
    engine = make_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        if not is_sqlite:
            conn.exec_driver_sql(f"CREATE SCHEMA {SERVICE_SCHEMA}")
        metadata.create_all(conn)
        conn.execute(
            insert(applicants),
            [{"account": "uni", "uuuid": v} for v in ("B2", "A1", "C3")]
            + [{"account": "other", "uuuid": "Q1"}],
        )
        conn.execute(
            insert(tables.pool_imports),
            [{"account": a, "imported": now, "count": n} for a, n in (("uni", 3), ("other", 1))],
        )
        conn.execute(
            insert(tables.loads),
            [
                {"account": "acme", "spec_file": "sis_hr_user_info.txt", "rows": 3}
                | {"table_name": DATA_TABLE, "file_name": "sis_hr_user_info.txt"}
                | {"started": now, "finished": now, "status": "loaded", "message": ""}
            ],
        )
    engine.dispose()


@pytest.fixture
def fresh_url(site: Site, tmp_path: Path) -> Iterator[str]:
    """Another empty SIS database on the site's backend (to compare an upgrade with)."""
    if site.is_sqlite:
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    name = f"t_{uuid.uuid4().hex[:12]}"
    subprocess.run(["createdb", name], check=True, capture_output=True)
    yield site.settings.sis_db_url.rsplit("/", 1)[0] + "/" + name
    subprocess.run(["dropdb", "--if-exists", "--force", name], capture_output=True)


def test_a_database_of_the_previous_version_is_upgraded_when_opened(
    site: Site, fresh_url: str, onboard, kit
) -> None:
    url = site.settings.sis_db_url
    _make_legacy_database(url)

    db = open_sis_db(url)

    # Nothing lost: history, the pool lists, the data table where readers read it.
    assert [(r.account, r.status, r.rows) for r in db.loads()] == [("acme", "loaded", 3)]
    assert db.applicants("uni") == ["A1", "A2"] and db.applicants_imported("uni") is not None
    assert [r[0] for r in db.table_rows(DATA_TABLE)] == ["U0000000", "U0000001", "U0000002"]
    # The old names are gone from the data namespace; the database now looks exactly like
    # one made by this version (tables, primary keys, indexes, the id sequence).
    fresh = SisDB(fresh_url)
    fresh.dispose()
    upgraded = _schema_objects(url)
    assert not any(name.rsplit(".", 1)[-1].startswith("sis_loads") for _, name in upgraded)
    assert not any("sis_pool" in name for _, name in upgraded)
    table, index, where = ("table", "index", "") if site.is_sqlite else ("r", "i", "public.")
    assert _schema_objects(fresh_url) <= upgraded
    assert upgraded - _schema_objects(fresh_url) == {
        (table, where + DATA_TABLE),
        (index, where + DATA_TABLE + "__key"),
    }
    # The moved pool table got the import order's column, declared as a fresh one declares it.
    assert _pool_columns(url) == _pool_columns(fresh_url)
    assert [c.get("name") for c in _pool_columns(url)][:3] == ["account", "uuuid", "position"]
    # Opening it again (another process, a restart) changes nothing.
    SisDB(url).dispose()
    assert _schema_objects(url) == upgraded
    assert _pool_columns(url) == _pool_columns(fresh_url)
    # A new import keeps its order.
    db.replace_applicants("uni", ["A2", "A1", "A3"])
    assert db.applicants("uni") == ["A2", "A1", "A3"]
    # The loader goes on where it was: the same account re-approves, loads, and the history
    # continues after the old rows.
    acme = onboard(site.settings)
    kit.write_data(acme.data_file, 5, start=10)
    run = site.ctl("loader", "run", "acme")
    assert run.returncode == 0, run.stdout + run.stderr
    assert not acme.data_file.exists()
    assert folder_log.read_lines(acme.folder)[-1].split(" ", 1)[1] == (
        "LOADED sis_hr_user_info.txt 5 rows imported (5 new, 3 gone, 0 changed)"
    )
    assert [r[0] for r in db.table_rows(DATA_TABLE)] == [f"U{i:07d}" for i in range(10, 15)]
    assert [(r.id, r.status, r.rows) for r in db.loads("acme")] == [
        (1, "loaded", 3),
        (2, "loaded", 5),
    ]


@pytest.mark.parametrize("made_by", ["before the namespaces", "before position"])
def test_two_processes_opening_an_old_database_at_once_both_succeed(
    site: Site, made_by: str
) -> None:
    url = site.settings.sis_db_url
    if made_by == "before the namespaces":
        _make_legacy_database(url)
        expected = ["A1", "A2"]
    else:
        _make_database_without_position(url)
        expected = ["A1", "B2", "C3"]
    start = threading.Barrier(3)
    opened: list[SisDB] = []
    failed: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(SisDB(url))
        except BaseException as exc:  # reported below
            failed.append(exc)

    openers = [threading.Thread(target=open_it) for _ in range(3)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(timeout=60)
    assert not failed, failed
    assert len(opened) == 3
    for db in opened:
        assert db.applicants("uni") == expected
        assert [r.rows for r in db.loads("acme")] == [3]
        db.dispose()
    assert [c.get("name") for c in _pool_columns(url)] == [
        "account",
        "uuuid",
        "position",
        None,  # the primary key
    ]


def test_a_database_of_the_version_before_position_is_upgraded_when_opened(
    site: Site, fresh_url: str, tmp_path: Path
) -> None:
    """The service tables already in their namespace, the pool table without ``position``:
    the first process to open it (here ``ingestctl``) adds the column; the lists imported
    before keep the order they were published in (position 0 for all, then the ID); the
    next import is published in its own order."""
    url = site.settings.sis_db_url
    _make_database_without_position(url)
    site.ctl("account", "create", "uni", "--deferred-fetch", check=True)

    published = site.ctl("pool", "publish", "uni")

    assert published.returncode == 0, published.stdout + published.stderr
    pool_file = account_folder(site.settings, "uni").pool_file
    assert pool_file.read_bytes() == b"A1\r\nB2\r\nC3\r\n"
    fresh = SisDB(fresh_url)
    fresh.dispose()
    assert _pool_columns(url) == _pool_columns(fresh_url)
    assert _schema_objects(url) == _schema_objects(fresh_url)
    assert sorted(_service_rows(site, "pool_applicants")) == [
        ("other", "Q1", 0),
        ("uni", "A1", 0),
        ("uni", "B2", 0),
        ("uni", "C3", 0),
    ]
    # Opening it again changes nothing; the history and the other list are all there.
    db = SisDB(url)
    assert _pool_columns(url) == _pool_columns(fresh_url)
    assert db.applicants("other") == ["Q1"] and [r.rows for r in db.loads("acme")] == [3]
    db.dispose()
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"Z9\r\nA1\r\nM5\r\n")
    site.ctl("pool", "import", "uni", str(ids), check=True)
    site.ctl("pool", "publish", "uni", check=True)
    assert pool_file.read_bytes() == b"Z9\r\nA1\r\nM5\r\n"
    assert sorted(_service_rows(site, "pool_applicants", "WHERE account = 'uni'")) == [
        ("uni", "A1", 1),
        ("uni", "M5", 2),
        ("uni", "Z9", 0),
    ]


def test_a_client_table_that_had_replaced_a_service_table_stays_client_data(
    site: Site,
) -> None:
    """The old collision happened: ``sis_pool_applicants`` is account ``pool``'s data (TEXT
    columns, no primary key). It stays data; the pool list starts empty and publishing
    refuses until the operator imports the list again (never the client's IDs)."""
    url = site.settings.sis_db_url
    _make_legacy_database(url, client_took_pool_table=True)
    site.ctl("account", "create", "uni", "--deferred-fetch", check=True)

    db = open_sis_db(url)

    assert db.table_rows("sis_pool_applicants") == [("uni", "INJECTED")]
    assert db.applicants("uni") == []
    published = site.ctl("pool", "publish", "uni")
    assert published.returncode == 1
    assert not account_folder(site.settings, "uni").pool_file.exists()
    assert "no applicant list has been imported" in published.stdout + published.stderr
    line = folder_log.read_lines(account_folder(site.settings, "uni"))[-1]
    assert " ERROR applicant_pool.txt " in line


def test_opening_a_set_up_sqlite_database_never_waits_for_a_load(settings: Settings) -> None:
    """Only a database that needs its namespaces set up takes the write lock at open: the
    usual open (every process, every CLI command) never waits behind a running load."""
    url = settings.sis_db_url
    SisDB(url).dispose()
    loading = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
    loading.execute("BEGIN IMMEDIATE")  # what a load holds for as long as its file takes
    opener = threading.Thread(target=lambda: SisDB(url).dispose(), daemon=True)
    try:
        opener.start()
        opener.join(timeout=5)
        waited = opener.is_alive()
    finally:
        loading.execute("ROLLBACK")
        loading.close()
        opener.join(timeout=30)
    assert not waited, "opening the database waited for the load's write lock"


@pytest.mark.postgres
def test_postgres_data_tables_never_follow_a_search_path_into_the_service_schema(
    settings: Settings, pg_url: str, onboard, kit
) -> None:
    """A role named ``sis_ingest`` has ``"$user"`` = sis_ingest first in its search_path
    once the schema exists; the data tables must still go to ``public``."""
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        conn.exec_driver_sql(f"ALTER DATABASE {database} SET search_path = sis_ingest, public")
    engine.dispose()
    acme = onboard(settings.replace(sis_db_url=pg_url))
    kit.write_data(acme.data_file, 4)
    from loader.nightly import run_account

    assert run_account(acme.settings, acme.name).ok
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        public = set(inspect(conn).get_table_names(schema="public"))
        service = set(inspect(conn).get_table_names(schema=SERVICE_SCHEMA))
    engine.dispose()
    assert public == {DATA_TABLE}
    assert service == {"loads", "pool_applicants", "pool_imports"}
    assert not acme.data_file.exists()
