"""Queue `delete`: move messages to Trash (or expunge them) and mark their rows."""

from __future__ import annotations

from typing import Any

from mailworker.celery_app import app
from mailworker.services.access import owned_access
from mailworker.services.delete import delete_messages as delete_service
from mailworker.tasks.base import MailTask
from mailworker.tenancy import parse_flag, parse_folder, parse_uids, parse_uuid


@app.task(base=MailTask, bind=True, name="mailworker.tasks.delete.delete_messages")
def delete_messages(  # noqa: PLR0917 - the task's public signature
    self: MailTask,
    tenant_id: Any,
    user_id: Any,
    account_id: Any,
    uids: Any,
    folder: Any = "INBOX",
    permanent: Any = False,
) -> dict:
    """Delete the messages with `uids` in `folder`: to Trash, or for good with permanent=True."""
    tenant = parse_uuid("tenant_id", tenant_id)
    user = parse_uuid("user_id", user_id)
    account = parse_uuid("account_id", account_id)
    uid_list = parse_uids(uids)
    folder_name = parse_folder("folder", folder)
    expunge = parse_flag("permanent", permanent)
    access = owned_access(self.settings, tenant, user, account)
    return delete_service(self.settings, access, folder_name, uid_list, permanent=expunge)
