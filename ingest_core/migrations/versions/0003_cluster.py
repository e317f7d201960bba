"""several nodes: job claims, the activity journal, shared defender scores, node liveness

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from ingest_core.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "job_claims",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job", sa.String(16), nullable=False),
        sa.Column("account", sa.String(32), nullable=False, index=True),
        sa.Column("run_key", sa.String(64), nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("claimed_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("outcome", sa.String(32)),
        sa.UniqueConstraint("job", "account", "run_key"),
    )
    op.create_table(
        "journal_events",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False, index=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("account", sa.String(32), index=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("address", sa.String(64)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("checked_at", UTCDateTime),
        sa.Column("checked_by", sa.String(64)),
    )
    # The pre-check's queue: received files not yet checked.
    op.create_index("ix_journal_events_unchecked", "journal_events", ["kind", "checked_at"])
    op.create_table(
        "defender_failures",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("address", sa.String(64), nullable=False, index=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("points", sa.Integer, nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
    )
    op.create_table(
        "cluster_nodes",
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("seen_at", UTCDateTime, nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cluster_nodes")
    op.drop_table("defender_failures")
    op.drop_index("ix_journal_events_unchecked", "journal_events")
    op.drop_table("journal_events")
    op.drop_table("job_claims")
