"""account contacts: the client institution's addresses for the account's alerts

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from ingest_core.db import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "account_contacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "account_id",
            sa.Integer,
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("added_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("account_id", "email"),
    )


def downgrade() -> None:
    op.drop_table("account_contacts")
