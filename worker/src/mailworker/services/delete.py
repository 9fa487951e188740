"""Deleting messages: move them to Trash (or expunge them) over IMAP, then mark their rows.

Idempotent: the IMAP side first (moving or expunging UIDs that are already gone is a no-op),
the rows second, so a redelivery after a crash in between simply finishes the marking.
UIDs only mean something under the UIDVALIDITY they were read with: if the folder was
renumbered since the last sync, nothing is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import func, select, update

from mailworker.db.engine import session_scope
from mailworker.db.models import FolderSyncState, Message
from mailworker.errors import PermanentError
from mailworker.mail.imap import ImapSession
from mailworker.services.access import AccountAccess
from mailworker.settings import Settings

logger = logging.getLogger(__name__)


def delete_messages(
    settings: Settings,
    access: AccountAccess,
    folder: str,
    uids: Sequence[int],
    *,
    permanent: bool,
) -> dict:
    # Deleting from the Trash itself can only mean for good.
    expunge = permanent or folder == settings.trash_folder
    known_uidvalidity = _known_uidvalidity(settings, access, folder)
    with ImapSession(access.imap) as imap:
        server = imap.select(folder)
        if known_uidvalidity is not None and known_uidvalidity != server.uidvalidity:
            raise PermanentError(
                f"folder {folder!r} was renumbered (UIDVALIDITY {known_uidvalidity} -> "
                f"{server.uidvalidity}) since the last sync; sync it and pick the messages again"
            )
        if expunge:
            imap.expunge(uids)
        else:
            imap.move(uids, settings.trash_folder)
    state = "expunged" if expunge else "trashed"
    with session_scope(settings) as session:
        marked = session.execute(
            update(Message)
            .where(Message.account_id == access.account_id)
            .where(Message.tenant_id == access.tenant_id)
            .where(Message.folder == folder)
            .where(Message.uidvalidity == server.uidvalidity)
            .where(Message.uid.in_(list(uids)))
            .where(Message.state == "present")
            .values(
                state=state,
                moved_to=None if expunge else settings.trash_folder,
                state_changed_at=func.now(),
            )
        ).rowcount
    logger.info(
        "account %s folder %r: %s %d uid(s), %d row(s) marked",
        access.account_id,
        folder,
        state,
        len(uids),
        marked,
    )
    return {
        "account_id": str(access.account_id),
        "folder": folder,
        "action": state,
        "uids": len(uids),
        "marked": marked,
    }


def _known_uidvalidity(settings: Settings, access: AccountAccess, folder: str) -> int | None:
    with session_scope(settings) as session:
        return session.scalar(
            select(FolderSyncState.uidvalidity)
            .where(FolderSyncState.account_id == access.account_id)
            .where(FolderSyncState.folder == folder)
        )
