"""messages.classify_queued_at and the index of unscored messages and unmoved spam, for the
classify sweep

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 04:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages", sa.Column("classify_queued_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(
        "ix_messages_unclassified",
        "messages",
        ["synced_at"],
        unique=False,
        postgresql_where=sa.text("state = 'present' AND (classified_at IS NULL OR is_spam)"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_messages_unclassified",
        table_name="messages",
        postgresql_where=sa.text("state = 'present' AND (classified_at IS NULL OR is_spam)"),
    )
    op.drop_column("messages", "classify_queued_at")
