"""The outbox: a message to send is stored in PostgreSQL first; tasks carry only its id.

`submit_send` checks the message (mail/compose.py), refuses one above MAILWORKER_MAX_MESSAGE_SIZE,
stores it in `sent_messages` as `queued`, commits, and only then publishes `send_email` with ids.
So the mail content never travels through Redis or shows in Flower, and a lost publish (Redis
down or full) loses nothing: the row is the truth, and the sweeper (`resubmit_due`, every
MAILWORKER_SEND_SWEEP_INTERVAL from beat) publishes again what is due and unfinished.

One row per (account, Message-ID). Submitting the same Message-ID again with the same content
(compose.content_hash) is idempotent: it returns the stored row (a `failed` one is queued again);
with other content it is refused: the Message-ID belongs to another message.

A queued or deferred send is retried for MAILWORKER_SEND_RETRY_WINDOW from when it was queued;
then the sweeper (or the next attempt) marks it `failed` with "gave up after ...".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert

from mailworker.db.engine import session_scope
from mailworker.db.locks import advisory_lock, lock_key
from mailworker.db.models import SentMessage
from mailworker.errors import InvalidTaskArguments, PermanentError
from mailworker.mail.compose import build_message, content_hash
from mailworker.settings import PREFIX, Settings
from mailworker.tenancy import owned_account_row

logger = logging.getLogger(__name__)

PENDING = ("queued", "deferred")  # waiting for an attempt; what the sweeper looks at
SWEEP_BATCH = 500
MAX_RESUBMIT_DELAY = timedelta(hours=1)  # the longest a pending row waits between sweeps

Publish = Callable[[list[str]], object]


@dataclass(frozen=True)
class Submission:
    """What `submit_send` stored: the id a send_email task carries, and whether it queued it."""

    outbox_id: uuid.UUID
    message_id: str
    status: str
    queued: bool  # False: the same message was already stored (idempotent submit)
    published: bool = False

    def task_args(self, tenant_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID) -> list:
        return [str(tenant_id), str(user_id), str(account_id), str(self.outbox_id)]


def lock_of(account_id: uuid.UUID, message_id: str) -> int:
    """The advisory lock an attempt holds while it works on this send (services/send.py)."""
    return lock_key("send", account_id, message_id)


def retry_delay(settings: Settings) -> timedelta:
    """How long a queued or deferred row is left to its task before the sweeper publishes it
    again: the longest Celery retry countdown, so the sweeper rarely doubles a live retry."""
    return timedelta(seconds=settings.retry_backoff_max)


def first_resend_delay(settings: Settings) -> timedelta:
    """How long a stored send that no attempt has taken yet is left to its task before the
    sweeper publishes it again: twice the redelivery delay (visibility timeout + restore
    interval). A task held by a worker that died comes back within one; a task gone from Redis
    (a delivery in a killed worker's pending BRPOP, writes a Redis failover lost) is published
    again after two, not after RETRY_BACKOFF_MAX. A task still waiting in a long queue by then
    is queued twice: whichever attempt comes second finds the send taken or done (its advisory
    lock and status, services/send.py) and sends nothing."""
    return 2 * timedelta(seconds=settings.visibility_timeout + settings.broker_restore_interval)


def store(
    settings: Settings,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    account_id: uuid.UUID,
    spec: Mapping[str, Any],
) -> Submission:
    """Check `spec`, store it as `queued` (or find the same message stored before)."""
    with session_scope(settings) as session:
        account = owned_account_row(session.connection(), tenant_id, user_id, account_id)
        message = build_message(spec, sender=account.email)
        content = message.as_bytes()
        if len(content) > settings.max_message_size:
            raise InvalidTaskArguments(
                f"message is {len(content)} bytes, above {PREFIX}MAX_MESSAGE_SIZE "
                f"({settings.max_message_size} bytes)"
            )
        message_id = str(message["Message-ID"])
        digest = content_hash(message)
        recipients = [
            address.addr_spec
            for name in ("To", "Cc", "Bcc")
            for header in message.get_all(name, [])
            for address in header.addresses
        ]
        inserted = session.scalar(
            insert(SentMessage)
            .values(
                id=uuid.uuid4(),
                tenant_id=tenant_id,
                user_id=user_id,
                account_id=account_id,
                message_id=message_id,
                status="queued",
                content=content,
                content_hash=digest,
                size=len(content),
                recipients=list(dict.fromkeys(recipients)),
                subject=str(message.get("Subject", "")),
                attempts=0,
                copied_to_sent=False,
                queued_at=func.now(),
                next_attempt_at=func.now() + first_resend_delay(settings),
            )
            .on_conflict_do_nothing(constraint="uq_sent_messages_msgid")
            .returning(SentMessage.id)
        )
        row = session.scalar(
            select(SentMessage)
            .where(SentMessage.account_id == account_id, SentMessage.message_id == message_id)
            .with_for_update()
        )
        assert row is not None  # inserted or already there; rows are never deleted
        if row.content_hash is not None and row.content_hash != digest:
            raise InvalidTaskArguments(
                f"message_id {message_id} was already used for a different message "
                f"(stored as {row.status}); give this message a new Message-ID"
            )
        if row.status == "unknown":
            raise PermanentError(
                f"message_id {message_id} has an unknown send outcome (see {row.id}); it is not "
                "sent again: check with the recipients, then submit under a new Message-ID"
            )
        queued = inserted is not None
        # Resubmitted unchanged after a failure: the user asks to try again. A pending row from
        # before the outbox (no content) takes the message now, so the sweeper can send it.
        if row.status == "failed" or (row.status in PENDING and row.content is None):
            row.status = "queued"
            row.user_id = user_id
            row.content = content
            row.content_hash = digest
            row.size = len(content)
            row.error = None
            row.queued_at = func.now()
            row.next_attempt_at = func.now() + first_resend_delay(settings)
            queued = True
        return Submission(row.id, message_id, row.status, queued)


def submit_send(
    settings: Settings,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    account_id: uuid.UUID,
    spec: Mapping[str, Any],
    *,
    publish: Publish,
) -> Submission:
    """Store the message (committed), then `publish(task_args)`. A failed publish is logged,
    not raised: the row is due at once and the sweeper publishes it within a sweep interval."""
    submission = store(settings, tenant_id, user_id, account_id, spec)
    if not submission.queued:
        return submission
    try:
        publish(submission.task_args(tenant_id, user_id, account_id))
    except Exception as error:  # any broker trouble: the stored row is the truth
        logger.warning(
            "outbox %s stored, but publishing its task failed (%s); the sweeper resubmits it",
            submission.outbox_id,
            type(error).__name__,
        )
        _set_due_now(settings, submission.outbox_id)
        return submission
    return Submission(
        submission.outbox_id, submission.message_id, submission.status, True, published=True
    )


def give_up_expired(settings: Settings) -> int:
    """Mark `failed` the queued or deferred sends older than MAILWORKER_SEND_RETRY_WINDOW."""
    window = timedelta(seconds=settings.send_retry_window)
    with session_scope(settings) as session:
        rows = session.scalars(
            select(SentMessage)
            .where(SentMessage.status.in_(PENDING))
            .where(SentMessage.queued_at < func.now() - window)
            .with_for_update(skip_locked=True)
            .limit(SWEEP_BATCH)
        ).all()
        for row in rows:
            fail_expired(row, settings)
    if rows:
        logger.warning("gave up on %d send(s) past %sSEND_RETRY_WINDOW", len(rows), PREFIX)
    return len(rows)


def fail_expired(row: SentMessage, settings: Settings) -> None:
    last = f"; last error: {row.error}" if row.error else ""
    row.status = "failed"
    row.next_attempt_at = None
    row.error = (
        f"gave up after {settings.send_retry_window} s ({PREFIX}SEND_RETRY_WINDOW) and "
        f"{row.attempts} attempt(s){last}"
    )


def resubmit_due(settings: Settings, publish: Publish) -> int:
    """Publish send_email again for queued or deferred rows that are due and that no running
    attempt holds (its advisory lock); each is left alone for retry_delay() afterwards."""
    with session_scope(settings) as session:
        due = session.execute(
            select(
                SentMessage.id,
                SentMessage.tenant_id,
                SentMessage.user_id,
                SentMessage.account_id,
                SentMessage.message_id,
            )
            .where(SentMessage.status.in_(PENDING))
            .where(SentMessage.next_attempt_at <= func.now())
            .where(SentMessage.user_id.is_not(None), SentMessage.content.is_not(None))
            .order_by(SentMessage.next_attempt_at)
            .limit(SWEEP_BATCH)
        ).all()
    published = 0
    for outbox_id, tenant_id, user_id, account_id, message_id in due:
        if not _postpone(settings, outbox_id, lock_of(account_id, message_id)):
            continue
        try:
            publish([str(tenant_id), str(user_id), str(account_id), str(outbox_id)])
        except Exception:
            _set_due_now(settings, outbox_id)  # the broker is down: next sweep, again
            raise
        published += 1
    if published:
        logger.info("resubmitted %d due send(s)", published)
    return published


def _postpone(settings: Settings, outbox_id: uuid.UUID, lock: int) -> bool:
    """Push a due row back by retry_delay() unless an attempt holds it; whether to publish.
    The lock is released before publishing, so the new task never finds it taken."""
    with advisory_lock(settings, lock) as held:
        if not held:  # an attempt is working on it right now
            return False
        with session_scope(settings) as session:
            # Still due (another sweep may have just published it), and pushed back by the row's
            # age, from retry_delay() up to an hour: while no worker takes sends, each row adds
            # a task to Redis about once an hour, not every retry_delay().
            age = func.now() - SentMessage.queued_at
            delay = func.greatest(retry_delay(settings), func.least(age, MAX_RESUBMIT_DELAY))
            postponed = session.execute(
                update(SentMessage)
                .where(SentMessage.id == outbox_id)
                .where(SentMessage.status.in_(PENDING))
                .where(SentMessage.next_attempt_at <= func.now())
                .values(next_attempt_at=func.now() + delay)
            )
            return postponed.rowcount == 1


def _set_due_now(settings: Settings, outbox_id: uuid.UUID) -> None:
    with session_scope(settings) as session:
        row = session.get(SentMessage, outbox_id, with_for_update=True)
        if row is not None and row.status in PENDING:
            row.next_attempt_at = func.now()
