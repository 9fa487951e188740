"""Queue `spam`: score synced messages, store the verdicts, move spam to Junk."""

from __future__ import annotations

import uuid
from typing import Any

from mailworker.celery_app import app
from mailworker.services.spam import classify
from mailworker.tasks.base import MailTask
from mailworker.tenancy import parse_message_ids, parse_uuid


@app.task(
    base=MailTask,
    bind=True,
    name="mailworker.tasks.spam.classify_spam",
    retry_window_setting="action_retry_window",
)
def classify_spam(self: MailTask, tenant_id: Any, user_id: Any, message_ids: Any) -> dict:
    """Classify the messages (row ids from the messages table) of the user's accounts."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    ids = parse_message_ids(message_ids)
    token = self.request.id or str(uuid.uuid4())
    return classify(self.settings, tenant, user, ids, token=token)


def publish_classify(
    tenant_id: uuid.UUID, user_id: uuid.UUID, message_ids: list[uuid.UUID]
) -> None:
    """Queue classify_spam for the user's messages; raises if the broker refuses (no retry: the
    classify sweep queues what a lost publish left unscored)."""
    classify_spam.apply_async(
        args=[str(tenant_id), str(user_id), [str(message_id) for message_id in message_ids]],
        retry=False,
    )
