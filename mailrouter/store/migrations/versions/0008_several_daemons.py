"""several daemons on one database: IMAP claims (every daemon polls, one processes each
mail); the outbox index over the rows still to send only; on PostgreSQL, the types that
fit (timestamptz, jsonb, bigint IMAP numbers)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import mailrouter.store.tables

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_OPEN = sa.text("delivery IN ('pending', 'sending')")

# On PostgreSQL: what the earlier revisions created with generic types.
_TIMES = {
    "cases": ["created_at", "updated_at", "follow_up_due", "reminded_due", "escalated_due"],
    "messages": ["created_at", "claimed_until", "next_attempt_at", "sent_at"],
    "events": ["at"],
    "digests": ["created_at"],
    "address_log": ["at"],
}
_DOCUMENTS = {"cases": ["fields"], "messages": ["recipients"]}
_IMAP_NUMBERS = {
    "messages": ["imap_uidvalidity", "imap_uid"],
    "imap_state": ["uidvalidity", "last_uid"],
}


def _postgresql_types() -> None:
    for table, columns in _TIMES.items():
        for column in columns:
            op.execute(
                f"ALTER TABLE {table} ALTER COLUMN {column} TYPE timestamptz "
                f"USING {column} AT TIME ZONE 'UTC'"
            )
    for table, columns in _DOCUMENTS.items():
        for column in columns:
            op.execute(
                f"ALTER TABLE {table} ALTER COLUMN {column} TYPE jsonb USING {column}::jsonb"
            )
    for table, columns in _IMAP_NUMBERS.items():
        for column in columns:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE bigint")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_types()
    op.create_table(
        "imap_claims",
        sa.Column("mailbox", sa.String(length=512), nullable=False),
        sa.Column("uidvalidity", mailrouter.store.tables.ImapNumber, nullable=False),
        sa.Column("uid", mailrouter.store.tables.ImapNumber, nullable=False),
        sa.Column("claimed_by", sa.String(length=256), nullable=False),
        sa.Column("claimed_until", mailrouter.store.tables.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("mailbox", "uidvalidity", "uid"),
    )
    op.drop_index("ix_messages_outbox", table_name="messages")
    op.create_index(
        "ix_messages_outbox",
        "messages",
        ["delivery", "next_attempt_at"],
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_messages_outbox", table_name="messages")
    op.create_index("ix_messages_outbox", "messages", ["delivery", "next_attempt_at"])
    op.drop_table("imap_claims")
