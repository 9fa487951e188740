"""Queue `send`: send one stored message over SMTP, at most once per Message-ID.

The message itself is in the outbox (services/outbox.py): a client submits it with
`submit_send` (or `mailworker task send-email`), which stores it and then publishes this task
with ids only, so no address, subject or body travels through Redis or shows in Flower.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from celery.result import denied_join_result
from celery.signals import worker_process_shutdown, worker_shutdown

from mailworker.celery_app import app
from mailworker.services import outbox
from mailworker.services.access import owned_access
from mailworker.services.send import close_kept_connections, send
from mailworker.settings import Settings
from mailworker.tasks.base import MailTask
from mailworker.tenancy import parse_uuid


@worker_process_shutdown.connect  # a prefork pool process ends
@worker_shutdown.connect  # the worker ends (a threads pool's sends ran in this process)
def _close_kept_smtp_connections(**_: Any) -> None:
    """Say QUIT to the SMTP connections kept between sends (best effort)."""
    close_kept_connections()


@app.task(
    base=MailTask,
    bind=True,
    name="mailworker.tasks.send.send_email",
    retry_window_setting="send_retry_window",
)
def send_email(
    self: MailTask, tenant_id: Any, user_id: Any, account_id: Any, outbox_id: Any
) -> dict:
    """Send the outbox entry `outbox_id` of this account; returns ids and counts only."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    account = parse_uuid("account_id", account_id)
    if isinstance(outbox_id, Mapping):
        return _send_queued_before_the_outbox(self, tenant, user, account, outbox_id)
    entry = parse_uuid("outbox_id", outbox_id)
    access = owned_access(self.settings, tenant, user, account)
    return send(self.settings, access, entry, self.request.id)


def _send_queued_before_the_outbox(
    task: MailTask, tenant: uuid.UUID, user: uuid.UUID, account: uuid.UUID, message: Mapping
) -> dict:
    """A send_email queued by a release before the outbox carries the message itself: store it
    under the Message-ID that release gave it (<task-id@sender-domain> when the caller named
    none, the same on every redelivery), then send it like any other. So an upgrade while sends
    wait in Redis or in their retries loses none."""
    access = owned_access(task.settings, tenant, user, account)
    spec = dict(message)
    if not spec.get("message_id"):
        spec["message_id"] = f"<{task.request.id}@{access.email.rpartition('@')[2]}>"
    entry = outbox.store(task.settings, tenant, user, account, spec).outbox_id
    return send(task.settings, access, entry, task.request.id)


def submit_send(
    settings: Settings,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    account_id: uuid.UUID,
    spec: Mapping[str, Any],
) -> outbox.Submission:
    """Store `spec` ({"to", "cc", "bcc", "subject", "body", "html", "reply_to", "message_id"})
    in the outbox, then queue send_email for it (see services/outbox.py)."""
    return outbox.submit_send(settings, tenant_id, user_id, account_id, spec, publish=publish_send)


def publish_send(args: list[str]) -> None:
    """Queue send_email(tenant_id, user_id, account_id, outbox_id); raises if the broker fails.
    Nobody waits for its result here (its outcome is the outbox row): in a long-lived client
    process, publishing outside denied_join_result would subscribe to the result channel of each
    send still referenced, and a broker connection error would retry those subscriptions."""
    with denied_join_result():
        send_email.apply_async(args=args, retry=False)
