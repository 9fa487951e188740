"""messages.raw may be NULL: sync records a message above MAILWORKER_MAX_MESSAGE_SIZE as skipped;
messages.size is a bigint (a server may report a message above 2 GiB)

Revision ID: 0004
Revises: 0003
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
    op.alter_column("messages", "size", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    # The old schema cannot hold a message without its body: forget the skipped ones, and move
    # their folders' cursors back before them, so the old release syncs them again.
    op.execute(
        """
        UPDATE folder_sync_states AS state
        SET last_uid = LEAST(state.last_uid, skipped.first_uid - 1)
        FROM (
            SELECT account_id, folder, uidvalidity, min(uid) AS first_uid
            FROM messages WHERE raw IS NULL GROUP BY account_id, folder, uidvalidity
        ) AS skipped
        WHERE state.account_id = skipped.account_id AND state.folder = skipped.folder
          AND state.uidvalidity = skipped.uidvalidity
        """
    )
    op.execute("DELETE FROM messages WHERE raw IS NULL")
    op.alter_column("messages", "size", existing_type=sa.BigInteger(), type_=sa.Integer())
    op.alter_column("messages", "raw", existing_type=sa.LargeBinary(), nullable=False)
