"""Every message a sync stores is classified without being asked: the sync queues classify_spam
after its commit, the classify sweep queues what a lost publish left unscored, and a doubled
classification moves each spam message once and reports nothing alarming.

Real Dovecot, PostgreSQL, Redis and worker processes, at the application's default settings
(each test on broker databases of its own). About 15-25 s each, mostly worker start-up.
"""

import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from mailworker.db.models import Message
from mailworker.mail.imap import ImapSession
from mailworker.services.access import owned_access
from mailworker.services.sync import sync_account
from mailworker.settings import load_settings
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tests.fixtures.servers import celery_client, free_port, wait_until

pytestmark = pytest.mark.slow

SYNC = "mailworker.tasks.sync.sync_mailbox"
CLASSIFY = "mailworker.tasks.spam.classify_spam"
SWEEP = "mailworker.tasks.periodic.classify_unscored"


def spam(number: int) -> bytes:
    return (
        f"From: Prize Office <winner@lottery.example>\r\nTo: someone@tenant-a.test\r\n"
        f"Subject: YOU HAVE WON THE LOTTERY {number}\r\nMessage-ID: <s{number}@lottery.example>"
        "\r\n\r\nDear friend, click here to claim your prize by wire transfer.\r\n"
    ).encode()


def ham(number: int) -> bytes:
    return (
        f"From: Ann <ann@example.org>\r\nSubject: Minutes of meeting {number}\r\n"
        f"Message-ID: <h{number}@example.org>\r\n\r\nSee you at ten.\r\n"
    ).encode()


def mailbox_with_spam_and_ham(make_account, dovecot, count: int = 3) -> Any:
    account = make_account()
    for number in range(count):
        dovecot.deliver(account.address, spam(number))
        dovecot.deliver(account.address, ham(number))
    return account


def rows(db_engine, account) -> list[Message]:
    with Session(db_engine) as session:
        query = select(Message).where(Message.account_id == account.account_id)
        return list(session.scalars(query.order_by(Message.folder, Message.uid)))


def classified_and_moved(db_engine, account, spam_count: int) -> bool:
    found = [m for m in rows(db_engine, account) if m.folder == "INBOX"]
    return (
        all(m.classified_at is not None for m in found)
        and sorted(m.state for m in found) == ["junk"] * spam_count + ["present"] * spam_count
    )


def assert_spam_in_junk_once(
    db_engine, dovecot, account, count: int = 3, already_in_junk: int = 0
) -> None:
    for row in rows(db_engine, account):
        if row.folder == "Junk":  # synced from Junk: left as it is
            assert (row.state, row.classified_at, row.classify_queued_at) == ("present", None, None)
            continue
        assert row.action_state is None, (row.subject, row.action_state, row.action_error)
        expected = ("junk", "Junk", True) if "LOTTERY" in row.subject else ("present", None, False)
        assert (row.state, row.moved_to, row.is_spam) == expected, row.subject
    assert dovecot.subjects(account.address, "Junk") == sorted(
        f"YOU HAVE WON THE LOTTERY {n}" for n in [*range(count), *[9] * already_in_junk]
    )
    assert dovecot.subjects(account.address) == sorted(
        f"Minutes of meeting {n}" for n in range(count)
    )


def alarming(log: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]


def test_a_synced_mailbox_ends_scored_with_its_spam_in_junk(
    default_fleet, make_account, dovecot, db_engine
):
    account = mailbox_with_spam_and_ham(make_account, dovecot)
    worker = default_fleet.start_worker()
    assert load_settings(default_fleet.env).sync_batch_size == 100  # the defaults: one batch

    value = default_fleet.client().send_task(SYNC, args=account.ids).get(timeout=60)
    assert (value["stored"], value["classify_queued"], value["classify_deferred"]) == (6, 6, 0)
    wait_until(lambda: classified_and_moved(db_engine, account, 3), 60, "the sync's classification")
    assert_spam_in_junk_once(db_engine, dovecot, account)
    assert all(m.classify_queued_at is None for m in rows(db_engine, account))  # no sweep
    assert alarming(worker.log) == []


def test_a_lost_classify_publish_is_caught_by_the_sweep(
    default_fleet, make_account, dovecot, db_engine
):
    account = mailbox_with_spam_and_ham(make_account, dovecot, count=2)
    with ImapSession(dovecot.endpoint(account.address)) as imap:  # already where spam goes
        imap.append("Junk", spam(9))
    settings = load_settings(default_fleet.env)
    assert (settings.classify_grace, settings.classify_sweep_interval) == (600, 300)
    # The sync commits, then finds no broker for its follow-up (as when Redis goes down right
    # after the commit, or the worker dies before publishing).
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    dead = celery_client({**default_fleet.env, "MAILWORKER_BROKER_URL": unreachable})

    def publish(tenant_id: uuid.UUID, user_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
        args = [str(tenant_id), str(user_id), list(map(str, ids))]
        dead.send_task(CLASSIFY, args=args, retry=False)  # as tasks.spam.publish_classify

    access = owned_access(settings, *map(uuid.UUID, account.ids))
    value = sync_account(settings, access, ["INBOX", "Junk"], classify=publish)
    # Junk's message is stored, not classified: nothing to move (services/spam.py).
    assert (value["stored"], value["classify_queued"], value["classify_deferred"]) == (5, 0, 4)
    assert all(m.classified_at is None for m in rows(db_engine, account))

    # A sweep-only worker first: what the sweep queues stays in the spam queue.
    sweeper = default_fleet.start_worker(MAILWORKER_QUEUES="periodic")
    client = default_fleet.client()
    # Younger than MAILWORKER_CLASSIFY_GRACE: the sync's own classification may still be coming.
    client.send_task(SWEEP).get(timeout=30)
    assert all(m.classify_queued_at is None for m in rows(db_engine, account))

    past_grace = func.now() - timedelta(seconds=settings.classify_grace + 1)
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(Message)
            .where(Message.account_id == account.account_id)
            .values(synced_at=past_grace)
        )
        # And one spam message whose classification died between its verdict and its move.
        # One in the INBOX: the spam synced from Junk is never swept (random ids pick either).
        first_spam = min(
            m.id for m in rows(db_engine, account) if "LOTTERY" in m.subject and m.folder == "INBOX"
        )
        session.execute(
            update(Message)
            .where(Message.id == first_spam)
            .values(spam_score=9.0, is_spam=True, spam_reasons=[], classified_at=past_grace)
        )
    swept = client.send_task(SWEEP).get(timeout=30)
    assert swept["unscored"] >= 3
    assert swept["spam_not_moved"] >= 1
    assert swept["queued"] >= 4
    stamps = [m.classify_queued_at for m in rows(db_engine, account)]
    assert [m.folder for m in rows(db_engine, account) if m.classify_queued_at is None] == ["Junk"]
    # Queued and not yet classified (a backlog): not queued again before another grace.
    client.send_task(SWEEP).get(timeout=30)
    assert [m.classify_queued_at for m in rows(db_engine, account)] == stamps

    # The sweep covers every tenant: in a long test session it may also queue rows other tests
    # left unscored for longer than the grace, hence the generous wait.
    default_fleet.start_worker(MAILWORKER_QUEUES="spam")
    wait_until(lambda: classified_and_moved(db_engine, account, 2), 120, "the swept classification")
    assert_spam_in_junk_once(db_engine, dovecot, account, count=2, already_in_junk=1)
    assert "600 s after the sync or the verdict" in sweeper.log


def test_a_doubled_classification_moves_each_spam_message_once(
    default_fleet, make_account, dovecot, db_engine
):
    account = mailbox_with_spam_and_ham(make_account, dovecot)
    settings = load_settings(default_fleet.env)
    access = owned_access(settings, *map(uuid.UUID, account.ids))
    sync_account(settings, access, ["INBOX"])  # stores, queues nothing
    ids = [str(m.id) for m in rows(db_engine, account)]
    worker = default_fleet.start_worker()
    assert settings.concurrency == 4  # both run at once
    client = default_fleet.client()
    args = [account.tenant_id, account.user_id, ids]

    # The sweep racing a slow classification, or a redelivered one: two tasks, same ids.
    start = threading.Barrier(2)
    results: list[Any] = [None, None]

    def send(index: int) -> None:
        start.wait()
        results[index] = celery_client(default_fleet.env).send_task(CLASSIFY, args=args)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    values = [result.get(timeout=60) for result in results]
    # And a third once both are done, as a late redelivery would.
    values.append(client.send_task(CLASSIFY, args=args).get(timeout=60))

    for value in values:
        assert (value["classified"], value["spam"], value["not_moved"]) == (6, 3, {}), value
        assert value["moved_to_junk"] + value["already_in_junk"] == 3, value
    assert sum(value["moved_to_junk"] for value in values) == 3
    assert values[-1]["already_in_junk"] == 3
    # Same verdicts every time.
    assert values[0]["scores"] == values[1]["scores"] == values[2]["scores"]
    assert_spam_in_junk_once(db_engine, dovecot, account)
    assert alarming(worker.log) == []
