"""Queue `periodic`: what beat schedules (celery_config.beat_schedule)."""

from __future__ import annotations

from mailworker.celery_app import app
from mailworker.services import outbox
from mailworker.services.periodic import active_accounts, cleanup
from mailworker.services.spam import queue_unclassified
from mailworker.tasks.base import MailTask
from mailworker.tasks.send import publish_send
from mailworker.tasks.spam import publish_classify
from mailworker.tasks.sync import sync_mailbox


@app.task(base=MailTask, bind=True, name="mailworker.tasks.periodic.sync_all_accounts")
def sync_all_accounts(self: MailTask) -> dict:
    """Queue one sync_mailbox per active account."""
    accounts = active_accounts(self.settings)
    for tenant_id, user_id, account_id in accounts:
        # A sync nobody ran before the next fan-out is superseded by that one.
        sync_mailbox.apply_async(
            args=[str(tenant_id), str(user_id), str(account_id)],
            expires=self.settings.sync_interval,
        )
    return {"queued": len(accounts)}


@app.task(base=MailTask, bind=True, name="mailworker.tasks.periodic.cleanup_stale_tasks")
def cleanup_stale_tasks(self: MailTask) -> dict:
    """Mark lost attempts and stuck sends, purge old attempts, give stray results an expiry."""
    return cleanup(self.settings)


@app.task(base=MailTask, bind=True, name="mailworker.tasks.periodic.resubmit_due_sends")
def resubmit_due_sends(self: MailTask) -> dict:
    """Give up on sends past their retry window, queue send_email again for due ones."""
    gave_up = outbox.give_up_expired(self.settings)
    return {"gave_up": gave_up, "resubmitted": outbox.resubmit_due(self.settings, publish_send)}


@app.task(base=MailTask, bind=True, name="mailworker.tasks.periodic.classify_unscored")
def classify_unscored(self: MailTask) -> dict:
    """Queue classify_spam for synced messages still unscored after MAILWORKER_CLASSIFY_GRACE."""
    return queue_unclassified(self.settings, publish_classify)
