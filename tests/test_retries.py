"""Transient failures retry with exponential backoff and then succeed; permanent ones fail at
once. Real outages: Dovecot stopped and started again, an SMTP server answering 4xx or 5xx."""

import itertools
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from mailworker.db.models import SentMessage, TaskAttempt
from mailworker.mail.imap import ImapSession
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.fixtures.outbox import submit
from tests.fixtures.servers import attempts, celery_client, wait_until

pytestmark = pytest.mark.slow

SEND = "mailworker.tasks.send.send_email"
SYNC = "mailworker.tasks.sync.sync_mailbox"


def finished_attempts(db_engine, task_id: str, count: int) -> list[TaskAttempt]:
    return wait_until(
        lambda: (
            (rows := attempts(db_engine, task_id))
            and len([a for a in rows if a.state != "started"]) >= count
            and rows
        ),
        15,
        f"{count} finished attempt(s) of {task_id}",
    )


def sent_row(db_engine, account_id: str, message_id: str) -> SentMessage:
    with Session(db_engine) as session:
        return session.scalar(
            select(SentMessage).where(
                SentMessage.account_id == account_id, SentMessage.message_id == message_id
            )
        )


@pytest.fixture(scope="module")
def client(app_env, shared_worker):
    return celery_client(app_env)


def test_imap_outage_is_retried_with_backoff_then_succeeds(fleet, make_account, dovecot):
    account = make_account()
    dovecot.deliver(account.address, b"Subject: during the outage\r\n\r\nhello\r\n")
    fleet.configure(
        MAILWORKER_RETRY_JITTER="false",  # exact delays: 1, 2, 3 (capped), 3, ... seconds
        MAILWORKER_RETRY_BACKOFF_BASE="1",
        MAILWORKER_RETRY_BACKOFF_MAX="3",
        MAILWORKER_MAX_RETRIES="8",
    )
    worker = fleet.start_worker()
    dovecot.stop()
    try:
        result = fleet.client().send_task(SYNC, args=account.ids)
        finished_attempts(fleet.db_engine, result.id, 3)
    finally:
        dovecot.start()
    assert result.get(timeout=30)["stored"] == 1, worker.log[-2000:]

    rows = finished_attempts(fleet.db_engine, result.id, 4)
    states = [a.state for a in rows]
    assert states[-1] == "succeeded"
    assert set(states[:-1]) == {"retrying"}
    assert len(states) >= 4
    assert all("refused the connection" in a.error for a in rows[:-1]), [a.error for a in rows]
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(rows)]
    expected = [min(3, 2**n) for n in range(len(gaps))]
    assert all(gap >= 0.9 * want for gap, want in zip(gaps, expected, strict=True)), gaps
    assert [a.retries for a in rows] == list(range(len(rows)))
    assert "retry 1 in 1 s (" in worker.log


def test_smtp_4xx_is_retried_and_sent_once(
    client, app_settings, make_account, smtp_server, db_engine
):
    alice = make_account()
    message = {"to": ["someone@example.org"], "body": "hello", "message_id": f"<{uuid.uuid4()}@t>"}
    with smtp_server.failing(count=2, reply="451 4.3.0 Try again later"):
        _, result = submit(app_settings, client, alice, message)
        value = result.get(timeout=60)
    assert value["status"] == "sent"
    assert len(smtp_server.delivered(message["message_id"])) == 1
    states = [a.state for a in finished_attempts(db_engine, result.id, 3)]
    assert states == ["retrying", "retrying", "succeeded"]
    row = sent_row(db_engine, alice.account_id, message["message_id"])
    assert (row.status, row.attempts) == ("sent", 3)


def test_smtp_5xx_fails_at_once_and_may_be_sent_again(
    client, app_settings, make_account, smtp_server, db_engine
):
    alice = make_account()
    message = {"to": ["someone@example.org"], "body": "hello", "message_id": f"<{uuid.uuid4()}@t>"}
    with smtp_server.failing(count=1, reply="554 5.7.1 Message rejected"):
        _, result = submit(app_settings, client, alice, message)
        error = result.get(timeout=30, propagate=False)
    assert type(error).__name__ == "PermanentError"
    assert "554 5.7.1 Message rejected" in str(error)
    assert [a.state for a in finished_attempts(db_engine, result.id, 1)] == ["failed"]
    assert sent_row(db_engine, alice.account_id, message["message_id"]).status == "failed"
    assert smtp_server.delivered(message["message_id"]) == []

    # The server never took it, so submitting the same message again sends it.
    entry, again = submit(app_settings, client, alice, message)
    assert entry.queued
    assert again.get(timeout=30)["status"] == "sent"
    assert len(smtp_server.delivered(message["message_id"])) == 1


def test_wrong_mailbox_password_fails_at_once(client, make_account, db_engine):
    account = make_account(stored_password="not-the-password")
    result = client.send_task(SYNC, args=account.ids)
    error = result.get(timeout=30, propagate=False)
    assert type(error).__name__ == "AuthenticationFailed", repr(error)
    assert "not-the-password" not in str(error)
    assert [a.state for a in finished_attempts(db_engine, result.id, 1)] == ["failed"]


def sent_elsewhere(dovecot, account, message_id: str, *, in_sent: bool) -> bytes:
    """A message this account sent; with `in_sent`, its copy is in the Sent folder."""
    copy = EmailMessage()
    copy["From"], copy["To"], copy["Message-ID"] = account.address, "x@example.org", message_id
    copy.set_content("sent by an attempt that died")
    if in_sent:
        with ImapSession(dovecot.endpoint(account.address)) as imap:
            imap.append("Sent", copy.as_bytes())
    return copy.as_bytes()


def store_row(db_engine, account, message_id: str, **fields) -> uuid.UUID:
    """The outbox row a worker killed after its final "." left (`fields` say how far it got)."""
    outbox_id = uuid.uuid4()
    with Session(db_engine) as session, session.begin():
        session.add(
            SentMessage(
                id=outbox_id,
                tenant_id=account.tenant_id,
                user_id=account.user_id,
                account_id=account.account_id,
                message_id=message_id,
                recipients=["x@example.org"],
                subject="",
                attempts=1,
                data_sent_at=datetime.now(UTC),
                copied_to_sent=False,
                **fields,
            )
        )
    return outbox_id


def test_interrupted_send_found_in_sent_is_recorded_not_resent(
    client, make_account, dovecot, smtp_server, db_engine
):
    """The state a worker killed after its final "." and the Sent copy but before its `sent`
    commit leaves (the release before this one committed `sent` after the copy)."""
    alice = make_account()
    message_id = f"<{uuid.uuid4()}@tenant-a.test>"
    sent_elsewhere(dovecot, alice, message_id, in_sent=True)
    outbox_id = store_row(db_engine, alice, message_id, status="sending")
    value = client.send_task(SEND, args=[*alice.ids, str(outbox_id)]).get(timeout=30)
    assert (value["status"], value["recovered"]) == ("sent", True)
    assert smtp_server.delivered(message_id) == []
    assert sent_row(db_engine, alice.account_id, message_id).status == "sent"


@pytest.mark.parametrize("already_copied", [False, True], ids=["copy-missing", "copy-made"])
def test_send_killed_between_its_sent_commit_and_sent_copy_gets_one_copy(
    client, make_account, dovecot, db_engine, already_copied
):
    """The state a worker killed after it committed `sent` leaves: the content still stored, no
    copy recorded. The redelivered task sends nothing and leaves exactly one copy in Sent, even
    if the dead attempt had appended it just before it died."""
    alice = make_account()
    message_id = f"<{uuid.uuid4()}@tenant-a.test>"
    content = sent_elsewhere(dovecot, alice, message_id, in_sent=already_copied)
    outbox_id = store_row(
        db_engine, alice, message_id, status="sent", content=content, accepted=["x@example.org"]
    )
    value = client.send_task(SEND, args=[*alice.ids, str(outbox_id)]).get(timeout=30)
    assert (value["status"], value["duplicate"], value["copied_to_sent"]) == ("sent", True, True)
    row = sent_row(db_engine, alice.account_id, message_id)
    # No new attempt: nothing went to SMTP.
    assert (row.status, row.attempts, row.copied_to_sent, row.content) == ("sent", 1, True, None)
    with ImapSession(dovecot.endpoint(alice.address)) as imap:
        imap.select("Sent")
        assert len(imap.search_header("Message-ID", message_id)) == 1


def test_database_outage_is_retried_then_succeeds(fleet, make_account, dovecot, postgres_server):
    account = make_account()
    dovecot.deliver(account.address, b"Subject: while PostgreSQL was down\r\n\r\nhello\r\n")
    fleet.configure(MAILWORKER_RETRY_JITTER="false", MAILWORKER_MAX_RETRIES="10")
    worker = fleet.start_worker()
    postgres_server.stop()
    try:
        result = fleet.client().send_task(SYNC, args=account.ids)
        wait_until(lambda: worker.log.count("database unavailable") >= 2, 30, "two failed attempts")
    finally:
        postgres_server.start()
    assert result.get(timeout=30)["stored"] == 1, worker.log[-2000:]
    assert "task ledger not written" in worker.log  # the ledger is best effort
