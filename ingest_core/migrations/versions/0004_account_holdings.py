"""several nodes: each node's sessions and quota reservations per account

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from ingest_core.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account_holdings",
        sa.Column("account", sa.String(32), primary_key=True),
        sa.Column("node_id", sa.String(64), primary_key=True),
        sa.Column("sessions", sa.Integer, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("account_holdings")
