"""sync_mailbox over several folders against the real Dovecot and PostgreSQL: a folder that fails
does not keep the others from syncing, and the task still fails, naming it."""

import dataclasses
import uuid

import pytest
from mailworker.db.models import Message
from mailworker.errors import PermanentError
from mailworker.services.access import owned_access
from mailworker.services.sync import sync_account
from sqlalchemy import select
from sqlalchemy.orm import Session

MESSAGE = b"From: sender@example.org\r\nSubject: hello\r\n\r\nhello\r\n"


def test_a_failing_folder_does_not_stop_the_others(app_settings, make_account, dovecot, db_engine):
    account = make_account()
    dovecot.deliver(account.address, MESSAGE)
    settings = dataclasses.replace(app_settings, sync_folders=("No such folder", "INBOX"))
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))

    with pytest.raises(PermanentError, match="No such folder"):
        sync_account(settings, access, settings.sync_folders)

    # INBOX, after the failing folder, was synced all the same.
    with Session(db_engine) as session:
        query = select(Message.folder, Message.uid).where(Message.account_id == account.account_id)
        assert session.execute(query).all() == [("INBOX", 1)]
