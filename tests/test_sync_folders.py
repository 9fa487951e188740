"""sync_mailbox over several folders against the real Dovecot and PostgreSQL: a folder that fails
does not keep the others from syncing, and the task still fails, naming it; a batch that an
earlier run partly stored stores the rest only; a batch whose cursor cannot move stores nothing."""

import dataclasses
import uuid

import pytest
from mailworker.db.locks import advisory_lock, lock_key
from mailworker.db.models import FolderSyncState, Message
from mailworker.errors import PermanentError
from mailworker.mail.imap import ImapSession
from mailworker.services.access import owned_access
from mailworker.services.sync import sync_account
from mailworker.settings import load_settings
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import DBAPIError
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


def test_a_batch_partly_stored_before_stores_only_the_rest(
    default_env, make_account, dovecot, db_engine
):
    """One multi-row INSERT per batch: the rows an earlier run stored are left alone, the others
    stored, and only those are counted and queued for classification."""
    settings = load_settings(default_env)
    account = make_account()
    for number in range(1, 5):
        dovecot.deliver(account.address, f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))
    queued: list[uuid.UUID] = []

    def classify(_tenant: uuid.UUID, _user: uuid.UUID, ids: list[uuid.UUID]) -> None:
        queued.extend(ids)

    assert sync_account(settings, access, ["INBOX"], classify=classify)["stored"] == 4
    first = stored(db_engine, account.account_id)
    # As if the sync had died after storing UIDs 1 and 3 of the batch, before its commit moved
    # the cursor: a re-run fetches the whole batch again.
    with Session(db_engine) as session, session.begin():
        session.execute(delete(Message).where(Message.id.in_([first[2], first[4]])))
        session.execute(
            update(FolderSyncState)
            .where(FolderSyncState.account_id == account.account_id)
            .values(last_uid=0)
        )
    queued.clear()

    result = sync_account(settings, access, ["INBOX"], classify=classify)

    again = stored(db_engine, account.account_id)
    assert (result["stored"], result["classify_queued"]) == (2, 2)
    assert sorted(again) == [1, 2, 3, 4]
    assert (again[1], again[3]) == (first[1], first[3])  # left alone
    assert sorted(queued) == sorted([again[2], again[4]])


def test_a_batch_whose_cursor_cannot_move_stores_none_of_its_messages(
    default_env, make_account, dovecot, db_engine
):
    """A batch's rows and its cursor commit together: when the cursor's UPDATE fails (here a
    trigger refuses it), the batch's INSERT is rolled back too, and the next sync stores it."""
    settings = load_settings(default_env)
    account = make_account()
    for number in range(1, 4):
        dovecot.deliver(account.address, f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))
    name = f"refuse_cursor_{uuid.uuid4().hex}"
    with db_engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
                "AS $$ BEGIN RAISE EXCEPTION 'cursor refused'; END $$"
            )
        )
        connection.execute(
            text(
                f"CREATE TRIGGER {name} BEFORE UPDATE ON folder_sync_states FOR EACH ROW "
                f"WHEN (OLD.account_id = '{account.account_id}') EXECUTE FUNCTION {name}()"
            )
        )
    try:
        with pytest.raises(DBAPIError, match="cursor refused"):
            sync_account(settings, access, ["INBOX"])
        assert stored(db_engine, account.account_id) == {}
        with Session(db_engine) as session:
            cursor = select(FolderSyncState.last_uid).where(
                FolderSyncState.account_id == account.account_id
            )
            assert session.scalars(cursor).all() == [0]  # created by the first sync, not moved
    finally:
        with db_engine.begin() as connection:
            connection.execute(text(f"DROP TRIGGER {name} ON folder_sync_states"))
            connection.execute(text(f"DROP FUNCTION {name}()"))

    assert sync_account(settings, access, ["INBOX"])["stored"] == 3
    assert sorted(stored(db_engine, account.account_id)) == [1, 2, 3]


def test_the_sync_leaves_new_mail_new_for_the_users_client(
    default_env, make_account, dovecot, db_engine
):
    """The sync opens folders read-only (EXAMINE): the messages it stored are still \\Recent and
    unseen for the next client that opens the folder."""
    settings = load_settings(default_env)
    account = make_account()
    for number in range(1, 4):
        dovecot.deliver(account.address, f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))

    assert sync_account(settings, access, ["INBOX"])["stored"] == 3

    with ImapSession(dovecot.endpoint(account.address)) as client:
        client.select("INBOX")
        _, recent = client._connection().response("RECENT")
        (batch,) = client.fetch_batches(0, 10)
    assert recent == [b"3"]
    assert [message.flags for message in batch] == [(), (), ()]
    assert sorted(stored(db_engine, account.account_id)) == [1, 2, 3]


@pytest.mark.parametrize(
    ("batch_size", "expected"), [(None, ["logout", 5]), (2, [2, 2, "logout", 1])]
)
def test_the_session_logs_out_before_the_last_batch_is_stored(
    default_env, make_account, dovecot, db_engine, monkeypatch, *, batch_size, expected
):
    """The server's CPU per session grows with the time it stays open: the sync logs out once it
    holds the last batch, then stores it (None: the shipped batch size, one batch)."""
    settings = load_settings(default_env)
    if batch_size is not None:
        settings = dataclasses.replace(settings, sync_batch_size=batch_size)
    account = make_account()
    for number in range(1, 6):
        dovecot.deliver(account.address, f"Subject: m{number}\r\n\r\nbody {number}\r\n".encode())
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))
    events: list[object] = []
    close = ImapSession.close

    def logout(session: ImapSession) -> None:
        events.append("logout")
        close(session)

    def classify(_tenant: uuid.UUID, _user: uuid.UUID, ids: list[uuid.UUID]) -> None:
        events.append(len(ids))  # after the batch's commit

    monkeypatch.setattr(ImapSession, "close", logout)
    result = sync_account(settings, access, ["INBOX"], classify=classify)

    assert events == expected
    assert (result["stored"], result["folders"][0]["last_uid"]) == (5, 5)
    assert sorted(stored(db_engine, account.account_id)) == [1, 2, 3, 4, 5]


def test_a_sync_while_another_runs_does_not_run_and_says_so(
    default_env, make_account, dovecot, db_engine
):
    """One sync per account at a time (its advisory lock): a second one stores nothing and its
    result says it did not run (apart from `skipped`, a count of oversized messages); once the
    lock is free the next one stores the mail."""
    settings = load_settings(default_env)
    account = make_account()
    dovecot.deliver(account.address, MESSAGE)
    access = owned_access(settings, *(uuid.UUID(value) for value in account.ids))

    with advisory_lock(settings, lock_key("sync", access.account_id)) as held:
        assert held
        result = sync_account(settings, access, ["INBOX"])
    assert result == {"account_id": account.account_id, "not_run": "another sync is running"}
    assert stored(db_engine, account.account_id) == {}

    ran = sync_account(settings, access, ["INBOX"])
    assert (ran["stored"], ran["skipped"], "not_run" in ran) == (1, 0, False)
    assert list(stored(db_engine, account.account_id)) == [1]


def stored(db_engine, account_id: str) -> dict[int, uuid.UUID]:
    with Session(db_engine) as session:
        query = select(Message.uid, Message.id).where(Message.account_id == account_id)
        return {uid: row_id for uid, row_id in session.execute(query)}
