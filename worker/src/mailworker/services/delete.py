"""Deleting messages the caller saw: move them to Trash (or expunge them), then mark their rows.

The caller names messages by row id, so the task acts on exactly the messages it read: only rows
of the named account and folder that are still `present` are claimed (message_actions.py), and
only claimed UIDs are touched on the server. If the folder's UIDVALIDITY on the server is not the
one the rows were synced under, the UIDs name other messages now: the task refuses and touches
nothing. Every requested id that was not acted on is reported with the reason.

Idempotent: a retry or redelivery re-takes its own claims; moving or expunging UIDs that are
already gone is a no-op on the server; the rows are finalized last.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from mailworker.db.engine import session_scope
from mailworker.errors import InvalidTaskArguments, PermanentError
from mailworker.mail.imap import ImapSession
from mailworker.services import message_actions as actions
from mailworker.services.access import AccountAccess
from mailworker.settings import Settings
from mailworker.tenancy import user_messages

logger = logging.getLogger(__name__)


def delete_messages(
    settings: Settings,
    access: AccountAccess,
    folder: str,
    message_ids: Sequence[uuid.UUID],
    *,
    permanent: bool,
    token: str,
) -> dict:
    """Delete the messages `message_ids` of `folder`; `token` identifies this task's claims."""
    # Deleting from the Trash itself can only mean for good.
    action = "expunge" if permanent or folder == settings.trash_folder else "trash"
    done: set[uuid.UUID] = set()
    skipped: dict[uuid.UUID, str] = {}
    candidates: list[uuid.UUID] = []
    with session_scope(settings) as session:
        found = {
            message.id: message
            for message, _ in user_messages(session, access.tenant_id, access.user_id, message_ids)
        }
    for message_id in message_ids:
        message = found.get(message_id)
        if message is None:
            skipped[message_id] = actions.NOT_FOUND
        elif message.account_id != access.account_id or message.folder != folder:
            skipped[message_id] = actions.ELSEWHERE
        elif actions.done_before(message, action, token):
            done.add(message_id)
        elif message.state not in actions.ON_SERVER:
            skipped[message_id] = actions.NOT_PRESENT
        else:
            candidates.append(message_id)
    claimed = actions.claim(settings, candidates, action, token)
    skipped.update(actions.why_not_claimed(settings, set(candidates) - {c.id for c in claimed}))
    if claimed:
        _act(settings, access, folder, action, claimed, token=token)
        moved_to = settings.trash_folder if action == "trash" else None
        ids = {item.id for item in claimed}
        finalized = actions.finalize(settings, ids, action, token, moved_to)
        done |= finalized
        skipped.update(actions.why_not_claimed(settings, ids - finalized))
    state = actions.FINAL_STATE[action]
    logger.info(
        "account %s folder %r: %s %d of %d message(s)",
        access.account_id,
        folder,
        state,
        len(done),
        len(message_ids),
    )
    return {
        "account_id": str(access.account_id),
        "folder": folder,
        "action": state,
        "requested": len(message_ids),
        "marked": len(done),
        "done": [str(message_id) for message_id in message_ids if message_id in done],
        "not_touched": {str(message_id): reason for message_id, reason in skipped.items()},
    }


def _act(
    settings: Settings,
    access: AccountAccess,
    folder: str,
    action: str,
    claimed: list[actions.Claimed],
    *,
    token: str,
) -> None:
    """The IMAP side for the claimed rows. A transient error keeps the claims (retried, or
    handed on by the sweep); a refusal gives them up."""
    ids = [item.id for item in claimed]
    try:
        with ImapSession(access.imap) as imap:
            server = imap.select(folder)
            stale = sorted({item.uidvalidity for item in claimed} - {server.uidvalidity})
            if stale:
                raise InvalidTaskArguments(
                    f"folder {folder!r} was renumbered (UIDVALIDITY {stale[0]} -> "
                    f"{server.uidvalidity}) since these messages were synced; nothing was "
                    "deleted: sync the folder and pick the messages again"
                )
            uids = [item.uid for item in claimed]
            if action == "expunge":
                imap.expunge(uids)
            else:
                imap.move(uids, settings.trash_folder)
    except InvalidTaskArguments as error:
        actions.release(settings, ids, token, str(error), failed=False)
        raise
    except PermanentError as error:
        actions.release(settings, ids, token, str(error), failed=True)
        raise
