"""initial control schema

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from ingest_core.db import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(32), nullable=False, unique=True),
        sa.Column("institution", sa.String(200)),
        sa.Column("description", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("deferred_fetch", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "account_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer,
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("key_type", sa.String(64), nullable=False),
        sa.Column("bits", sa.Integer, nullable=False),
        sa.Column("fingerprint", sa.String(100), nullable=False, unique=True),
        sa.Column("comment", sa.String(500), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("added_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "account_ips",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer,
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("address", sa.String(64), nullable=False, index=True),
        sa.Column("added_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("account_id", "address"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", UTCDateTime, nullable=False, index=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("account", sa.String(32), index=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_table(
        "defender_bans",
        sa.Column("address", sa.String(64), primary_key=True),
        sa.Column("banned_at", UTCDateTime, nullable=False),
        sa.Column("banned_until", UTCDateTime, nullable=False, index=True),
        sa.Column("score", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_table(
        "file_specs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer,
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("encoding", sa.String(32), nullable=False),
        sa.Column("bom", sa.Boolean, nullable=False),
        sa.Column("delimiter", sa.String(4), nullable=False),
        sa.Column("terminator", sa.String(4), nullable=False),
        sa.Column("quoting", sa.String(16), nullable=False),
        sa.Column("columns", sa.Text, nullable=False),
        sa.Column("key_column", sa.String(128)),
        sa.Column("approved_at", UTCDateTime, nullable=False),
        sa.Column("approved_by", sa.String(100), nullable=False),
        sa.UniqueConstraint("account_id", "file_name"),
    )
    op.create_table(
        "job_runs",
        sa.Column("job", sa.String(100), primary_key=True),
        sa.Column("last_local_date", sa.String(10), nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "job_runs",
        "file_specs",
        "defender_bans",
        "audit_events",
        "account_ips",
        "account_keys",
        "accounts",
    ):
        op.drop_table(table)
