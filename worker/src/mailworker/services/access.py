"""What a service needs to reach one account's mail servers, loaded after the tenancy check.

The tenancy check is one statement built once (tenancy.owned_account_row), read on the task's
autocommit connection (db/engine.py) with no ORM object made; nothing of it stays open during
mail I/O; the password is decrypted into the endpoint only (never into a dict, a log line or a
result) and `MailEndpoint` keeps it out of repr().
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row

from mailworker.crypto import decrypt_password
from mailworker.db.engine import autocommit_connection
from mailworker.db.models import MailAccount
from mailworker.mail.endpoints import MailEndpoint
from mailworker.settings import Settings
from mailworker.tenancy import owned_account_row


@dataclass(frozen=True)
class AccountAccess:
    account_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    imap: MailEndpoint
    smtp: MailEndpoint

    @classmethod
    def of(cls, account: MailAccount | Row[Any], settings: Settings) -> AccountAccess:
        """From an account: its ORM object or a row of its columns (owned_account_row)."""
        password = decrypt_password(settings, account.password_encrypted)
        smtp_password = (
            decrypt_password(settings, account.smtp_password_encrypted)
            if account.smtp_password_encrypted
            else password
        )
        ca_file = settings.mail_ca_file or None
        imap = MailEndpoint(
            host=account.imap_host,
            port=account.imap_port,
            security=account.imap_security,  # type: ignore[arg-type]  # checked on insert
            username=account.username,
            password=password,
            timeout=settings.imap_timeout,
            deadline=settings.imap_deadline,
            verify_tls=settings.imap_tls_verify,
            ca_file=ca_file,
        )
        smtp = MailEndpoint(
            host=account.smtp_host,
            port=account.smtp_port,
            security=account.smtp_security,  # type: ignore[arg-type]
            username=account.smtp_username or account.username,
            password=smtp_password,
            timeout=settings.smtp_timeout,
            deadline=settings.smtp_deadline,
            verify_tls=settings.smtp_tls_verify,
            ca_file=ca_file,
        )
        return cls(account.id, account.tenant_id, account.user_id, account.email, imap, smtp)


def owned_access(
    settings: Settings, tenant_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID
) -> AccountAccess:
    """The account's endpoints, after checking tenant, user and ownership (TenantMismatch)."""
    with autocommit_connection(settings) as connection:
        account = owned_account_row(connection, tenant_id, user_id, account_id)
    return AccountAccess.of(account, settings)
