"""Queue `send`: send one message over SMTP, at most once per Message-ID (see services/send.py)."""

from __future__ import annotations

from typing import Any

from mailworker.celery_app import app
from mailworker.errors import InvalidTaskArguments
from mailworker.mail.smtp import build_message
from mailworker.services.access import owned_access
from mailworker.services.send import send
from mailworker.tasks.base import MailTask
from mailworker.tenancy import parse_uuid

# Only to validate the message's shape before any I/O; the real sender is the account's address.
_PLACEHOLDER_SENDER = "sender@example.org"


@app.task(base=MailTask, bind=True, name="mailworker.tasks.send.send_email")
def send_email(self: MailTask, tenant_id: Any, user_id: Any, account_id: Any, message: Any) -> dict:
    """Send `message` ({"to", "cc", "bcc", "subject", "body", "html", "message_id", ...})."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    account = parse_uuid("account_id", account_id)
    if not isinstance(message, dict):
        raise InvalidTaskArguments("message must be an object of message fields")
    build_message(message, sender=_PLACEHOLDER_SENDER)
    access = owned_access(self.settings, tenant, user, account)
    spec = dict(message)
    if not spec.get("message_id"):
        # Stable across redeliveries and retries of this task: the idempotency key.
        domain = access.email.rpartition("@")[2]
        spec["message_id"] = f"<{self.request.id}@{domain}>"
    return send(self.settings, access, build_message(spec, sender=access.email), self.request.id)
