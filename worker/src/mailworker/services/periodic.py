"""The periodic jobs: which accounts to sync, and cleaning up state nobody will finish."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import redis
from sqlalchemy import delete, func, or_, select, update

from mailworker.db.engine import session_scope
from mailworker.db.models import MailAccount, SentMessage, TaskAttempt, Tenant, User
from mailworker.redis_client import redis_from_url
from mailworker.services.message_actions import sweep_message_actions
from mailworker.settings import Settings

logger = logging.getLogger(__name__)

RESULT_KEY_PATTERN = "celery-task-meta-*"
SCAN_BATCH = 500


def active_accounts(settings: Settings) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]:
    """(tenant_id, user_id, account_id) of every account whose tenant, user and self are active."""
    with session_scope(settings) as session:
        rows = session.execute(
            select(MailAccount.tenant_id, MailAccount.user_id, MailAccount.id)
            .join(Tenant, Tenant.id == MailAccount.tenant_id)
            .join(User, (User.id == MailAccount.user_id) & (User.tenant_id == Tenant.id))
            .where(MailAccount.active, User.active, Tenant.active)
            .order_by(MailAccount.tenant_id, MailAccount.id)
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def cleanup(settings: Settings) -> dict[str, int]:
    """Mark stuck state and drop what expired. Safe to run at any time and more than once."""
    stale = timedelta(seconds=settings.stale_after)
    retention = timedelta(seconds=settings.task_history_retention)
    with session_scope(settings) as session:
        # Nothing runs longer than the hard limit and Redis redelivers within the visibility
        # timeout; an attempt still "started" after stale_after was lost with its worker.
        lost = session.execute(
            update(TaskAttempt)
            .where(TaskAttempt.state == "started")
            .where(TaskAttempt.started_at < func.now() - stale)
            .values(state="lost", finished_at=func.now(), error="worker lost; no result")
        ).rowcount
        # A send stuck in `sending` whose attempt is gone (and was not redelivered): before the
        # data's final "." nothing was delivered, so it is due again; after it, the outcome
        # cannot be known. SKIP LOCKED leaves alone a row an attempt is updating right now.
        stuck = select(SentMessage.id).where(
            SentMessage.status == "sending", SentMessage.updated_at < func.now() - stale
        )
        undelivered = (SentMessage.data_sent_at.is_(None), SentMessage.content.is_not(None))
        requeued = session.execute(
            update(SentMessage)
            .where(
                SentMessage.id.in_(
                    stuck.where(*undelivered).with_for_update(skip_locked=True).scalar_subquery()
                )
            )
            .values(
                status="deferred",
                next_attempt_at=func.now(),
                error="its attempt was lost before the message data went out; sent again",
            )
        ).rowcount
        unknown = session.execute(
            update(SentMessage)
            .where(SentMessage.id.in_(stuck.with_for_update(skip_locked=True).scalar_subquery()))
            .values(
                status="unknown",
                error="no attempt finished within MAILWORKER_STALE_AFTER; not resent",
            )
        ).rowcount
        purged = session.execute(
            delete(TaskAttempt)
            .where(TaskAttempt.state != "started")
            .where(
                or_(
                    TaskAttempt.finished_at < func.now() - retention,
                    TaskAttempt.started_at < func.now() - retention,
                )
            )
        ).rowcount
    results = _expire_results(settings)
    summary = {
        "attempts_marked_lost": lost,
        "sends_requeued": requeued,
        "sends_marked_unknown": unknown,
        "attempts_purged": purged,
        "results_given_expiry": results,
    }
    summary.update(sweep_message_actions(settings))
    logger.info("cleanup: %s", summary)
    return summary


def _expire_results(settings: Settings) -> int:
    """Results stored without a TTL (result_expires was off, or a crash mid-store) would stay
    forever; give them the configured expiry. Redis expires the rest by itself."""
    client = redis_from_url(settings.result_backend, settings)
    fixed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=RESULT_KEY_PATTERN, count=SCAN_BATCH):
        batch.append(key)
        if len(batch) >= SCAN_BATCH:
            fixed += _expire_batch(client, batch, settings.result_expires)
            batch = []
    if batch:
        fixed += _expire_batch(client, batch, settings.result_expires)
    return fixed


def _expire_batch(client: redis.Redis, keys: list[bytes], seconds: int) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    ttls = pipe.execute()
    without_ttl = [key for key, ttl in zip(keys, ttls, strict=True) if ttl == -1]
    for key in without_ttl:
        pipe.expire(key, seconds, nx=True)
    if without_ttl:
        pipe.execute()
    return len(without_ttl)
