"""Case indexes that narrow a lookup: duplicates by (client_key, provider); no index on the
few-valued status and provider columns, which led SQLite to scan every open case for each
duplicate check and each reminder pass once there were many

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_status")
        batch_op.drop_index("ix_cases_provider")
        batch_op.drop_index("ix_cases_client_key")
        batch_op.create_index("ix_cases_duplicates", ["client_key", "provider"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_duplicates")
        batch_op.create_index("ix_cases_client_key", ["client_key"], unique=False)
        batch_op.create_index("ix_cases_provider", ["provider"], unique=False)
        batch_op.create_index("ix_cases_status", ["status"], unique=False)
