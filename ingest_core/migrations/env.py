"""Alembic environment: runs on the connection that :func:`ingest_core.db.upgrade_schema` opens."""

from alembic import context

from ingest_core.db import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached from the alembic CLI
    raise SystemExit("run migrations through ingest_core.db.upgrade_schema()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
