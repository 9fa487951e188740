"""Sending one message at most once per (account, Message-ID).

The guarantee, and why it is not "exactly once":
SMTP has no way to ask a server "did you take this message?", so a worker that dies after the
message data went out but before it recorded the server's reply cannot know whether the message
was delivered. Resending risks a duplicate; not resending risks a loss. We never resend blindly:

1. While an attempt runs it holds a PostgreSQL advisory lock for the Message-ID (released by the
   server the moment a killed worker's connection drops). A second attempt that cannot take the
   lock knows the first is alive and retries later (TransientError).
2. Before touching SMTP the attempt commits status `sending` (the intent).
3. After the server accepted the message, it appends a copy to the Sent folder over IMAP, then
   commits status `sent`.
4. An attempt that finds `sent` returns the stored outcome (no SMTP). One that finds `sending`
   and gets the lock knows the previous attempt died between 2 and 3's commit: it looks for the
   Message-ID in the Sent folder. Found: the send had completed, the row becomes `sent`. Not found:
   the row becomes `unknown` and the task fails with a message saying it was *not* resent;
   an operator checks the recipient side and, if needed, sends again under a new Message-ID.

So: a redelivered or retried task never sends a message twice; the only case that needs a human
is a worker killed inside the SMTP exchange itself (a window of one SMTP round trip), and that
case is recorded, not guessed. One residual case belongs to SMTP itself (RFC 5321 4.1.1.4):
a connection that breaks after the final "." but before the server's reply surfaces as a
TransientError like any other, and the retry may deliver a second copy.

A message without an explicit message_id gets one derived from the task id (see the task), so
redeliveries of the same task always share their Message-ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from sqlalchemy import func, select

from mailworker.db.engine import session_scope
from mailworker.db.locks import advisory_lock, lock_key
from mailworker.db.models import SentMessage
from mailworker.errors import MailworkerError, PermanentError, TransientError
from mailworker.mail.imap import ImapSession
from mailworker.mail.smtp import SendResult, send_message
from mailworker.services.access import AccountAccess
from mailworker.settings import Settings

logger = logging.getLogger(__name__)

RESENDABLE = frozenset({"deferred", "failed"})  # the server never took the message


@dataclass(frozen=True)
class Claim:
    """What the ledger says this attempt should do."""

    action: str  # send | done | resolve
    row: dict[str, Any]


def send(settings: Settings, access: AccountAccess, message: EmailMessage, task_id: str) -> dict:
    message_id = str(message["Message-ID"])
    with advisory_lock(settings, lock_key("send", access.account_id, message_id)) as held:
        if not held:
            raise TransientError(f"another attempt is sending {message_id} right now")
        claim = _claim(settings, access, message, message_id, task_id)
        if claim.action == "done":
            logger.info("%s was already sent; not sending again", message_id)
            return {**claim.row, "duplicate": True}
        if claim.action == "resolve":
            return _resolve_interrupted(settings, access, message_id)
        return _send_now(settings, access, message, message_id)


def _claim(
    settings: Settings,
    access: AccountAccess,
    message: EmailMessage,
    message_id: str,
    task_id: str,
) -> Claim:
    with session_scope(settings) as session:
        row = session.scalar(
            select(SentMessage)
            .where(SentMessage.account_id == access.account_id)
            .where(SentMessage.message_id == message_id)
            .with_for_update()
        )
        if row is None:
            session.add(
                SentMessage(
                    tenant_id=access.tenant_id,
                    account_id=access.account_id,
                    message_id=message_id,
                    status="sending",
                    recipients=_recipients(message),
                    subject=str(message.get("Subject", "")),
                    task_id=task_id,
                    attempts=1,
                    copied_to_sent=False,
                )
            )
            return Claim("send", {})
        if row.status == "sent":
            return Claim("done", _outcome(row))
        if row.status == "unknown":
            raise PermanentError(_unknown_message(message_id))
        if row.status == "sending":
            return Claim("resolve", {})
        if row.status not in RESENDABLE:
            raise PermanentError(f"{message_id} has unexpected send status {row.status!r}")
        row.status = "sending"
        row.attempts += 1
        row.task_id = task_id
        row.error = None
        return Claim("send", {})


def _send_now(
    settings: Settings, access: AccountAccess, message: EmailMessage, message_id: str
) -> dict:
    try:
        result = send_message(access.smtp, message)
    except TransientError as error:
        _set_status(settings, access, message_id, "deferred", error=str(error))
        raise
    except MailworkerError as error:
        _set_status(settings, access, message_id, "failed", error=str(error))
        raise
    copied = _copy_to_sent(settings, access, message)
    with session_scope(settings) as session:
        row = _row(session, access, message_id)
        row.status = "sent"
        row.accepted = list(result.accepted)
        row.refused = dict(result.refused)
        row.copied_to_sent = copied
        row.sent_at = func.now()
        row.error = None
    accepted, refused = len(result.accepted), len(result.refused)
    logger.info("sent %s to %d recipient(s), %d refused", message_id, accepted, refused)
    return _result(message_id, result, copied)


def _copy_to_sent(settings: Settings, access: AccountAccess, message: EmailMessage) -> bool:
    """Append the sent message to the Sent folder; the send stands even if this fails."""
    try:
        with ImapSession(access.imap) as imap:
            imap.append(settings.sent_folder, message.as_bytes(), flags=("\\Seen",))
    except MailworkerError as error:
        logger.warning("sent, but the copy to %r failed: %s", settings.sent_folder, error)
        return False
    return True


def _resolve_interrupted(settings: Settings, access: AccountAccess, message_id: str) -> dict:
    """The previous attempt died after committing `sending`: find out, never resend."""
    if _in_sent_folder(settings, access, message_id):
        with session_scope(settings) as session:
            row = _row(session, access, message_id)
            row.status = "sent"
            row.copied_to_sent = True
            row.sent_at = func.coalesce(SentMessage.sent_at, func.now())
            outcome = {**_outcome(row), "status": "sent"}
        logger.warning("%s: interrupted attempt had completed (found in Sent)", message_id)
        return {**outcome, "recovered": True}
    _set_status(
        settings,
        access,
        message_id,
        "unknown",
        error="a worker died during the SMTP exchange; not resent to avoid a duplicate",
    )
    raise PermanentError(_unknown_message(message_id))


def _in_sent_folder(settings: Settings, access: AccountAccess, message_id: str) -> bool:
    with ImapSession(access.imap) as imap:
        try:
            imap.select(settings.sent_folder)
        except PermanentError:  # no Sent folder yet: nothing was ever copied there
            return False
        return bool(imap.search_header("Message-ID", message_id))


def _unknown_message(message_id: str) -> str:
    return (
        f"send outcome of {message_id} is unknown: a worker died during the SMTP exchange; "
        "it was NOT resent (check the recipients, resend under a new message id if needed)"
    )


def _row(session: Any, access: AccountAccess, message_id: str) -> SentMessage:
    row = session.scalar(
        select(SentMessage)
        .where(SentMessage.account_id == access.account_id)
        .where(SentMessage.message_id == message_id)
        .with_for_update()
    )
    if row is None:  # only a manual DELETE between claim and now gets here
        raise PermanentError(f"send ledger row of {message_id} disappeared")
    return row


def _set_status(
    settings: Settings, access: AccountAccess, message_id: str, status: str, *, error: str
) -> None:
    with session_scope(settings) as session:
        row = _row(session, access, message_id)
        row.status = status
        row.error = error


def _recipients(message: EmailMessage) -> list[str]:
    headers = [str(value) for name in ("To", "Cc", "Bcc") for value in message.get_all(name, [])]
    return list(dict.fromkeys(address for _, address in getaddresses(headers) if address))


def _outcome(row: SentMessage) -> dict[str, Any]:
    return {
        "message_id": row.message_id,
        "status": row.status,
        "accepted": list(row.accepted or []),
        "refused": dict(row.refused or {}),
        "copied_to_sent": row.copied_to_sent,
    }


def _result(message_id: str, result: SendResult, copied: bool) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "status": "sent",
        "accepted": list(result.accepted),
        "refused": dict(result.refused),
        "copied_to_sent": copied,
        "duplicate": False,
    }
