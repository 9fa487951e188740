"""sent_messages.data_sent_at: whether an interrupted send's attempt reached the final "."

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sent_messages", sa.Column("data_sent_at", sa.DateTime(timezone=True), nullable=True)
    )
    # Rows left `sending` by the release before: their attempt may have written the final ".",
    # so they keep being treated as such (looked for in Sent, else unknown), never resent.
    op.execute("UPDATE sent_messages SET data_sent_at = updated_at WHERE status = 'sending'")


def downgrade() -> None:
    op.drop_column("sent_messages", "data_sent_at")
