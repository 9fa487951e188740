"""Claims on messages for the actions that change where a message is: trash, expunge, junk.

A delete and a spam move may race for one message. Each claims the rows it will act on with one
conditional UPDATE (present, nothing pending) before touching IMAP, acts on IMAP only for what it
claimed, then finalizes the rows it still holds. The loser of a race claims nothing and reports
the message as `busy`, so the database and the server always agree on where a message went.

The claim is held by a token (the task id). A retry or redelivery of the same task re-takes its
own claim; a claim nobody has attempted for MAILWORKER_STALE_AFTER is handed to a fresh task by
`sweep_message_actions` (run by the periodic cleanup), until MAILWORKER_ACTION_RETRY_WINDOW
after the first request, when it is marked `failed` and released.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from sqlalchemy import and_, case, func, or_, select, update

from mailworker.db.engine import session_scope
from mailworker.db.models import MailAccount, Message
from mailworker.settings import Settings

logger = logging.getLogger(__name__)

# action -> the row state it ends in
FINAL_STATE: Final = {"trash": "trashed", "expunge": "expunged", "junk": "junk"}
DELETE_TASK: Final = "mailworker.tasks.delete.delete_messages"
CLASSIFY_TASK: Final = "mailworker.tasks.spam.classify_spam"
SWEEP_LIMIT: Final = 10_000  # claims handed on per sweep; the next sweep takes the rest

# Why a requested message was not acted on (task results carry these per message id).
NOT_FOUND: Final = "not_found"  # no message of this user has the id (or a resync dropped it)
ELSEWHERE: Final = "elsewhere"  # the user's message, but in another account or folder
NOT_PRESENT: Final = "not_present"  # already trashed, expunged or moved to Junk
# States of a row whose message is still in its folder on the server (`skipped`: too large to
# sync, but the user may still delete it).
ON_SERVER: Final = ("present", "skipped")
BUSY: Final = "busy"  # another delete or spam move holds it
RENUMBERED: Final = "renumbered"  # the folder's UIDVALIDITY changed since the row was synced
FAILED: Final = "failed"  # the server refused the action; see messages.action_error


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    uid: int
    uidvalidity: int


def claim(settings: Settings, ids: Collection[uuid.UUID], action: str, token: str) -> list[Claimed]:
    """Claim the rows among `ids` still on the server and free (or already held by `token`)."""
    if not ids:
        return []
    mine = and_(
        Message.action_state == "pending",
        Message.action_task_id == token,
        Message.action == action,
    )
    with session_scope(settings) as session:
        rows = session.execute(
            update(Message)
            .where(Message.id.in_(list(ids)))
            .where(Message.state.in_(ON_SERVER))
            .where(or_(Message.action_state.is_(None), Message.action_state == "failed", mine))
            .values(
                action=action,
                action_state="pending",
                action_task_id=token,
                # A retry keeps the first request's time: the retry window counts from there.
                action_requested_at=case((mine, Message.action_requested_at), else_=func.now()),
                action_attempted_at=func.now(),
                action_error=None,
            )
            .returning(Message.id, Message.uid, Message.uidvalidity)
        ).all()
    return [Claimed(row[0], row[1], row[2]) for row in rows]


def finalize(
    settings: Settings, ids: Collection[uuid.UUID], action: str, token: str, moved_to: str | None
) -> set[uuid.UUID]:
    """Record the done action on the rows `token` still holds (a sweep may have handed it on)."""
    if not ids:
        return set()
    with session_scope(settings) as session:
        done = session.scalars(
            update(Message)
            .where(Message.id.in_(list(ids)))
            .where(Message.state.in_(ON_SERVER))
            .where(Message.action_task_id == token)
            .where(Message.action == action)
            # pending, or failed by the window while this attempt was acting: the server moved it.
            .where(Message.action_state.is_not(None))
            .values(
                state=FINAL_STATE[action],
                moved_to=moved_to,
                state_changed_at=func.now(),
                action_state=None,
                action_error=None,
            )
            .returning(Message.id)
        ).all()
    return set(done)


def release(
    settings: Settings, ids: Collection[uuid.UUID], token: str, error: str, *, failed: bool
) -> None:
    """Give up `token`'s claims: `failed` (an operator looks) or simply released, with `error`."""
    if not ids:
        return
    with session_scope(settings) as session:
        session.execute(
            update(Message)
            .where(Message.id.in_(list(ids)))
            .where(Message.action_task_id == token)
            .where(Message.action_state == "pending")
            .values(action_state="failed" if failed else None, action_error=error[:2000])
        )


def done_before(message: Message, action: str, token: str) -> bool:
    """An earlier attempt of this same task already finished the action on this row."""
    return message.state == FINAL_STATE[action] and message.action_task_id == token


def why_not_claimed(settings: Settings, ids: Collection[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The reason each row in `ids` could not be claimed (or finalized), read now."""
    if not ids:
        return {}
    with session_scope(settings) as session:
        rows = session.execute(
            select(Message.id, Message.state).where(Message.id.in_(list(ids)))
        ).all()
    found = {row[0]: BUSY if row[1] in ON_SERVER else NOT_PRESENT for row in rows}
    return {message_id: found.get(message_id, NOT_FOUND) for message_id in ids}


@dataclass(frozen=True)
class _Resubmission:
    task_name: str
    task_id: str
    args: list[object]
    kwargs: Mapping[str, object]
    messages: int


def sweep_message_actions(settings: Settings) -> dict[str, int]:
    """Fail claims older than the retry window; hand the other abandoned ones to a new task.

    A claim counts as abandoned when no attempt touched it for MAILWORKER_STALE_AFTER: a running
    attempt re-claims (touches) its rows when it starts, runs shorter than the hard time limit,
    and a retry waits less than the visibility timeout, both below STALE_AFTER. Handing a claim
    on moves its token to the new task id first, so a late attempt of the old task finds its
    claim gone and acts on nothing.
    """
    stale = timedelta(seconds=settings.stale_after)
    window = timedelta(seconds=settings.action_retry_window)
    abandoned = and_(
        Message.action_state == "pending", Message.action_attempted_at < func.now() - stale
    )
    with session_scope(settings) as session:
        failed = session.execute(
            update(Message)
            .where(abandoned, Message.action_requested_at < func.now() - window)
            .values(
                action_state="failed",
                action_error="not finished within MAILWORKER_ACTION_RETRY_WINDOW "
                f"({settings.action_retry_window} s); the message was left where it is",
            )
        ).rowcount
        rows = session.execute(
            select(
                Message.id,
                Message.tenant_id,
                MailAccount.user_id,
                Message.account_id,
                Message.folder,
                Message.action,
                Message.action_task_id,
            )
            .join(MailAccount, MailAccount.id == Message.account_id)
            .where(abandoned)
            .order_by(Message.action_task_id)
            .limit(SWEEP_LIMIT)
            .with_for_update(of=Message, skip_locked=True)
        ).all()
        groups: dict[tuple, list[uuid.UUID]] = defaultdict(list)
        for message_id, tenant_id, user_id, account_id, folder, action, task_id in rows:
            if action == "junk":  # one classify_spam per user; it re-scores (same verdicts)
                key: tuple = (task_id, action, tenant_id, user_id)
            else:
                key = (task_id, action, tenant_id, user_id, account_id, folder)
            groups[key].append(message_id)
        resubmissions = []
        for key, ids in groups.items():
            resubmission = _resubmission(key, ids)
            session.execute(
                update(Message)
                .where(Message.id.in_(ids), Message.action_task_id == key[0])
                .values(action_task_id=resubmission.task_id, action_attempted_at=func.now())
            )
            resubmissions.append(resubmission)
    # Published after the commit: a lost publish leaves rows that the next sweep hands on again.
    # The app is imported here, where it publishes: the services stay free of Celery otherwise.
    from mailworker.celery_app import app  # noqa: PLC0415

    published = 0
    for resubmission in resubmissions:
        try:
            app.send_task(
                resubmission.task_name,
                args=resubmission.args,
                kwargs=dict(resubmission.kwargs),
                task_id=resubmission.task_id,
            )
        except Exception as error:  # the next sweep tries again
            logger.warning("resubmitting %s failed: %s", resubmission.task_name, error)
            continue
        published += resubmission.messages
    if failed or resubmissions:
        logger.warning(
            "message actions: %d claim(s) failed after the retry window, %d resubmitted",
            failed,
            published,
        )
    return {"message_actions_failed": failed, "message_actions_resubmitted": published}


def _resubmission(key: tuple, ids: list[uuid.UUID]) -> _Resubmission:
    task_id = str(uuid.uuid4())
    message_ids = [str(message_id) for message_id in ids]
    if key[1] == "junk":
        _, _, tenant_id, user_id = key
        args: list[object] = [str(tenant_id), str(user_id), message_ids]
        return _Resubmission(CLASSIFY_TASK, task_id, args, {}, len(ids))
    _, action, tenant_id, user_id, account_id, folder = key
    return _Resubmission(
        DELETE_TASK,
        task_id,
        [str(tenant_id), str(user_id), str(account_id), message_ids, folder],
        {"permanent": action == "expunge"},
        len(ids),
    )
