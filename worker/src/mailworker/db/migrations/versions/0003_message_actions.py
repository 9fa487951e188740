"""claims of delete and spam moves on messages

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("action", sa.String(length=16), nullable=True))
    op.add_column("messages", sa.Column("action_state", sa.String(length=16), nullable=True))
    op.add_column("messages", sa.Column("action_task_id", sa.String(length=64), nullable=True))
    op.add_column(
        "messages", sa.Column("action_requested_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "messages", sa.Column("action_attempted_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("messages", sa.Column("action_error", sa.Text(), nullable=True))
    op.create_index(op.f("ix_messages_action_state"), "messages", ["action_state"], unique=False)


def downgrade() -> None:
    # A pending claim may already have moved its message on the server: its row would then say
    # `present` about a message that is gone.
    pending = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM messages WHERE action_state = 'pending'")
    )
    if pending:
        raise RuntimeError(
            f"{pending} delete or spam move(s) are pending: let them finish before downgrading"
        )
    op.drop_index(op.f("ix_messages_action_state"), table_name="messages")
    for column in (
        "action_error",
        "action_attempted_at",
        "action_requested_at",
        "action_task_id",
        "action_state",
        "action",
    ):
        op.drop_column("messages", column)
