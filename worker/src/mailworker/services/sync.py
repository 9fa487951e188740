"""Incremental IMAP sync of one account into PostgreSQL.

Per folder the cursor is (uidvalidity, last_uid). ImapSession.fetch_batches lists sizes first,
then yields messages in ascending UID order, at most MAILWORKER_SYNC_BATCH_SIZE messages and
MAILWORKER_SYNC_BATCH_BYTES bytes at a time. Each batch is stored and the cursor advanced in one
transaction, so a crash loses at most the batch in flight and a re-run resumes after the last
stored UID; only one batch is held in memory, and its bytes are reserved in the process's
MAILWORKER_MAIL_MEMORY_BUDGET (mail/memory_budget.py) from before its fetch until it is stored.
The unique key (account, folder, uidvalidity, uid) makes a repeated batch store nothing twice.

Under faults: a message the server still lists but did not send (or sent without a body) raises
TransientError after the batch before it is stored, so the cursor never passes a message that
was not stored. A message above MAILWORKER_MAX_MESSAGE_SIZE is never fetched: it is stored as a
`skipped` row (size and flags, no raw) and the cursor moves past it. A changed UIDVALIDITY voids
every UID of the folder: its rows and cursor reset. One sync per account at a time: a
PostgreSQL advisory lock, released by the server if the worker dies; the cursors are read once
it is held, on its connection, since only its holder writes them.

The messages each batch stored (present, in a folder classified automatically) are queued for
classify_spam after the batch's commit, at most CLASSIFY_BATCH ids per task. A publish that
fails (Redis down) is not retried by the sync: the rest of this sync queues nothing, and the
classify sweep (services/spam.py) queues those messages once they are still unscored
MAILWORKER_CLASSIFY_GRACE later. A worker killed between a commit and its publish is covered the
same way.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from mailworker.db.engine import session_scope, transaction_scope
from mailworker.db.locks import lock_key, locked_connection
from mailworker.db.models import FolderSyncState, Message
from mailworker.db.raw_copy import copy_raw
from mailworker.errors import MailworkerError, TransientError
from mailworker.mail.imap import FetchedMessage, ImapSession
from mailworker.mail.memory_budget import budget_for
from mailworker.services.access import AccountAccess
from mailworker.services.parsing import parse_message
from mailworker.services.spam import CLASSIFY_BATCH, Publish, batches, classified_automatically
from mailworker.settings import Settings

logger = logging.getLogger(__name__)
# Above this a message's raw bytes are streamed into its row rather than sent in its INSERT.
STREAMED_RAW_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FolderResult:
    folder: str
    uidvalidity: int
    stored: int
    skipped: int
    last_uid: int
    reset: bool


class _ClassifyQueue:
    """Queues the stored messages of one sync for classification, until a publish fails."""

    def __init__(self, settings: Settings, access: AccountAccess, publish: Publish | None) -> None:
        self.settings = settings
        self.access = access
        self.publish = publish
        self.queued = 0
        self.deferred = 0  # stored, not queued: the classify sweep queues them
        self.failed = False

    def stored(self, folder: str, ids: list[uuid.UUID]) -> None:
        if not ids or not classified_automatically(self.settings, folder):
            return
        if self.publish is None or self.failed:
            self.deferred += len(ids)
            return
        for index, chunk in enumerate(batches(ids)):
            try:
                self.publish(self.access.tenant_id, self.access.user_id, chunk)
            except Exception as error:
                self.failed = True
                self.deferred += len(ids) - index * CLASSIFY_BATCH
                logger.warning(
                    "account %s: queueing classification failed (%s); the classify sweep "
                    "queues what this sync stores once it is unscored after %d s",
                    self.access.account_id,
                    error,
                    self.settings.classify_grace,
                )
                return
            self.queued += len(chunk)


def sync_account(
    settings: Settings,
    access: AccountAccess,
    folders: Sequence[str],
    *,
    classify: Publish | None = None,
) -> dict:
    """Store the new messages of `folders`; `classify` queues what was stored (None: the
    classify sweep does, after its grace)."""
    queue = _ClassifyQueue(settings, access, classify)
    with locked_connection(settings, lock_key("sync", access.account_id)) as locked:
        if locked is None:
            logger.info("account %s: another sync is running, skipped", access.account_id)
            # Not "skipped": a sync that ran counts its oversized messages under that key.
            return {"account_id": str(access.account_id), "not_run": "another sync is running"}
        # Read once the lock is held: only the lock's holder writes them.
        cursors = _cursors(locked, access)
        results: list[FolderResult] = []
        failures: list[MailworkerError] = []
        with ImapSession(access.imap) as imap:
            for number, folder in enumerate(folders, start=1):
                # One folder stuck on a message (or gone) must not keep the others from syncing.
                try:
                    result = _sync_folder(
                        settings,
                        access,
                        imap,
                        folder,
                        queue,
                        locked=locked,
                        known=cursors.get(folder),
                        last_folder=number == len(folders),
                    )
                    results.append(result)
                except MailworkerError as error:
                    logger.warning("account %s folder %r: %s", access.account_id, folder, error)
                    failures.append(error)
    if failures:
        # Transient first: a retry can help those; the others fail the same way each time.
        raise next((f for f in failures if isinstance(f, TransientError)), failures[0])
    return {
        "account_id": str(access.account_id),
        "stored": sum(result.stored for result in results),
        "skipped": sum(result.skipped for result in results),
        "classify_queued": queue.queued,
        "classify_deferred": queue.deferred,  # left to the classify sweep
        "folders": [asdict(result) for result in results],
    }


def _sync_folder(
    settings: Settings,
    access: AccountAccess,
    imap: ImapSession,
    folder: str,
    queue: _ClassifyQueue,
    *,
    locked: Connection,
    known: tuple[int, int] | None,
    last_folder: bool,
) -> FolderResult:
    """`locked`: the sync lock's connection (autocommit); `known`: the folder's cursor
    (uidvalidity, last_uid) as read after the lock was taken, None if it has none;
    `last_folder`: the session is not needed after this folder's last fetch."""
    server = imap.select(folder, readonly=True)  # EXAMINE: the sync only reads (BODY.PEEK[])
    if known is not None and known[0] == server.uidvalidity:
        after_uid, reset = known[1], False
    elif known is None and _new_cursor(locked, access, folder, server.uidvalidity):
        after_uid, reset = 0, False
    else:  # a folder the server renumbered
        after_uid, reset = _cursor(settings, access, folder, server.uidvalidity)
    stored = skipped = 0
    last_uid = after_uid
    batches = imap.fetch_batches(
        after_uid=after_uid,
        batch_size=settings.sync_batch_size,
        batch_bytes=settings.sync_batch_bytes,
        max_size=settings.max_message_size,
        budget=budget_for(settings.mail_memory_budget),
    )
    # Closed on any exit: an error's traceback must not keep the batch and its bytes reserved.
    with contextlib.closing(batches):
        for batch in batches:
            if last_folder and imap.fetched_all:
                # LOGOUT before the last store: the server's CPU per session grows with the
                # time the session stays open (measured with Dovecot: about 4 ms per sync).
                imap.close()
            present, new_skipped = _store_batch(settings, access, folder, server.uidvalidity, batch)
            queue.stored(folder, present)  # after the batch's commit
            stored += len(present)
            skipped += new_skipped
            last_uid = max(last_uid, batch[-1].uid)
            del batch  # hold no batch while the next one is fetched
    if stored == 0:  # one statement: no transaction needed
        locked.execute(_MARK_SYNCED, {"b_account_id": access.account_id, "b_folder": folder})
    logger.info(
        "account %s folder %r: stored %d new message(s), %d too large and skipped, last uid %d%s",
        access.account_id,
        folder,
        stored,
        skipped,
        last_uid,
        " (uidvalidity changed, folder re-read)" if reset else "",
    )
    return FolderResult(folder, server.uidvalidity, stored, skipped, last_uid, reset)


def _cursors(locked: Connection, access: AccountAccess) -> dict[str, tuple[int, int]]:
    """Every folder's cursor of the account: {folder: (uidvalidity, last_uid)}."""
    rows = locked.execute(_CURSORS_OF, {"b_account_id": access.account_id})
    return {folder: (uidvalidity, last_uid) for folder, uidvalidity, last_uid in rows}


def _new_cursor(locked: Connection, access: AccountAccess, folder: str, uidvalidity: int) -> bool:
    """The first sync of `folder`: its state created at UID 0, in one statement (autocommit, on
    the lock's connection). False if the folder has a state after all."""
    created = locked.execute(
        _NEW_CURSOR,
        {
            "account_id": access.account_id,
            "folder": folder,
            "tenant_id": access.tenant_id,
            "uidvalidity": uidvalidity,
            "last_uid": 0,
        },
    )
    return created.rowcount == 1


def _cursor(
    settings: Settings, access: AccountAccess, folder: str, uidvalidity: int
) -> tuple[int, bool]:
    """The UID to continue after, creating or resetting the folder's state."""
    with session_scope(settings) as session:
        state = session.scalar(
            select(FolderSyncState)
            .where(FolderSyncState.account_id == access.account_id)
            .where(FolderSyncState.folder == folder)
            .with_for_update()
        )
        if state is None:
            session.add(
                FolderSyncState(
                    account_id=access.account_id,
                    folder=folder,
                    tenant_id=access.tenant_id,
                    uidvalidity=uidvalidity,
                    last_uid=0,
                )
            )
            return 0, False
        if state.uidvalidity == uidvalidity:
            return state.last_uid, False
        # The server renumbered the folder: every stored UID of it now means nothing.
        session.execute(
            delete(Message)
            .where(Message.account_id == access.account_id)
            .where(Message.folder == folder)
            .where(Message.uidvalidity != uidvalidity)
        )
        state.uidvalidity = uidvalidity
        state.last_uid = 0
        return 0, True


def _store_batch(
    settings: Settings,
    access: AccountAccess,
    folder: str,
    uidvalidity: int,
    batch: list[FetchedMessage],
) -> tuple[list[uuid.UUID], int]:
    """Insert one batch and move the cursor to its last UID, in one transaction.

    Returns the ids of the new messages stored, and how many new ones were skipped (too large).
    """
    inserted: list[str] = []
    present: list[uuid.UUID] = []

    def insert_rows(connection: Connection, rows: list[dict]) -> None:
        if len(rows) == 1:  # the statement whose peak memory for one large row is lowest
            returned = connection.execute(_INSERT, rows[0]).all()
        else:  # a list of rows: SQLAlchemy sends them as one multi-row INSERT
            returned = connection.execute(_INSERT, rows).all()
        # Only the rows not stored by an earlier run come back.
        for row_id, state in returned:
            inserted.append(state)
            if state == "present":
                present.append(row_id)

    with transaction_scope(settings) as connection:
        # One INSERT for several messages, holding at most STREAMED_RAW_BYTES of raw: psycopg2
        # builds a statement in memory with the raw bytes hex-escaped (about 4x their size), so
        # a statement costs what one message sent in its INSERT may, not the whole batch. A
        # larger message is inserted alone, its raw bytes streamed into its row afterwards
        # (db/raw_copy.py).
        group: list[dict] = []
        group_bytes = 0
        for fetched in batch:
            size = len(fetched.raw) if fetched.raw is not None else 0
            if group and (size > STREAMED_RAW_BYTES or group_bytes + size > STREAMED_RAW_BYTES):
                insert_rows(connection, group)
                group, group_bytes = [], 0
            row = _row(access, folder, uidvalidity, fetched)
            if size > STREAMED_RAW_BYTES and fetched.raw is not None:
                row["raw"] = b""
                stored = len(inserted)
                insert_rows(connection, [row])
                if len(inserted) > stored:  # new: its bytes go in now
                    copy_raw(connection, row["id"], fetched.raw)
                continue
            group.append(row)
            group_bytes += size
        if group:
            insert_rows(connection, group)
        connection.execute(
            _ADVANCE_CURSOR,
            {
                "b_account_id": access.account_id,
                "b_folder": folder,
                "b_uidvalidity": uidvalidity,
                "b_last_uid": batch[-1].uid,
            },
        )
    return present, len(inserted) - len(present)


# Built once, as Core statements on the tables: a sync stores every batch with them.
# ON CONFLICT DO NOTHING: a message stored by an earlier run is not stored twice.
_INSERT = (
    insert(Message.__table__)
    .on_conflict_do_nothing(constraint="uq_messages_uid")
    .returning(Message.__table__.c.id, Message.__table__.c.state)
)
_CURSORS = FolderSyncState.__table__
_NEW_CURSOR = insert(_CURSORS).on_conflict_do_nothing()  # the first sync of every folder
_CURSORS_OF = select(_CURSORS.c.folder, _CURSORS.c.uidvalidity, _CURSORS.c.last_uid).where(
    _CURSORS.c.account_id == bindparam("b_account_id")
)
_MARK_SYNCED = (
    update(_CURSORS)
    .where(_CURSORS.c.account_id == bindparam("b_account_id"))
    .where(_CURSORS.c.folder == bindparam("b_folder"))
    .values(synced_at=func.now())
)
# The cursor never moves back (GREATEST), and only for the numbering it was read with.
_ADVANCE_CURSOR = (
    update(_CURSORS)
    .where(_CURSORS.c.account_id == bindparam("b_account_id"))
    .where(_CURSORS.c.folder == bindparam("b_folder"))
    .where(_CURSORS.c.uidvalidity == bindparam("b_uidvalidity"))
    .values(
        last_uid=func.greatest(_CURSORS.c.last_uid, bindparam("b_last_uid")),
        synced_at=func.now(),
    )
)


def _row(access: AccountAccess, folder: str, uidvalidity: int, fetched: FetchedMessage) -> dict:
    row = {
        "id": uuid.uuid4(),
        "tenant_id": access.tenant_id,
        "account_id": access.account_id,
        "folder": folder,
        "uidvalidity": uidvalidity,
        "uid": fetched.uid,
        "size": fetched.size,
        "flags": list(fetched.flags),
    }
    if fetched.raw is None:
        # Larger than MAILWORKER_MAX_MESSAGE_SIZE: recorded with its size, never fetched.
        return {
            **row,
            "message_id": None,
            "subject": "",
            "sender": "",
            "recipients": "",
            "date": None,
            "headers": "",
            "body_text": "",
            "raw": None,
            "state": "skipped",
        }
    parsed = parse_message(fetched.raw)
    return {
        **row,
        "message_id": parsed.message_id,
        "subject": parsed.subject,
        "sender": parsed.sender,
        "recipients": parsed.recipients,
        "date": parsed.date,
        "headers": parsed.headers,
        "body_text": parsed.body_text,
        "raw": fetched.raw,
        "state": "present",
    }
