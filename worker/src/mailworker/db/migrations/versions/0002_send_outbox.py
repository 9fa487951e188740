"""send outbox: sent_messages stores the message, its content hash and when to retry it

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sent_messages", sa.Column("user_id", sa.Uuid(), nullable=True))
    op.add_column("sent_messages", sa.Column("content", sa.LargeBinary(), nullable=True))
    op.add_column("sent_messages", sa.Column("content_hash", sa.String(length=64), nullable=True))
    op.add_column("sent_messages", sa.Column("size", sa.Integer(), nullable=True))
    op.add_column(
        "sent_messages", sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "sent_messages", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True)
    )
    # Rows written before the outbox: their retry window counts from when they were made, so the
    # pending ones nothing can resend (no stored content) end as `failed`, visibly.
    op.execute("UPDATE sent_messages SET queued_at = created_at WHERE queued_at IS NULL")
    op.create_foreign_key(
        op.f("fk_sent_messages_user_id_users"), "sent_messages", "users", ["user_id"], ["id"]
    )
    # The sweeper's query: queued or deferred rows that are due.
    op.create_index(
        "ix_sent_messages_due",
        "sent_messages",
        ["next_attempt_at"],
        postgresql_where=sa.text("status IN ('queued', 'deferred')"),
    )


def downgrade() -> None:
    # The old schema keeps no message content: a send still waiting for its attempt would be lost.
    waiting = op.get_bind().scalar(
        sa.text("SELECT count(*) FROM sent_messages WHERE status IN ('queued', 'deferred')")
    )
    if waiting:
        raise RuntimeError(
            f"{waiting} send(s) are queued or deferred: the schema before 0002 cannot hold their "
            "content; let them finish (or fail) before downgrading"
        )
    op.drop_index("ix_sent_messages_due", table_name="sent_messages")
    op.drop_constraint(op.f("fk_sent_messages_user_id_users"), "sent_messages", type_="foreignkey")
    for column in ("next_attempt_at", "queued_at", "size", "content_hash", "content", "user_id"):
        op.drop_column("sent_messages", column)
