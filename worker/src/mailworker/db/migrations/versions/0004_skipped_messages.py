"""messages.raw may be NULL: sync records a message above MAILWORKER_MAX_MESSAGE_SIZE as skipped

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-30 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("messages", "raw", existing_type=sa.LargeBinary(), nullable=True)


def downgrade() -> None:
    # The old schema cannot hold a message without its body: forget the skipped ones.
    op.execute("DELETE FROM messages WHERE raw IS NULL")
    op.alter_column("messages", "raw", existing_type=sa.LargeBinary(), nullable=False)
