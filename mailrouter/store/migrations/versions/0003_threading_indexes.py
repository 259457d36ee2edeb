"""threading: normalised client for duplicate detection; indexes for tickets and rate limits

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import re
import unicodedata

import sqlalchemy as sa
from alembic import op


def normalize(text: str) -> str:
    """A frozen copy of `core.parse.normalize` as it was at this revision: a migration must
    compute the keys it wrote then, whatever the live code becomes."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+", " ", stripped).split())


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("client_key", sa.String(length=320), nullable=False, server_default="")
        )
        batch_op.create_index("ix_cases_client_key", ["client_key"], unique=False)
        batch_op.create_index("ix_cases_vendor_ticket", ["vendor_ticket"], unique=False)
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_sender_time", ["sender", "created_at"], unique=False)
    # Cases opened before this revision get their key too, so they are found as duplicates.
    bind = op.get_bind()
    for case_id, client in bind.execute(sa.text("SELECT id, client FROM cases")).all():
        bind.execute(
            sa.text("UPDATE cases SET client_key = :key WHERE id = :id"),
            {"key": normalize(client or ""), "id": case_id},
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_sender_time")
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_vendor_ticket")
        batch_op.drop_index("ix_cases_client_key")
        batch_op.drop_column("client_key")
