"""The check for a text sent again (loop protection) searches by sender and the text's
digest: by sender and time alone, it read every mail of the sender's last 24 hours for
each new one, so an agent's day of mail cost the square of its size (1.8 ms a mail at
650 mails, more than the rest of the mail's reads together)

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


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_repeats")
        batch_op.create_index("ix_messages_sender_time", ["sender", "created_at"], unique=False)
