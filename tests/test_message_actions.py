"""Deletes and spam moves act only on the messages the caller saw, never race each other into a
database that disagrees with the server, and an interrupted one is finished by the sweep.

Against the real Dovecot and PostgreSQL, at the application's default settings (the services
are called in this process with those settings, or run by a worker started with them).
"""

import imaplib
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from mailworker.db.models import MailAccount, Message, TaskAttempt
from mailworker.errors import TransientError
from mailworker.services import message_actions
from mailworker.services.access import owned_access
from mailworker.services.delete import delete_messages
from mailworker.services.spam import classify
from mailworker.services.sync import sync_account
from mailworker.settings import Settings, load_settings
from mailworker.spam.rules import score_message
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tests.fixtures.servers import celery_client, free_port, wait_until

pytestmark = pytest.mark.slow

DELETE = "mailworker.tasks.delete.delete_messages"
CLEANUP = "mailworker.tasks.periodic.cleanup_stale_tasks"

# What app_env shortens for the tests; without them the application's defaults apply.
SHORTENED = {
    "MAILWORKER_CONCURRENCY",
    "MAILWORKER_TIME_LIMIT",
    "MAILWORKER_SOFT_TIME_LIMIT",
    "MAILWORKER_VISIBILITY_TIMEOUT",
    "MAILWORKER_BROKER_LEASE_INTERVAL",
    "MAILWORKER_BROKER_RESTORE_INTERVAL",
    "MAILWORKER_STALE_AFTER",
    "MAILWORKER_RETRY_BACKOFF_BASE",
    "MAILWORKER_RETRY_BACKOFF_MAX",
    "MAILWORKER_MAX_RETRIES",
    "MAILWORKER_SOFT_SHUTDOWN_TIMEOUT",
    "MAILWORKER_IMAP_TIMEOUT",
    "MAILWORKER_SMTP_TIMEOUT",
    "MAILWORKER_SYNC_BATCH_SIZE",
    "MAILWORKER_HEALTH_TIMEOUT",
}


@pytest.fixture
def default_env(isolated_env: dict[str, str]) -> dict[str, str]:
    """The test servers, on broker databases of their own, at the application's defaults."""
    return {name: value for name, value in isolated_env.items() if name not in SHORTENED}


@pytest.fixture
def settings(default_env: dict[str, str], migrated_db: str) -> Settings:
    loaded = load_settings(default_env)
    assert (loaded.stale_after, loaded.action_retry_window) == (7200, 86400)
    return loaded


@pytest.fixture(scope="module")
def client(app_env, shared_worker):
    return celery_client(app_env)


def spam(number: int) -> bytes:
    return (
        f"From: Prize Office <winner@lottery.example>\r\nTo: someone@tenant-a.test\r\n"
        f"Subject: YOU HAVE WON THE LOTTERY {number}\r\nMessage-ID: <s{number}@lottery.example>"
        "\r\n\r\nDear friend, click here to claim your prize by wire transfer.\r\n"
    ).encode()


def plain(subject: str) -> bytes:
    return f"From: a@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def rows(db_engine, account_id: str, folder: str = "INBOX") -> list[Message]:
    with Session(db_engine) as session:
        query = select(Message).where(Message.account_id == account_id, Message.folder == folder)
        return list(session.scalars(query.order_by(Message.uid)))


def imap_login(dovecot, address: str) -> imaplib.IMAP4:
    endpoint = dovecot.endpoint(address)
    imap = imaplib.IMAP4(endpoint.host, endpoint.port)
    imap.starttls(endpoint.tls_context())
    imap.login(endpoint.username, endpoint.password)
    return imap


def recreate_folder(dovecot, address: str, folder: str, names: list[str]) -> None:
    """(Re)create `folder` holding `names`; a recreated folder gets a new UIDVALIDITY."""
    imap = imap_login(dovecot, address)
    imap.delete(folder)  # NO when it does not exist yet; fine
    imap.create(folder)
    for name in names:
        imap.append(folder, None, None, plain(name))
    imap.logout()


def sync(settings: Settings, account, *folders: str) -> None:
    access = owned_access(settings, *map(uuid.UUID, account.ids))
    sync_account(settings, access, list(folders or ["INBOX"]))


def run_task(client, name: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    result = client.send_task(name, args=list(args), kwargs=kwargs)
    return result, result.get(timeout=60, propagate=False)


def test_renumbered_folder_is_refused_and_nothing_expunged(
    client, settings, make_account, dovecot, db_engine
):
    account = make_account()
    recreate_folder(dovecot, account.address, "Archive", ["old one", "old two"])
    sync(settings, account, "Archive")
    seen = [str(m.id) for m in rows(db_engine, account.account_id, "Archive")]
    assert len(seen) == 2

    time.sleep(1.1)  # Dovecot derives a new mailbox's UIDVALIDITY from the clock
    recreate_folder(dovecot, account.address, "Archive", ["new one", "new two"])
    # Not synced since: the rows still carry the old UIDVALIDITY, whose UIDs 1 and 2 now
    # name the new messages.
    result, error = run_task(client, DELETE, *account.ids, seen, "Archive", permanent=True)
    assert result.state == "FAILURE"
    assert type(error).__name__ == "InvalidTaskArguments", repr(error)
    assert "was renumbered" in str(error)
    with Session(db_engine) as session:
        attempts = session.scalars(select(TaskAttempt).where(TaskAttempt.task_id == result.id))
        assert [(a.state, a.retries) for a in attempts] == [("rejected", 0)]
    assert dovecot.subjects(account.address, "Archive") == ["new one", "new two"]
    assert [(m.state, m.action_state) for m in rows(db_engine, account.account_id, "Archive")] == [
        ("present", None),
        ("present", None),
    ]

    # Synced again: the old rows are gone, so their ids name nothing and nothing is deleted.
    sync(settings, account, "Archive")
    result, value = run_task(client, DELETE, *account.ids, seen, "Archive", permanent=True)
    assert result.successful(), value
    assert value["marked"] == 0
    assert value["not_touched"] == dict.fromkeys(seen, "not_found")
    assert dovecot.subjects(account.address, "Archive") == ["new one", "new two"]


def test_spam_in_a_renumbered_folder_is_scored_but_not_moved(
    settings, make_account, dovecot, db_engine
):
    account = make_account()
    imap = imap_login(dovecot, account.address)
    imap.create("Archive")
    for number in range(2):
        imap.append("Archive", None, None, spam(number))
    imap.logout()
    sync(settings, account, "Archive")
    seen = [m.id for m in rows(db_engine, account.account_id, "Archive")]
    time.sleep(1.1)  # a new UIDVALIDITY
    recreate_folder(dovecot, account.address, "Archive", ["new one", "new two"])

    tenant, user = uuid.UUID(account.tenant_id), uuid.UUID(account.user_id)
    value = classify(settings, tenant, user, seen, token="renumbered-spam")
    assert (value["classified"], value["spam"], value["moved_to_junk"]) == (2, 2, 0)
    assert value["not_moved"] == {str(i): "renumbered" for i in seen}
    assert dovecot.subjects(account.address, "Archive") == ["new one", "new two"]
    assert dovecot.mailbox(account.address, "Junk") == []
    after = rows(db_engine, account.account_id, "Archive")
    assert [(m.is_spam, m.state, m.action_state) for m in after] == [(True, "present", None)] * 2


def test_ids_of_another_account_or_folder_are_untouched_and_reported(
    client, settings, make_account, dovecot, db_engine
):
    owner, other = make_account(), make_account()
    for account in (owner, other):
        for name in ("first", "second"):
            dovecot.deliver(account.address, plain(name))
        sync(settings, account)
    mine = [str(m.id) for m in rows(db_engine, owner.account_id)]
    theirs = [str(m.id) for m in rows(db_engine, other.account_id)]
    unknown = str(uuid.uuid4())

    result, value = run_task(client, DELETE, *owner.ids, [mine[0], *theirs, unknown])
    assert result.successful(), value
    assert (value["action"], value["marked"], value["done"]) == ("trashed", 1, [mine[0]])
    assert value["not_touched"] == {
        theirs[0]: "not_found",
        theirs[1]: "not_found",
        unknown: "not_found",
    }
    assert dovecot.subjects(owner.address, "Trash") == ["first"]
    assert dovecot.subjects(other.address) == ["first", "second"]
    assert [m.state for m in rows(db_engine, other.account_id)] == ["present", "present"]

    # Deleting it again: already done, reported, nothing else touched.
    result, value = run_task(client, DELETE, *owner.ids, [mine[0]])
    assert (value["marked"], value["not_touched"]) == (0, {mine[0]: "not_present"})


def test_folder_never_synced_acts_on_nothing(client, settings, make_account, dovecot, db_engine):
    account = make_account()
    dovecot.deliver(account.address, plain("in the inbox"))
    sync(settings, account)
    recreate_folder(dovecot, account.address, "Archive", ["archived one", "archived two"])
    inbox_ids = [str(m.id) for m in rows(db_engine, account.account_id)]

    # The INBOX row's UID is 1, as is the first Archive message's; Archive was never synced.
    result, value = run_task(client, DELETE, *account.ids, inbox_ids, "Archive", permanent=True)
    assert result.successful(), value
    assert (value["marked"], value["not_touched"]) == (0, dict.fromkeys(inbox_ids, "elsewhere"))
    assert dovecot.subjects(account.address, "Archive") == ["archived one", "archived two"]
    assert dovecot.subjects(account.address) == ["in the inbox"]
    assert rows(db_engine, account.account_id, "Archive") == []


def test_delete_and_spam_racing_leave_database_and_server_in_agreement(
    settings, make_account, dovecot, db_engine
):
    account = make_account()
    for number in range(8):
        dovecot.deliver(account.address, spam(number))
    sync(settings, account)
    ids = [m.id for m in rows(db_engine, account.account_id)]
    access = owned_access(settings, *map(uuid.UUID, account.ids))
    tenant, user = uuid.UUID(account.tenant_id), uuid.UUID(account.user_id)
    start = threading.Barrier(2)
    outcomes: dict[str, Any] = {}

    def race(name: str, action: Callable[[], dict]) -> None:
        start.wait()
        try:
            outcomes[name] = action()
        except Exception as error:  # reported by the assertion below
            outcomes[name] = error

    def delete() -> dict:
        return delete_messages(
            settings, access, "INBOX", ids[:6], permanent=False, token="race-delete"
        )

    def move_spam() -> dict:
        return classify(settings, tenant, user, ids[2:], token="race-spam")

    threads = [
        threading.Thread(target=race, args=("delete", delete)),
        threading.Thread(target=race, args=("spam", move_spam)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    deleted, classified = outcomes["delete"], outcomes["spam"]
    assert isinstance(deleted, dict), deleted
    assert isinstance(classified, dict), classified

    by_state: dict[str, list[str]] = {"present": [], "trashed": [], "junk": []}
    for row in rows(db_engine, account.account_id):
        assert row.action_state is None, (row.uid, row.action_state, row.action_error)
        by_state[row.state].append(row.subject)
    # Every message is exactly where its row says: no row says Junk for a message in Trash.
    assert sorted(by_state["present"]) == dovecot.subjects(account.address)
    assert sorted(by_state["trashed"]) == dovecot.subjects(account.address, "Trash")
    assert sorted(by_state["junk"]) == dovecot.subjects(account.address, "Junk")
    assert by_state["present"] == []
    # Each side reports what it did and, for the overlap it lost, that it did not touch it.
    overlap = {str(i) for i in ids[2:6]}
    # `not_present` when the other one had already finished when this one looked.
    lost = {"busy", "not_present"}
    lost_by_delete = {i for i, why in deleted["not_touched"].items() if why in lost}
    lost_by_spam = {i for i, why in classified["not_moved"].items() if why in lost}
    assert lost_by_delete | lost_by_spam == overlap
    assert not lost_by_delete & lost_by_spam
    assert deleted["marked"] + classified["moved_to_junk"] == 8
    assert deleted["marked"] == len(by_state["trashed"])


@pytest.fixture
def default_client(default_env: dict[str, str], start_worker) -> Any:
    """A worker and a producer at the application's defaults."""
    start_worker(default_env)
    return celery_client(default_env)


def test_interrupted_delete_is_finished_by_the_sweep(
    default_client, settings, make_account, dovecot, db_engine
):
    account = make_account()
    for name in ("one", "two", "three"):
        dovecot.deliver(account.address, plain(name))
    sync(settings, account)
    one, two, three = (m.id for m in rows(db_engine, account.account_id))

    # The IMAP server is unreachable when the delete runs: its claims stay, its retries end.
    set_imap_port(db_engine, account, free_port())
    access = owned_access(settings, *map(uuid.UUID, account.ids))
    with pytest.raises(TransientError):
        delete_messages(settings, access, "INBOX", [one, two], permanent=False, token="gone-task")
    assert {m.action_state for m in rows(db_engine, account.account_id)[:2]} == {"pending"}
    set_imap_port(db_engine, account, dovecot.port)
    # As if an earlier attempt had moved "one" and died before it marked the row.
    imap = imap_login(dovecot, account.address)
    imap.select("INBOX")
    imap.uid("MOVE", str(rows(db_engine, account.account_id)[0].uid), "Trash")
    imap.logout()
    # A third claim whose first request is older than the retry window: given up, visibly.
    message_actions.claim(settings, [three], "trash", "older-task")
    hours_ago(db_engine, [one, two], requested=3, attempted=3)
    hours_ago(db_engine, [three], requested=25, attempted=3)

    result, summary = run_task(default_client, CLEANUP)
    assert result.successful(), summary
    assert (summary["message_actions_resubmitted"], summary["message_actions_failed"]) == (2, 1)
    wait_until(
        lambda: (
            [m.state for m in rows(db_engine, account.account_id)]
            == ["trashed", "trashed", "present"]
        ),
        60,
        "the resubmitted delete to finish",
    )
    assert dovecot.subjects(account.address, "Trash") == ["one", "two"]
    assert dovecot.subjects(account.address) == ["three"]
    *finished, given_up = rows(db_engine, account.account_id)
    assert [(m.action_state, m.moved_to) for m in finished] == [(None, "Trash"), (None, "Trash")]
    assert given_up.action_state == "failed"
    assert "MAILWORKER_ACTION_RETRY_WINDOW" in (given_up.action_error or "")
    # The failed claim is released: a new delete acts on it.
    access = owned_access(settings, *map(uuid.UUID, account.ids))
    value = delete_messages(settings, access, "INBOX", [three], permanent=False, token="new-task")
    assert value["done"] == [str(three)]
    assert dovecot.subjects(account.address, "Trash") == ["one", "three", "two"]


def set_imap_port(db_engine, account, port: int) -> None:
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(MailAccount).where(MailAccount.id == account.account_id).values(imap_port=port)
        )


def hours_ago(db_engine, ids: list[uuid.UUID], *, requested: int, attempted: int) -> None:
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(Message)
            .where(Message.id.in_(ids))
            .values(
                action_requested_at=func.now() - timedelta(hours=requested),
                action_attempted_at=func.now() - timedelta(hours=attempted),
            )
        )


def test_classify_holds_one_raw_message_at_a_time(settings, make_account, db_engine):
    account = make_account()
    body = b"ham and eggs for lunch today\r\n" * 36_000  # about 1 MB
    raws = [b"From: a@example.org\r\nSubject: minutes %d\r\n\r\n" % n + body for n in range(40)]
    with Session(db_engine) as session, session.begin():
        for uid, raw in enumerate(raws, start=1):
            session.add(
                Message(
                    tenant_id=uuid.UUID(account.tenant_id),
                    account_id=uuid.UUID(account.account_id),
                    folder="INBOX",
                    uidvalidity=1,
                    uid=uid,
                    raw=raw,
                    body_text=body.decode(),  # as sync stores it: as large as the raw message
                    size=len(raw),
                    state="present",
                )
            )
    ids = [m.id for m in rows(db_engine, account.account_id)]
    tenant, user = uuid.UUID(account.tenant_id), uuid.UUID(account.user_id)

    tracemalloc.start()
    try:
        score_message(raws[0], recipient=account.address)
        one_message = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        value = classify(settings, tenant, user, ids, token="memory")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (value["classified"], value["spam"]) == (40, 0)
    # Loading all 40 raw messages (or their texts) at once would add about 40 MB.
    assert peak < one_message + 8 * 2**20, (peak, one_message)
