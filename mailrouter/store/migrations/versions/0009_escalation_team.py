"""the escalation team: an owner and labels on every case, and the count of turns of the
round robin (so that daemons, restarts and reloads all continue one rotation): a row on
SQLite, a sequence on PostgreSQL (never locked: daemons side by side do not wait on it)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=320), nullable=True))
        batch_op.add_column(
            sa.Column(
                "labels",
                sa.JSON().with_variant(JSONB(), "postgresql"),
                nullable=False,
                server_default=sa.text("'[]'"),
            )
        )
        batch_op.create_index("ix_cases_owner", ["owner"], unique=False)
    rotations = op.create_table(
        "rotations",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("turns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.bulk_insert(rotations, [{"name": "escalation", "turns": 0}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE escalation_turns MINVALUE 0 START 0")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE escalation_turns")
    op.drop_table("rotations")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_owner")
        batch_op.drop_column("labels")
        batch_op.drop_column("owner")
