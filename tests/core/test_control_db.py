"""The control DB schema comes from Alembic, from an empty database, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from ingest_core.db import MIGRATIONS_DIR, Base, open_control_db, upgrade_schema

TABLES = {
    "accounts",
    "account_keys",
    "account_ips",
    "audit_events",
    "defender_bans",
    "file_specs",
    "job_runs",
    "alembic_version",
}


def head_revision() -> str:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(cfg).get_current_head()


def assert_schema_is_head(url: str) -> None:
    db = open_control_db(url)
    assert set(inspect(db.engine).get_table_names()) >= TABLES
    with db.engine.connect() as conn:
        assert conn.scalar(text("select version_num from alembic_version")) == head_revision()
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == [], f"models and migrations disagree: {diffs}"


def test_sqlite_upgrade_from_empty(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'control.db'}"
    assert_schema_is_head(url)
    engine = create_engine(url)
    upgrade_schema(engine)  # a second upgrade is a no-op
    assert set(inspect(engine).get_table_names()) >= TABLES


@pytest.mark.postgres
def test_postgresql_upgrade_from_empty(pg_url: str) -> None:
    assert_schema_is_head(pg_url)
