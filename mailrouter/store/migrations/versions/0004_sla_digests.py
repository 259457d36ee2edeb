"""SLA reminders and digests: per-case reminder markers, one digest per recipient and period

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import mailrouter.store.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reminded_due", mailrouter.store.tables.UTCDateTime(), nullable=True)
        )
        batch_op.add_column(
            sa.Column("escalated_due", mailrouter.store.tables.UTCDateTime(), nullable=True)
        )
        batch_op.create_index("ix_cases_follow_up_due", ["follow_up_due"], unique=False)
    op.create_table(
        "digests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("period", sa.String(length=64), nullable=False),
        sa.Column("created_at", mailrouter.store.tables.UTCDateTime(), nullable=False),
        sa.Column("message_id", sa.String(length=998), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("digests", schema=None) as batch_op:
        batch_op.create_index("ix_digests_once", ["recipient", "period"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("digests", schema=None) as batch_op:
        batch_op.drop_index("ix_digests_once")
    op.drop_table("digests")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_follow_up_due")
        batch_op.drop_column("escalated_due")
        batch_op.drop_column("reminded_due")
