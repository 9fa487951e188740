"""Argument shapes and ownership, checked before a task does any mail or data I/O.

The shape checks are pure. The ownership queries always filter by the tenant *and* user the
task was given, so a foreign id matches nothing: no other tenant's row is ever loaded, and the
error does not say whether the id exists elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import Connection, Row, and_, bindparam, select
from sqlalchemy.orm import Session, load_only

from mailworker.db.models import MailAccount, Message, Tenant, User
from mailworker.errors import InvalidTaskArguments, TenantMismatch

MAX_MESSAGE_IDS: Final = 1_000
# What user_messages loads of a message: where it is and what is claimed on it.
_WHERE_COLUMNS: Final = (
    Message.id,
    Message.tenant_id,
    Message.account_id,
    Message.folder,
    Message.uidvalidity,
    Message.uid,
    Message.state,
    Message.action,
    Message.action_state,
    Message.action_task_id,
)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # noqa: PLR2004


def parse_uuid(name: str, value: Any) -> uuid.UUID:
    """A UUID given as a string (how JSON carries it)."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise InvalidTaskArguments(f"{name} must be a UUID string, got {type(value).__name__}")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidTaskArguments(f"{name} is not a UUID: {_shown(value)}") from None


def parse_message_ids(value: Any) -> list[uuid.UUID]:
    """A non-empty list of message row ids (UUID strings), deduplicated."""
    if not isinstance(value, list | tuple) or not value:
        raise InvalidTaskArguments("message_ids must be a non-empty list of UUID strings")
    if len(value) > MAX_MESSAGE_IDS:
        raise InvalidTaskArguments(
            f"message_ids lists {len(value)} ids; at most {MAX_MESSAGE_IDS} per task"
        )
    return list(dict.fromkeys(parse_uuid("message_ids[]", item) for item in value))


def parse_folder(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 255:  # noqa: PLR2004
        raise InvalidTaskArguments(f"{name} must be a folder name, got {_shown(value)}")
    if any(ord(char) < 32 for char in value):  # noqa: PLR2004 - control characters
        raise InvalidTaskArguments(f"{name} must not contain control characters")
    return value


def parse_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTaskArguments(f"{name} must be true or false, got {_shown(value)}")
    return value


def require_tenant_and_user(session: Session, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User:
    """The active user `user_id` of the active tenant `tenant_id`."""
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id))
    user = session.scalar(select(User).where(User.id == user_id, User.tenant_id == tenant_id))
    _require_active(
        tenant_id,
        user_id,
        None if tenant is None else tenant.active,
        None if user is None else user.active,
    )
    assert user is not None  # refused above otherwise
    return user


def _require_active(
    tenant_id: uuid.UUID, user_id: uuid.UUID, tenant_active: bool | None, user_active: bool | None
) -> None:
    """The tenant's and then the user's refusals, in that order (None: no such row)."""
    if tenant_active is None:
        raise TenantMismatch(f"tenant {tenant_id} does not exist")
    if not tenant_active:
        raise TenantMismatch(f"tenant {tenant_id} is not active")
    if user_active is None:
        raise TenantMismatch(f"user {user_id} does not belong to tenant {tenant_id}")
    if not user_active:
        raise TenantMismatch(f"user {user_id} is not active")


# The tenant, joined to the user only if the user is the tenant's, and to the account only if it
# is that user's in that tenant: one query, built once; the account's columns, no ORM object.
_OWNED_ACCOUNT: Final = (
    select(
        Tenant.active.label("owned_tenant_active"),
        User.id.label("owned_user_id"),
        User.active.label("owned_user_active"),
        *MailAccount.__table__.c,
    )
    .select_from(Tenant)
    .outerjoin(User, and_(User.id == bindparam("user"), User.tenant_id == Tenant.id))
    .outerjoin(
        MailAccount,
        and_(
            MailAccount.id == bindparam("account"),
            MailAccount.tenant_id == Tenant.id,
            MailAccount.user_id == User.id,
        ),
    )
    .where(Tenant.id == bindparam("tenant"))
)


def owned_account_row(
    connection: Connection, tenant_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID
) -> Row[Any]:
    """The active account `account_id`, if tenant and user exist, are active and own it: its
    columns as one row (attributes named as MailAccount's). One round trip; the errors are those
    of require_tenant_and_user and then the account's, in the same order."""
    row = connection.execute(
        _OWNED_ACCOUNT, {"tenant": tenant_id, "user": user_id, "account": account_id}
    ).first()
    _require_owned(
        tenant_id,
        user_id,
        account_id,
        tenant_active=None if row is None else row.owned_tenant_active,
        user_active=None if row is None or row.owned_user_id is None else row.owned_user_active,
        account_active=None if row is None or row.id is None else row.active,
    )
    assert row is not None  # refused above otherwise
    return row


def _require_owned(
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    account_id: uuid.UUID,
    *,
    tenant_active: bool | None,
    user_active: bool | None,
    account_active: bool | None,
) -> None:
    """The tenant's, the user's and then the account's refusals (None: no such row)."""
    _require_active(tenant_id, user_id, tenant_active, user_active)
    if account_active is None:
        raise TenantMismatch(f"account {account_id} does not belong to user {user_id}")
    if not account_active:
        raise TenantMismatch(f"account {account_id} is not active")


def user_messages(
    session: Session,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    message_ids: Sequence[uuid.UUID],
) -> list[tuple[Message, MailAccount]]:
    """Those of the requested messages the user owns, with their accounts; others are absent.

    Only the columns that say where a message is and what is claimed on it are loaded, not its
    raw bytes, headers or text: a caller that needs those reads one message at a time, so memory
    does not grow with the number of ids.
    """
    require_tenant_and_user(session, tenant_id, user_id)
    rows = session.execute(
        select(Message, MailAccount)
        .join(MailAccount, Message.account_id == MailAccount.id)
        .where(
            Message.id.in_(message_ids),
            Message.tenant_id == tenant_id,
            MailAccount.tenant_id == tenant_id,
            MailAccount.user_id == user_id,
        )
        .options(load_only(*_WHERE_COLUMNS))
        .order_by(Message.account_id, Message.folder, Message.uid)
    ).all()
    return [(message, account) for message, account in rows]


def owned_messages(
    session: Session,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    message_ids: Sequence[uuid.UUID],
) -> list[tuple[Message, MailAccount]]:
    """Every requested message with its account, all owned by the user; else TenantMismatch.

    As `user_messages`: the message's raw bytes, headers and text are not loaded.
    """
    rows = user_messages(session, tenant_id, user_id, message_ids)
    found = {message.id for message, _ in rows}
    missing = [str(message_id) for message_id in message_ids if message_id not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")  # noqa: PLR2004
        raise TenantMismatch(f"{len(missing)} message(s) do not belong to user {user_id}: {shown}")
    inactive = sorted({str(account.id) for _, account in rows if not account.active})
    if inactive:
        raise TenantMismatch(f"account {inactive[0]} is not active")
    return rows
