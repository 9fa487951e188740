"""The schema. Alembic migrations in db/migrations create it; nothing here touches a database.

Every row that belongs to a tenant carries `tenant_id`, so tenancy checks are one WHERE clause
and never read another tenant's rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints so Alembic migrations can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _id() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = _id()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()


class MailAccount(Base):
    """One mailbox: where its IMAP and SMTP servers are and its encrypted password."""

    __tablename__ = "mail_accounts"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    email: Mapped[str] = mapped_column(String(320))
    username: Mapped[str] = mapped_column(String(320))
    # Fernet token (MultiFernet over MAILWORKER_ENCRYPTION_KEYS); plaintext lives only in memory.
    password_encrypted: Mapped[str] = mapped_column(Text)
    imap_host: Mapped[str] = mapped_column(String(255))
    imap_port: Mapped[int] = mapped_column(Integer)
    imap_security: Mapped[str] = mapped_column(String(16))
    smtp_host: Mapped[str] = mapped_column(String(255))
    smtp_port: Mapped[int] = mapped_column(Integer)
    smtp_security: Mapped[str] = mapped_column(String(16))
    # Set only when the SMTP server wants other credentials than the mailbox (a relay login).
    smtp_username: Mapped[str | None] = mapped_column(String(320))
    smtp_password_encrypted: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = _created()


class FolderSyncState(Base):
    """The sync cursor of one folder: UIDs are only comparable while uidvalidity holds."""

    __tablename__ = "folder_sync_states"

    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("mail_accounts.id"), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Message(Base):
    """A message as synced from IMAP, plus what the worker learned and did about it."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("account_id", "folder", "uidvalidity", "uid", name="uq_messages_uid"),
        # The classify sweep's query (services/spam.py): only rows not scored yet, or spam
        # still in place, are indexed.
        Index(
            "ix_messages_unclassified",
            "synced_at",
            postgresql_where=text("state = 'present' AND (classified_at IS NULL OR is_spam)"),
        ),
    )

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("mail_accounts.id"), index=True)
    folder: Mapped[str] = mapped_column(String(255))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    sender: Mapped[str] = mapped_column(Text, default="")
    recipients: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    headers: Mapped[str] = mapped_column(Text, default="")
    body_text: Mapped[str] = mapped_column(Text, default="")
    # NULL for a message sync skipped as larger than MAILWORKER_MAX_MESSAGE_SIZE (state skipped).
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    flags: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    spam_score: Mapped[float | None] = mapped_column(Float)
    is_spam: Mapped[bool | None] = mapped_column(Boolean)
    spam_reasons: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    classified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the classify sweep last queued this row (NULL: only the sync's own publish did):
    # the sweep waits MAILWORKER_CLASSIFY_GRACE from here before it queues the row again.
    classify_queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # present | trashed (moved to Trash) | junk (moved to Junk) | expunged
    # | skipped (on the server, too large to sync: only uid, size and flags are stored)
    state: Mapped[str] = mapped_column(String(16), default="present")
    moved_to: Mapped[str | None] = mapped_column(String(255))
    state_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    synced_at: Mapped[datetime] = _created()
    # The claim of a delete or spam move (services/message_actions.py): taken before IMAP is
    # touched, so two actions never both act on one message. action: trash | expunge | junk;
    # action_state: pending (claimed, not finished) | failed (given up; see action_error) |
    # NULL (none pending). action_task_id is the task holding the claim.
    action: Mapped[str | None] = mapped_column(String(16))
    action_state: Mapped[str | None] = mapped_column(String(16), index=True)
    action_task_id: Mapped[str | None] = mapped_column(String(64))
    action_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    action_attempted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    action_error: Mapped[str | None] = mapped_column(Text)


class SentMessage(Base):
    """The outbox and send ledger: one row per (account, Message-ID), stored before any task.

    status: queued (stored, waiting for a worker) | sending (an attempt is in the SMTP
    exchange) | deferred (the server did not take it yet; retried until the retry window ends)
    | sent | failed | unknown (the exchange broke after the data went out; not resent, see
    services/send.py). `attempts` numbers the attempts: an attempt writes the row only while
    it is still the latest (a fencing token against a worker that froze and came back).
    """

    __tablename__ = "sent_messages"
    __table_args__ = (
        UniqueConstraint("account_id", "message_id", name="uq_sent_messages_msgid"),
        # The sweeper's query: queued or deferred rows that are due.
        Index(
            "ix_sent_messages_due",
            "next_attempt_at",
            postgresql_where=text("status IN ('queued', 'deferred')"),
        ),
    )

    id: Mapped[uuid.UUID] = _id()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), index=True)
    # Rows from before the outbox (migration 0002) have no user and no content.
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("mail_accounts.id"), index=True)
    message_id: Mapped[str] = mapped_column(String(998))
    status: Mapped[str] = mapped_column(String(16))
    # The message as it will be sent (Bcc included; stripped on the wire); dropped once sent.
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    # sha256 of the message's fields (mail/compose.py content_hash): same Message-ID, other
    # content is refused.
    content_hash: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    # The retry window runs from here; a failed send resubmitted unchanged starts a new one.
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the sweeper may publish this queued or deferred row again.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    recipients: Mapped[list[str]] = mapped_column(ARRAY(Text), default=list)
    subject: Mapped[str] = mapped_column(Text, default="")
    task_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Set by the attempt `attempts` just before it wrote the data's final "."; without it, a
    # `sending` row's attempt died with nothing delivered, and the message may be sent again.
    data_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    accepted: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    refused: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    copied_to_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TaskAttempt(Base):
    """One execution of a task (a retry or a redelivery is another row with the same task_id).

    A worker killed mid-task leaves a row in `started`; cleanup_stale_tasks marks it `lost`.
    """

    __tablename__ = "task_attempts"

    id: Mapped[uuid.UUID] = _id()
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    task_name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    redelivered: Mapped[bool] = mapped_column(Boolean, default=False)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    # started | succeeded | retrying | failed | rejected | superseded | lost
    state: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
