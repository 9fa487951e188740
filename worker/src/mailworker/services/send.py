"""Sending one stored message (services/outbox.py) at most once per (account, Message-ID).

The guarantee, and why it is not "exactly once":
SMTP has no way to ask a server "did you take this message?", so an attempt that loses the
connection after the message data went out, or a worker that dies before it recorded the
server's reply, cannot know whether the message was delivered. Resending risks a duplicate; not
resending risks a loss. We never resend blindly:

1. While an attempt runs it holds a PostgreSQL advisory lock for the Message-ID (released by the
   server the moment a killed worker's connection drops). A second attempt that cannot take the
   lock knows the first is alive and retries later (TransientError).
2. Before touching SMTP the attempt commits status `sending` and its number (`attempts`, one
   more than the last). Every later write of the attempt checks that number first: an attempt
   that froze (a paused VM whose database session was dropped, releasing the lock) and woke up
   after another took over stops there (AttemptSuperseded) without writing or delivering.
3. A failure before the final "." of the data (connection refused, 4xx, a drop during MAIL,
   RCPT, DATA or while the data is written) cannot have delivered anything: status `deferred`,
   retried (by the task, then by the outbox sweeper) until MAILWORKER_SEND_RETRY_WINDOW ends.
   A 5xx is `failed`.
4. Just before it writes the final ".", the attempt commits `data_sent_at`: the point of no
   return. A failure after it (no reply within MAILWORKER_SMTP_FINAL_REPLY_TIMEOUT, the
   connection dropped, a time limit) is `unknown` at once: not resent, the task fails saying so.
5. The moment the server accepted the message (its 250, before QUIT) the attempt commits
   `sent`, then appends a copy to the Sent folder over IMAP, records the copy and drops the
   stored content (its hash stays). Only a worker lost between the final "." and that commit
   leaves `sending` with `data_sent_at` (below).
6. An attempt that finds `sent` returns the stored outcome (no SMTP), making the Sent copy first
   if its attempt died before it (the content is still stored; it looks in Sent before it
   appends). One that finds `sending` and gets the lock knows the previous attempt died:
   - without `data_sent_at` it never wrote the final ".", nothing was delivered: it sends now;
   - with it, it looks for the Message-ID in the Sent folder. Found: the row becomes `sent`.
     Not found: `unknown`, and the task fails with a message saying it was *not* resent.

The claim (2) of a pending entry inside its retry window, the usual case, and every later write
of the attempt (3-5) are each one statement that commits by itself, on the lock's connection in
autocommit (no BEGIN/COMMIT around it): a fenced UPDATE needs no transaction, PostgreSQL
re-checks its WHERE on the row it locks. A claim that finds anything else reads the entry
locked (FOR UPDATE) and writes what it decided in one transaction, and so does the resolver
that finds the message in Sent (6).

Connections: an account's SMTP connection is kept between its sends (mail/kept_connections.py,
MAILWORKER_SMTP_IDLE_REUSE), but only after a transaction that ended with the server's 250 to
the final "."; points 1-6 hold per message whatever connection carries it: a kept connection
found dead before any RCPT is replaced (nothing can have been delivered on it), any later
failure is judged exactly as on a new connection, and closes it. The IMAP session of the copy
to Sent is kept the same way (MAILWORKER_IMAP_IDLE_REUSE) after an APPEND answered OK; one that
does not answer a NOOP is replaced before the APPEND, so no copy is appended twice by it.

Memory: an attempt reserves its message's size (times SEND_RESERVES_PER_BYTE) in the process's
MAILWORKER_MAIL_MEMORY_BUDGET (mail/memory_budget.py) before it loads the content, and holds it
until the Sent copy is done; it waits, rather than starts, when the budget is full. The content
is read from the database once per attempt.

For `unknown`, an operator checks the recipient side and, if needed, submits the message again
under a new Message-ID (docs/operations.md). Results and logs carry ids and counts, never
addresses, subjects or bodies.
"""

from __future__ import annotations

import email
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import Connection, Interval, Row, Update, bindparam, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import defer
from sqlalchemy.sql import Executable

from mailworker.db.engine import autocommit_connection, session_scope
from mailworker.db.locks import locked_connection
from mailworker.db.models import SentMessage
from mailworker.errors import (
    AttemptSuperseded,
    MailworkerError,
    PermanentError,
    TenantMismatch,
    TransientError,
)
from mailworker.mail.imap import ImapSession, kept_imap_connections, kept_imap_session
from mailworker.mail.kept_connections import KeptConnections, close_all_kept
from mailworker.mail.memory_budget import budget_for
from mailworker.mail.smtp import (
    DeliveryUnknown,
    SendResult,
    kept_smtp_connections,
    send_message,
)
from mailworker.services.access import AccountAccess
from mailworker.services.outbox import PENDING, fail_expired, lock_of, retry_delay
from mailworker.services.parsing import PARSE_POLICY
from mailworker.settings import Settings

logger = logging.getLogger(__name__)
# Bytes of MAILWORKER_MAIL_MEMORY_BUDGET a send reserves per byte of its message. The budget
# counts what a sync batch holds about 3x; a send peaks near 9x (its stored bytes, plus about
# 7.8x while email.message_from_bytes parses it: measured with tracemalloc on a 24 MiB message
# with an attachment), so it reserves 3x.
SEND_RESERVES_PER_BYTE = 3


@dataclass(frozen=True)
class Claim:
    """What the ledger says this attempt should do."""

    action: str  # send | done | copy (sent, Sent copy missing) | resolve
    row: dict[str, Any]
    content: bytes = b""
    attempt: int = 0  # the row's attempt number this attempt owns (send) or judges (resolve)


def send(settings: Settings, access: AccountAccess, outbox_id: uuid.UUID, task_id: str) -> dict:
    """Send the stored message `outbox_id` of this account (see the module docstring)."""
    message_id, size = _message_id_of(settings, access, outbox_id)
    # Waits, holding no database connection, until the attempt's bytes fit the process's budget.
    budget = budget_for(settings.mail_memory_budget)
    with (
        budget.reserve(size * SEND_RESERVES_PER_BYTE),
        # The lock's connection (autocommit) also runs the attempt's single ledger statements.
        locked_connection(settings, lock_of(access.account_id, message_id)) as connection,
    ):
        if connection is None:
            raise TransientError(f"another attempt is sending {message_id} right now")
        ledger = _Ledger(settings, connection, access, outbox_id)
        claim = _claim(ledger, task_id)
        if claim.action == "done":
            logger.info("%s was already sent; not sending again", message_id)
            return {**claim.row, "duplicate": True}
        if claim.action == "copy":
            return _finish_sent_copy(ledger, message_id, claim)
        if claim.action == "resolve":
            return _resolve_interrupted(ledger, message_id, claim.attempt)
        return _send_now(ledger, message_id, claim)


@dataclass(frozen=True)
class _Ledger:
    """The entry `outbox_id` of this account, as one attempt reads and writes it while it
    holds the entry's advisory lock: single statements on the lock's connection (`first`),
    transactions through session_scope (which runs on that connection too)."""

    settings: Settings
    connection: Connection  # the advisory lock's, in autocommit
    access: AccountAccess
    outbox_id: uuid.UUID

    @property
    def entry(self) -> dict[str, uuid.UUID]:
        """The parameters of _OF_ENTRY."""
        return _entry(self.access, self.outbox_id)

    def first(self, statement: Executable, params: dict[str, Any]) -> Row[Any] | None:
        """The first row of `statement`, run by itself on the lock's connection in
        autocommit: it commits as it ends, with no BEGIN, COMMIT or Session around it. If
        that connection was lost (and the lock with it), on a pool connection in autocommit
        instead: the writes are fenced, so one that comes after another attempt took over
        writes nothing."""
        if self.connection.invalidated:
            with autocommit_connection(self.settings) as connection:
                return connection.execute(statement, params).first()
        return self.connection.execute(statement, params).first()


def _message_id_of(
    settings: Settings, access: AccountAccess, outbox_id: uuid.UUID
) -> tuple[str, int]:
    """The entry's Message-ID and stored size (without loading the content): one statement,
    before the lock is taken, on a pool connection in autocommit."""
    params = {**_entry(access, outbox_id), "tenant": access.tenant_id}
    with autocommit_connection(settings) as connection:
        found = connection.execute(_MESSAGE_ID_AND_SIZE, params).first()
    if found is None:
        # Like the other ownership checks: not saying whether it exists elsewhere.
        raise TenantMismatch(f"outbox entry {outbox_id} is not a message of this account")
    return found[0], found[1]


def _claim(ledger: _Ledger, task_id: str) -> Claim:
    """The usual case, a pending entry with its content inside its retry window, is taken in
    one statement (_TAKE_PENDING). Anything else is read locked, in a transaction with what it
    writes: why not, or what instead (an expired window, a lost attempt to take over)."""
    settings, access, outbox_id = ledger.settings, ledger.access, ledger.outbox_id
    window = timedelta(seconds=settings.send_retry_window)
    taken = ledger.first(_TAKE_PENDING, {**ledger.entry, "task": task_id, "window": window})
    if taken is not None:
        return Claim("send", {}, taken.content, taken.attempts)
    with session_scope(settings) as session:
        row, now = _row_and_now(session, access, outbox_id)
        if row.status == "sent":
            if row.content is not None and not row.copied_to_sent:
                return Claim("copy", _outcome(row), row.content)
            return Claim("done", _outcome(row))
        if row.status == "unknown":
            raise PermanentError(_unknown_message(row.message_id, row.error or ""))
        if row.status == "failed":
            raise PermanentError(f"send of {row.message_id} failed: {row.error}")
        if row.status == "sending" and row.data_sent_at is not None:
            return Claim("resolve", {}, attempt=row.attempts)
        if row.status == "sending":
            logger.warning(
                "%s: attempt %d was lost before the message data went out (nothing was "
                "delivered); sending it now",
                row.message_id,
                row.attempts,
            )
        elif row.status not in PENDING:
            raise PermanentError(f"{row.message_id} has unexpected send status {row.status!r}")
        if _window_ended(row, now, settings):
            expired = _row(session, access, outbox_id)  # the same locked row, as ORM object
            fail_expired(expired, settings)
            gave_up = PermanentError(f"send of {row.message_id} failed: {expired.error}")
        elif row.content is None:
            raise PermanentError(f"outbox entry {outbox_id} has no stored message to send")
        else:
            attempt = row.attempts + 1
            params = {**_entry(access, outbox_id), "attempt": attempt, "task": task_id}
            session.execute(_TAKE, params)
            return Claim("send", {}, row.content, attempt)
    raise gave_up  # after the commit that recorded it


def _window_ended(row: Row[Any], now: datetime, settings: Settings) -> bool:
    if row.queued_at is None:
        return False
    return (now - row.queued_at).total_seconds() > settings.send_retry_window


def _send_now(ledger: _Ledger, message_id: str, claim: Claim) -> dict:
    settings, access, attempt = ledger.settings, ledger.access, claim.attempt
    # policy.default with the header caches of synced mail: the parser and the generator of the
    # wire data look each part's Content-Type up six or seven times, each a parse of its own.
    message = email.message_from_bytes(claim.content, policy=PARSE_POLICY)
    assert isinstance(message, EmailMessage)  # policy.default's message factory
    accepted: list[SendResult] = []  # the server's acceptance, the moment it came
    unrecorded: list[Exception] = []

    def record_sent(result: SendResult) -> None:
        # Committed before QUIT: a worker killed after the 250 leaves `sent`, not `unknown`.
        accepted.append(result)
        try:
            _record_sent(ledger, attempt, result)
        except Exception as error:  # a database error, a time limit, an overtaking attempt
            unrecorded.append(error)

    try:
        send_message(
            access.smtp,
            message,
            final_reply_timeout=settings.smtp_final_reply_timeout,
            before_final_dot=partial(_mark_data_sent, ledger, attempt),
            on_accepted=record_sent,
            sessions=kept_smtp(settings),
            account=str(access.account_id),
        )
    except Exception as error:
        if not accepted:
            _record_failure(partial(_set_status, ledger, attempt), message_id, error)
            raise
        # Raised after the server's 250 (a time limit while closing): the delivery stands.
    [result] = accepted
    if unrecorded:
        if isinstance(unrecorded[0], AttemptSuperseded | SoftTimeLimitExceeded):
            raise unrecorded[0]
        # Delivered but not recorded: with the copy in Sent, the retry records `sent`.
        _copy_to_sent(settings, access, claim.content)
        raise unrecorded[0]
    copied = _copy_to_sent(settings, access, claim.content)
    _record_copy(ledger, copied)
    logger.info(
        "sent %s to %d recipient(s), %d refused",
        message_id,
        len(result.accepted),
        len(result.refused),
    )
    return _result(ledger.outbox_id, message_id, result, copied)


def kept_smtp(settings: Settings) -> KeptConnections:
    """This process's kept SMTP connections (MAILWORKER_SMTP_IDLE_REUSE and its limits)."""
    return kept_smtp_connections(
        settings.smtp_idle_reuse,
        settings.mail_reuse_max_messages,
        settings.mail_reuse_max_connections,
    )


def kept_imap(settings: Settings) -> KeptConnections:
    """This process's kept IMAP sessions for Sent copies (MAILWORKER_IMAP_IDLE_REUSE)."""
    return kept_imap_connections(
        settings.imap_idle_reuse,
        settings.mail_reuse_max_messages,
        settings.mail_reuse_max_connections,
    )


def close_kept_connections() -> None:
    """Say goodbye to the mail connections this process keeps idle (at worker shutdown)."""
    close_all_kept()


def _record_failure(set_status: Callable[..., None], message_id: str, error: Exception) -> None:
    """The attempt ended before the server accepted the message: record why with `set_status`
    (the caller re-raises `error`; an unknown outcome raises the PermanentError saying so)."""
    if isinstance(error, AttemptSuperseded):
        return
    if isinstance(error, DeliveryUnknown):
        set_status("unknown", error=f"{error}; not resent")
        raise PermanentError(_unknown_message(message_id, str(error))) from None
    if isinstance(error, TransientError):
        set_status("deferred", error=str(error))
    elif isinstance(error, MailworkerError):
        set_status("failed", error=str(error))
    else:
        # send_message lets nothing but its own errors out once the data went out, so this came
        # before the final ".": nothing was delivered. A soft time limit is worth another try;
        # anything else (a bug) would fail the same way on every sweep.
        status = "deferred" if isinstance(error, SoftTimeLimitExceeded) else "failed"
        set_status(status, error=type(error).__name__)


def _mark_data_sent(ledger: _Ledger, attempt: int) -> None:
    """Commit that this attempt writes the final "." now; a superseded one stops before it."""
    try:
        _update_attempt(ledger, attempt, _MARK_DATA_SENT)
    except SQLAlchemyError as error:
        raise TransientError(
            f"could not record that the message data ends ({type(error).__name__}); "
            "nothing was delivered"
        ) from None


def _record_sent(ledger: _Ledger, attempt: int, result: SendResult) -> None:
    """The server took it: `sent` (from `unknown` too, which a resolver may have concluded)."""
    outcome = {"accepted_by": list(result.accepted), "refused_by": dict(result.refused)}
    _update_attempt(ledger, attempt, _RECORD_SENT, **outcome)


def _record_copy(ledger: _Ledger, copied: bool) -> None:
    """After the Sent copy (or its failure): drop the content; the hash keeps the claim."""
    if ledger.first(_RECORD_COPY, {**ledger.entry, "copied": copied}) is None:
        # only a manual DELETE since the claim gets here
        raise PermanentError(f"outbox entry {ledger.outbox_id} disappeared")


def _finish_sent_copy(ledger: _Ledger, message_id: str, claim: Claim) -> dict:
    """The attempt that sent it died before its Sent copy: make it, unless it is there."""
    settings, access = ledger.settings, ledger.access
    copied = _in_sent_folder(settings, access, message_id) or _copy_to_sent(
        settings, access, claim.content
    )
    _record_copy(ledger, copied)
    logger.info("%s was already sent; its copy to Sent is done now", message_id)
    return {**claim.row, "copied_to_sent": copied, "duplicate": True}


def _copy_to_sent(settings: Settings, access: AccountAccess, content: bytes) -> bool:
    """Append the sent message to the Sent folder; the send stands even if this fails."""
    try:
        kept = kept_imap(settings)
        with kept_imap_session(access.imap, kept, str(access.account_id)) as imap:
            imap.append(settings.sent_folder, content, flags=("\\Seen",))
    except Exception as error:  # a soft time limit too: the row must still say `sent`
        logger.warning("sent, but the copy to %r failed: %s", settings.sent_folder, error)
        return False
    return True


def _resolve_interrupted(ledger: _Ledger, message_id: str, attempt: int) -> dict:
    """Attempt `attempt` died after its final ".": find out, never resend."""
    settings, access, outbox_id = ledger.settings, ledger.access, ledger.outbox_id
    if _in_sent_folder(settings, access, message_id):
        with session_scope(settings) as session:
            row = _attempt_row(session, access, outbox_id, attempt, ("sending",))
            row.status = "sent"
            row.copied_to_sent = True
            row.sent_at = func.coalesce(SentMessage.sent_at, func.now())
            row.content = None
            outcome = {**_outcome(row), "status": "sent"}
        logger.warning("%s: interrupted attempt had completed (found in Sent)", message_id)
        return {**outcome, "recovered": True}
    error = "a worker died after the message data went out; not resent to avoid a duplicate"
    _set_status(ledger, attempt, "unknown", error=error)
    raise PermanentError(_unknown_message(message_id, error))


def _in_sent_folder(settings: Settings, access: AccountAccess, message_id: str) -> bool:
    with ImapSession(access.imap) as imap:
        try:
            imap.select(settings.sent_folder)
        except PermanentError:  # no Sent folder yet: nothing was ever copied there
            return False
        return bool(imap.search_header("Message-ID", message_id))


def _unknown_message(message_id: str, reason: str) -> str:
    return (
        f"send outcome of {message_id} is unknown ({reason}); it was NOT resent: check with "
        "the recipients, and submit it again under a new Message-ID if it did not arrive"
    )


def _row(session: Any, access: AccountAccess, outbox_id: uuid.UUID) -> SentMessage:
    """The entry, locked, without its content."""
    query = select(SentMessage).options(defer(SentMessage.content)).with_for_update()
    row = session.scalar(query.where(*_OF_ENTRY), _entry(access, outbox_id))
    if row is None:  # only a manual DELETE between claim and now gets here
        raise PermanentError(f"outbox entry {outbox_id} disappeared")
    return row


def _attempt_row(
    session: Any,
    access: AccountAccess,
    outbox_id: uuid.UUID,
    attempt: int,
    statuses: tuple[str, ...],
) -> SentMessage:
    """The entry, locked, if attempt `attempt` still owns it in one of `statuses`."""
    row = _row(session, access, outbox_id)
    if row.attempts != attempt or row.status not in statuses:
        raise AttemptSuperseded(
            f"attempt {attempt} of {row.message_id} was overtaken (the entry is {row.status} at "
            f"attempt {row.attempts}); this one stops without writing"
        )
    return row


def _row_and_now(
    session: Any, access: AccountAccess, outbox_id: uuid.UUID
) -> tuple[Row[Any], datetime]:
    """The entry with its content, locked, and the database's clock (one round trip)."""
    found = session.execute(_ROW_AND_NOW, _entry(access, outbox_id)).first()
    if found is None:  # only a manual DELETE between the Message-ID's lookup and now
        raise PermanentError(f"outbox entry {outbox_id} disappeared")
    return found, found.now


def _update_attempt(ledger: _Ledger, attempt: int, statement: Fenced, **params: Any) -> None:
    """Run `statement` (a Fenced one, at the end of the module) with `params`, if attempt
    `attempt` still owns the entry in the statement's statuses.

    One UPDATE whose WHERE carries the fencing check, committed by itself (`_Ledger.first`):
    PostgreSQL re-checks the WHERE on the row it locks, so an attempt overtaken in between
    writes nothing.
    """
    if ledger.first(statement.update, {**ledger.entry, "attempt": attempt, **params}) is None:
        found = ledger.first(_STATE, ledger.entry)
        if found is None:  # only a manual DELETE since the claim gets here
            raise PermanentError(f"outbox entry {ledger.outbox_id} disappeared")
        raise AttemptSuperseded(
            f"attempt {attempt} of {found.message_id} was overtaken (the entry is "
            f"{found.status} at attempt {found.attempts}); this one stops without writing"
        )


def _set_status(ledger: _Ledger, attempt: int, status: str, *, error: str) -> None:
    """The outcome of attempt `attempt`, still `sending`."""
    if status == "deferred":
        delay = retry_delay(ledger.settings)
        _update_attempt(ledger, attempt, _DEFER, reason=error, delay=delay)
    else:
        _update_attempt(ledger, attempt, _SET_STATUS, new_status=status, reason=error)


def _outcome(row: SentMessage | Row[Any]) -> dict[str, Any]:
    """A send's result: ids and counts only (results are visible in Redis and Flower)."""
    return {
        "outbox_id": str(row.id),
        "message_id": row.message_id,
        "status": row.status,
        "accepted": len(row.accepted or []),
        "refused": len(row.refused or {}),
        "copied_to_sent": row.copied_to_sent,
    }


def _result(
    outbox_id: uuid.UUID, message_id: str, result: SendResult, copied: bool
) -> dict[str, Any]:
    return {
        "outbox_id": str(outbox_id),
        "message_id": message_id,
        "status": "sent",
        "accepted": len(result.accepted),
        "refused": len(result.refused),
        "copied_to_sent": copied,
        "duplicate": False,
    }


# -- the ledger's statements on the send path ----------------------------------------------------
# Built once, as Core statements on the table with bind parameters, and run with their values:
# SQLAlchemy then takes each one's compiled form from its cache, instead of building the
# expression, its cache key and an ORM bulk UPDATE's state on every call. Every statement is
# restricted to one entry of one account (:outbox_id, :account: `_entry`). SQLAlchemy keeps a
# column's own name for the value an UPDATE sets it to, so no parameter is named after a column.
_OUTBOX = SentMessage.__table__
_COL = _OUTBOX.c
_OF_ENTRY = (
    _COL.id == bindparam("outbox_id"),
    _COL.account_id == bindparam("account"),
)


def _entry(access: AccountAccess, outbox_id: uuid.UUID) -> dict[str, uuid.UUID]:
    """The parameters of _OF_ENTRY: the entry `outbox_id` of this account."""
    return {"outbox_id": outbox_id, "account": access.account_id}


@dataclass(frozen=True)
class Fenced:
    """An UPDATE ... RETURNING id of the entry that writes only while attempt :attempt owns it
    in one of `statuses` (services/send.py, point 2): None back means it was overtaken."""

    statuses: tuple[str, ...]
    update: Update

    @classmethod
    def of(cls, statuses: tuple[str, ...], **values: Any) -> Fenced:
        fencing = (_COL.attempts == bindparam("attempt"), _COL.status.in_(statuses))
        statement = update(_OUTBOX).where(*fencing, *_OF_ENTRY).values(**values)
        return cls(statuses, statement.returning(_COL.id))


# Rows queued before `size` was recorded have none; :tenant keeps the check of the tenant.
_MESSAGE_ID_AND_SIZE = select(
    _COL.message_id, func.coalesce(_COL.size, func.octet_length(_COL.content), 0)
).where(*_OF_ENTRY, _COL.tenant_id == bindparam("tenant"))
# The claim: the entry with its content, locked, and the database's clock.
_ROW_AND_NOW = (
    select(_OUTBOX, func.now().label("now")).where(*_OF_ENTRY).with_for_update(of=_OUTBOX)
)
# The claim's usual case in one statement: a pending entry with its content, inside its retry
# window (:window since it was queued, as _window_ended says), taken for its next attempt.
_TAKE_PENDING = (
    update(_OUTBOX)
    .where(
        *_OF_ENTRY,
        _COL.status.in_(PENDING),
        _COL.content.is_not(None),
        or_(
            _COL.queued_at.is_(None),
            _COL.queued_at >= func.now() - bindparam("window", type_=Interval()),
        ),
    )
    .values(
        status="sending",
        attempts=_COL.attempts + 1,
        task_id=bindparam("task"),
        error=None,
        next_attempt_at=None,
        data_sent_at=None,
    )
    .returning(_COL.attempts, _COL.content)
)
# Any other claim takes the entry for attempt :attempt (its row is locked by _ROW_AND_NOW).
_TAKE = (
    update(_OUTBOX)
    .where(*_OF_ENTRY)
    .values(
        status="sending",
        attempts=bindparam("attempt"),
        task_id=bindparam("task"),
        error=None,
        next_attempt_at=None,
        data_sent_at=None,
    )
)
_MARK_DATA_SENT = Fenced.of(("sending",), data_sent_at=func.now())
# From `unknown` too, which a resolver may have concluded meanwhile.
_RECORD_SENT = Fenced.of(
    ("sending", "unknown"),
    status="sent",
    accepted=bindparam("accepted_by"),
    refused=bindparam("refused_by"),
    sent_at=func.now(),
    error=None,
)
_SET_STATUS = Fenced.of(("sending",), status=bindparam("new_status"), error=bindparam("reason"))
_DEFER = Fenced.of(
    ("sending",),
    status="deferred",
    error=bindparam("reason"),
    next_attempt_at=func.now() + bindparam("delay", type_=Interval()),
)
# Where the entry stands, when a fenced UPDATE wrote nothing.
_STATE = select(_COL.message_id, _COL.status, _COL.attempts).where(*_OF_ENTRY)
_RECORD_COPY = (
    update(_OUTBOX)
    .where(*_OF_ENTRY)
    .values(copied_to_sent=bindparam("copied"), content=None)
    .returning(_COL.id)
)
