"""Lookups that read a growing history, made to search on all their equalities: the check
for a text sent again (loop protection) by sender and the text's digest (by sender and
time alone, it read every mail of the sender's last 24 hours for each new one, so an
agent's day of mail cost the square of its size: 1.8 ms a mail at 650 mails, more than
the rest of the mail's reads together); the duplicate check, a client's cases in progress
at a destination, by status too (it read every case the client ever had there);
`least_open`'s count of each member's cases in progress by owner and status (by owner
alone, it read every case the member ever had)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_sender_time")
        batch_op.create_index(
            "ix_messages_repeats", ["sender", "content_digest", "created_at"], unique=False
        )
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_owner")
        batch_op.create_index("ix_cases_owner_status", ["owner", "status"], unique=False)
        batch_op.drop_index("ix_cases_duplicates")
        batch_op.create_index(
            "ix_cases_duplicates", ["client_key", "provider", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("cases", schema=None) as batch_op:
        batch_op.drop_index("ix_cases_duplicates")
        batch_op.create_index("ix_cases_duplicates", ["client_key", "provider"], unique=False)
        batch_op.drop_index("ix_cases_owner_status")
        batch_op.create_index("ix_cases_owner", ["owner"], unique=False)
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_repeats")
        batch_op.create_index("ix_messages_sender_time", ["sender", "created_at"], unique=False)
