"""Queue `sync`: incremental IMAP sync of one account."""

from __future__ import annotations

from typing import Any

from mailworker.celery_app import app
from mailworker.services.access import owned_access
from mailworker.services.sync import sync_account
from mailworker.tasks.base import MailTask
from mailworker.tasks.spam import publish_classify
from mailworker.tenancy import parse_uuid


@app.task(base=MailTask, bind=True, name="mailworker.tasks.sync.sync_mailbox")
def sync_mailbox(self: MailTask, tenant_id: Any, user_id: Any, account_id: Any) -> dict:
    """Store the account's new messages (per MAILWORKER_SYNC_FOLDERS) in PostgreSQL and queue
    classify_spam for them."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    account = parse_uuid("account_id", account_id)
    access = owned_access(self.settings, tenant, user, account)
    return sync_account(
        self.settings, access, self.settings.sync_folders, classify=publish_classify
    )
