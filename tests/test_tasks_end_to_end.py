"""Each task end to end through a real worker process, Redis, PostgreSQL, aiosmtpd and Dovecot:
send a message over SMTP, see it arrive over IMAP, sync it, classify it, delete it."""

import imaplib
import time
from dataclasses import dataclass
from typing import Any

import pytest
from mailworker.db.models import FolderSyncState, Message, SentMessage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.fixtures.outbox import submit
from tests.fixtures.servers import celery_client, wait_until

pytestmark = pytest.mark.slow

SEND = "mailworker.tasks.send.send_email"
SYNC = "mailworker.tasks.sync.sync_mailbox"
CLASSIFY = "mailworker.tasks.spam.classify_spam"
DELETE = "mailworker.tasks.delete.delete_messages"


HAM = {"subject": "Minutes of Monday", "body": "See you at ten."}
SPAM = {
    "subject": "YOU HAVE WON THE LOTTERY",
    "body": "Dear friend, click here to claim your prize by wire transfer.",
}


@pytest.fixture(scope="module")
def client(app_env, shared_worker):
    return celery_client(app_env)


@dataclass(frozen=True)
class Mail:
    dovecot: Any
    smtp: Any


@pytest.fixture
def mail(dovecot, smtp_server) -> Mail:
    return Mail(dovecot, smtp_server)


def run(client, name: str, *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
    result = client.send_task(name, args=list(args), kwargs=kwargs)
    value = result.get(timeout=timeout, propagate=False)
    return result, value


def run_ok(client, name: str, *args: Any, **kwargs: Any) -> Any:
    result, value = run(client, name, *args, **kwargs)
    assert result.successful(), f"{name} failed: {value!r}"
    return value


def messages(db_engine, account_id: str, **where: Any) -> list[Message]:
    with Session(db_engine) as session:
        query = select(Message).where(Message.account_id == account_id)
        for name, value in where.items():
            query = query.where(getattr(Message, name) == value)
        return list(session.scalars(query.order_by(Message.uid)))


def test_send_arrives_sync_classify_delete(client, app_settings, make_account, mail, db_engine):
    alice = make_account()
    bob = make_account()

    ham_id = send_and_check_delivery(client, app_settings, alice, bob, mail)
    spam_id = send(client, app_settings, alice, {**SPAM, "to": [bob.address]})

    # arrives over IMAP, synced into PostgreSQL; a re-run stores no duplicates
    assert run_ok(client, SYNC, *bob.ids)["stored"] == 2
    stored = messages(db_engine, bob.account_id)
    assert [m.message_id for m in stored] == [ham_id, spam_id]
    assert stored[0].subject == HAM["subject"]
    assert HAM["body"] in stored[0].body_text
    assert stored[0].raw.startswith(b"Return-Path:")
    assert run_ok(client, SYNC, *bob.ids)["stored"] == 0
    assert len(messages(db_engine, bob.account_id)) == 2

    # classified without being asked (the sync queued it): the spam goes to Junk, the ham stays
    wait_until(
        lambda: [m.state for m in messages(db_engine, bob.account_id)] == ["present", "junk"],
        30,
        "the sync's classification",
    )
    ham_row, spam_row = messages(db_engine, bob.account_id)
    assert (ham_row.is_spam, ham_row.state) == (False, "present")
    assert (spam_row.is_spam, spam_row.state, spam_row.moved_to) == (True, "junk", "Junk")
    assert spam_row.spam_score >= 5.0
    assert "subject_keywords" in spam_row.spam_reasons
    assert [m.message_id for m in mail.dovecot.mailbox(bob.address, "Junk")] == [spam_id]
    assert [m.message_id for m in mail.dovecot.mailbox(bob.address)] == [ham_id]
    # classifying again by hand: same verdicts, and the spam is already in Junk, not moved twice
    value = run_ok(client, CLASSIFY, bob.tenant_id, bob.user_id, [str(m.id) for m in stored])
    assert (value["classified"], value["spam"], value["moved_to_junk"]) == (2, 1, 0)
    assert (value["already_in_junk"], value["not_moved"]) == (1, {})
    assert [m.message_id for m in mail.dovecot.mailbox(bob.address, "Junk")] == [spam_id]

    # delete: the ham goes to Trash and its row says so
    value = run_ok(client, DELETE, *bob.ids, [str(ham_row.id)])
    assert (value["action"], value["marked"]) == ("trashed", 1)
    assert (value["done"], value["not_touched"]) == ([str(ham_row.id)], {})
    assert mail.dovecot.mailbox(bob.address) == []
    assert [m.message_id for m in mail.dovecot.mailbox(bob.address, "Trash")] == [ham_id]
    (ham_row,) = messages(db_engine, bob.account_id, uid=ham_row.uid)
    assert (ham_row.state, ham_row.moved_to) == ("trashed", "Trash")

    # submitting the same message again does not queue it twice; running its task again
    # returns the stored outcome without SMTP
    entry, result = submit(
        app_settings, client, alice, {**HAM, "to": [bob.address], "message_id": ham_id}
    )
    assert (entry.status, entry.queued, result) == ("sent", False, None)
    value = run_ok(client, SEND, *alice.ids, str(entry.outbox_id))
    assert (value["status"], value["duplicate"]) == ("sent", True)
    assert len(mail.smtp.delivered(ham_id)) == 1
    with Session(db_engine) as session:
        count = session.scalar(
            select(func.count()).select_from(SentMessage).where(SentMessage.message_id == ham_id)
        )
    assert count == 1


def send(client, settings, sender, message: dict) -> str:
    _, result = submit(settings, client, sender, message)
    value = result.get(timeout=30, propagate=False)
    assert result.successful(), f"send failed: {value!r}"
    return value["message_id"]


def send_and_check_delivery(client, settings, sender, recipient, mail) -> str:
    """Send the ham over SMTP and check what the server, the ledger and Sent saw."""
    entry, result = submit(settings, client, sender, {**HAM, "to": [recipient.address]})
    assert entry.published
    value = result.get(timeout=30, propagate=False)
    assert result.successful(), value
    assert (value["status"], value["accepted"], value["refused"]) == ("sent", 1, 0)
    assert value["copied_to_sent"] is True
    message_id = value["message_id"]
    # No message_id given: one is made at submit, in the sender's domain, and stored.
    assert message_id == entry.message_id
    assert message_id.endswith(f"@{sender.address.rpartition('@')[2]}>")
    assert value["outbox_id"] == str(entry.outbox_id)
    assert len(mail.smtp.delivered(message_id)) == 1
    assert [m.message_id for m in mail.dovecot.mailbox(sender.address, "Sent")] == [message_id]
    return message_id


def test_permanent_delete_expunges(client, make_account, dovecot, db_engine):
    carol = make_account()
    for number in range(3):
        raw = f"From: x@example.org\r\nTo: {carol.address}\r\nSubject: n{number}\r\n\r\nhi\r\n"
        dovecot.deliver(carol.address, raw.encode())
    result, value = run(client, SYNC, *carol.ids)
    assert result.successful(), value
    ids = [str(m.id) for m in messages(db_engine, carol.account_id)]
    result, value = run(client, DELETE, *carol.ids, ids[:2], permanent=True)
    assert result.successful(), value
    assert (value["action"], value["marked"]) == ("expunged", 2)
    assert [m.raw.count(b"Subject: n2") for m in dovecot.mailbox(carol.address)] == [1]
    assert dovecot.mailbox(carol.address, "Trash") == []
    states = [m.state for m in messages(db_engine, carol.account_id)]
    assert states == ["expunged", "expunged", "present"]


def test_sync_in_batches_resumes_after_the_last_uid(client, make_account, dovecot, db_engine):
    dave = make_account()
    for number in range(12):  # batch size is 5 in the tests
        dovecot.deliver(dave.address, f"Subject: m{number}\r\n\r\nbody\r\n".encode())
    result, value = run(client, SYNC, *dave.ids)
    assert result.successful(), value
    assert value["stored"] == 12
    dovecot.deliver(dave.address, b"Subject: late\r\n\r\nbody\r\n")
    result, value = run(client, SYNC, *dave.ids)
    assert value["stored"] == 1
    with Session(db_engine) as session:
        state = session.get(FolderSyncState, (dave.account_id, "INBOX"))
        assert state is not None
        assert state.last_uid == 13
    assert [m.subject for m in messages(db_engine, dave.account_id)][-1] == "late"


def test_uidvalidity_change_resets_the_folder(fleet, make_account, dovecot):
    account = make_account()
    endpoint = dovecot.endpoint(account.address)

    def recreate_archive(subjects: list[str]) -> None:
        imap = imaplib.IMAP4(endpoint.host, endpoint.port)
        imap.starttls(endpoint.tls_context())
        imap.login(endpoint.username, endpoint.password)
        imap.delete("Archive")  # NO when it does not exist yet; fine
        imap.create("Archive")
        for subject in subjects:
            imap.append("Archive", None, None, f"Subject: {subject}\r\n\r\nbody\r\n".encode())
        imap.logout()

    recreate_archive(["old one", "old two"])
    fleet.configure(MAILWORKER_SYNC_FOLDERS="INBOX,Archive")
    fleet.start_worker()
    client = fleet.client()
    first = run_ok(client, SYNC, *account.ids)
    (archive,) = [f for f in first["folders"] if f["folder"] == "Archive"]
    assert (archive["stored"], archive["reset"]) == (2, False)

    time.sleep(1.1)  # Dovecot derives a new mailbox's UIDVALIDITY from the clock
    recreate_archive(["new one"])
    second = run_ok(client, SYNC, *account.ids)
    (archive_again,) = [f for f in second["folders"] if f["folder"] == "Archive"]
    assert archive_again["uidvalidity"] != archive["uidvalidity"]
    assert (archive_again["stored"], archive_again["reset"]) == (1, True)
    rows = messages(fleet.db_engine, account.account_id, folder="Archive")
    assert [(m.subject, m.uidvalidity) for m in rows] == [("new one", archive_again["uidvalidity"])]


def test_a_send_queued_before_the_outbox_is_stored_and_sent_once(
    client, make_account, mail, db_engine
):
    # An upgrade finds send_email tasks that carry the message itself (in Redis, or waiting in
    # their retries): they are stored in the outbox and sent, not rejected and lost.
    sender, recipient = make_account(), make_account()
    message = {**HAM, "to": [recipient.address]}
    result = client.send_task(SEND, args=[*sender.ids, message])
    value = result.get(timeout=30)
    assert (value["status"], value["accepted"], value["duplicate"]) == ("sent", 1, False)
    domain = sender.address.rpartition("@")[2]
    assert value["message_id"] == f"<{result.id}@{domain}>"  # what the old release made
    assert len(mail.smtp.delivered(value["message_id"])) == 1

    # Delivered again (a redelivery of that old task): the stored outcome, no second mail.
    result.forget()  # so that the next result read is the second run's
    again = client.send_task(SEND, args=[*sender.ids, message], task_id=result.id)
    assert again.get(timeout=30)["duplicate"] is True
    assert len(mail.smtp.delivered(value["message_id"])) == 1
    with Session(db_engine) as session:
        row = session.scalar(select(SentMessage).where(SentMessage.id == value["outbox_id"]))
        assert (row.status, row.content_hash is not None) == ("sent", True)
