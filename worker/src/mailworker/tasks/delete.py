"""Queue `delete`: move the messages the caller saw to Trash (or expunge them), mark their rows."""

from __future__ import annotations

import uuid
from typing import Any

from mailworker.celery_app import app
from mailworker.services.access import owned_access
from mailworker.services.delete import delete_messages as delete_service
from mailworker.tasks.base import MailTask
from mailworker.tenancy import parse_flag, parse_folder, parse_message_ids, parse_uuid


@app.task(
    base=MailTask,
    bind=True,
    name="mailworker.tasks.delete.delete_messages",
    retry_window_setting="action_retry_window",
)
def delete_messages(  # noqa: PLR0917 - the task's public signature
    self: MailTask,
    tenant_id: Any,
    user_id: Any,
    account_id: Any,
    message_ids: Any,
    folder: Any = "INBOX",
    permanent: Any = False,
) -> dict:
    """Delete the messages `message_ids` (rows of the messages table) that are in `folder`:
    to Trash, or for good with permanent=True. Reports every id it did not act on, and why."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    account = parse_uuid("account_id", account_id)
    ids = parse_message_ids(message_ids)
    folder_name = parse_folder("folder", folder)
    expunge = parse_flag("permanent", permanent)
    access = owned_access(self.settings, tenant, user, account)
    token = self.request.id or str(uuid.uuid4())
    return delete_service(self.settings, access, folder_name, ids, permanent=expunge, token=token)
