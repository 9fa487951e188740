"""SMTP connection reuse per account (mail/kept_connections.py) at the DEFAULT settings, against the
real aiosmtpd and Dovecot: one session carries an account's sends, never another account's; a
kept connection the server closed is replaced before anything is sent on it; any failure inside
a transaction closes the connection with the outcome send had without reuse (`deferred`,
`unknown`); a changed password or MAILWORKER_SMTP_IDLE_REUSE=0 gets a session per need. The
same for the IMAP session of the copies to Sent (MAILWORKER_IMAP_IDLE_REUSE).

The SMTP server numbers its connections (Delivery.connection) and counts accepted logins, one
per session; Dovecot's log counts IMAP logins. The tests read those.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from mailworker.crypto import encrypt_password
from mailworker.db.models import MailAccount
from mailworker.errors import PermanentError, TransientError
from mailworker.mail.kept_connections import SessionKey
from mailworker.mail.smtp import build_message, kept_smtp_connections, send_message
from mailworker.services.send import kept_imap, kept_smtp
from mailworker.settings import load_settings
from sqlalchemy import update
from sqlalchemy.orm import Session

from tests.fixtures.outbox import submit
from tests.test_send_guarantees import attempt, row_of, store

pytestmark = pytest.mark.slow


@pytest.fixture
def reuse(default_env) -> SimpleNamespace:
    """The settings at the defaults (as test_send_guarantees' `defaults`) and the process's
    kept connections at them, emptied of other tests' ones (the cache is per process and
    bounded: a full one keeps nothing more)."""
    defaults = load_settings(default_env)
    assert (defaults.smtp_timeout, defaults.smtp_final_reply_timeout) == (30, 600)
    kept = kept_smtp(defaults)
    assert (kept.idle_seconds, kept.max_messages, kept.max_connections) == (60, 100, 20)
    assert defaults.imap_idle_reuse == 60
    kept.close_all()
    kept_imap(defaults).close_all()
    return SimpleNamespace(settings=defaults, sessions=kept)


def send_one(settings, account, to: str, body: str = "x"):
    """Store and send one message of `account`; its outbox entry."""
    entry = store(settings, account, {"to": [to], "body": body})
    assert attempt(settings, account, entry.outbox_id)["status"] == "sent"
    return entry


def connection_of(smtp_server, entry) -> int:
    (delivery,) = smtp_server.delivered(entry.message_id)
    return delivery.connection


def key_of(settings, account) -> SessionKey:
    from mailworker.services.access import owned_access  # noqa: PLC0415

    access = owned_access(
        settings,
        uuid.UUID(account.tenant_id),
        uuid.UUID(account.user_id),
        uuid.UUID(account.account_id),
    )
    return SessionKey.of(str(access.account_id), access.smtp)


def test_sends_of_one_account_share_one_session_and_two_accounts_never_share(
    reuse, make_account, smtp_server
):
    defaults, sessions = reuse.settings, reuse.sessions
    alice, carol, bob = make_account(), make_account(), make_account()
    logins = smtp_server.logins
    sent = {alice.account_id: [], carol.account_id: []}
    for round_number in range(3):
        for account in (alice, carol):
            sent[account.account_id].append(send_one(defaults, account, bob.address))
            assert sessions.idle_count(key_of(defaults, account)) == 1, round_number

    alice_connections = {connection_of(smtp_server, e) for e in sent[alice.account_id]}
    carol_connections = {connection_of(smtp_server, e) for e in sent[carol.account_id]}
    assert len(alice_connections) == 1, smtp_server.log()
    assert len(carol_connections) == 1, smtp_server.log()
    # The same relay login for both accounts, and still a session of each one's own.
    assert alice_connections != carol_connections
    assert smtp_server.logins - logins == 2
    for entries in sent.values():
        for entry in entries:
            assert len(smtp_server.delivered(entry.message_id)) == 1


def test_a_kept_connection_the_server_closed_is_replaced_and_the_send_delivered_once(
    reuse, make_account, smtp_server, db_engine
):
    defaults, sessions = reuse.settings, reuse.sessions
    alice, bob = make_account(), make_account()
    first = send_one(defaults, alice, bob.address)
    assert sessions.idle_count(key_of(defaults, alice)) == 1
    assert smtp_server.drop_connections() >= 1  # as a server that drops idle clients does

    logins = smtp_server.logins
    second = send_one(defaults, alice, bob.address, "after the drop")
    third = send_one(defaults, alice, bob.address, "on the new session")
    assert len(smtp_server.delivered(second.message_id)) == 1
    row = row_of(db_engine, second.outbox_id)
    assert (row.status, row.attempts) == ("sent", 1)
    assert connection_of(smtp_server, second) != connection_of(smtp_server, first)
    assert connection_of(smtp_server, third) == connection_of(smtp_server, second)
    assert smtp_server.logins - logins == 1, smtp_server.log()


# The fault inside the second transaction on a kept connection, and send's outcome for it.
FAULTS = {"451 to RCPT": "deferred", "451 to DATA": "deferred", "cut final reply": "unknown"}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_inside_a_transaction_closes_the_kept_connection_outcome_unchanged(
    reuse, make_account, smtp_server, db_engine, fault
):
    defaults, sessions, status = reuse.settings, reuse.sessions, FAULTS[fault]
    alice, bob = make_account(), make_account()
    key = key_of(defaults, alice)
    first = send_one(defaults, alice, bob.address)
    assert sessions.idle_count(key) == 1
    logins = smtp_server.logins

    entry = store(defaults, alice, {"to": [bob.address], "body": fault})
    if fault == "cut final reply":
        with smtp_server.cutting_reply(), pytest.raises(PermanentError, match="NOT resent") as err:
            attempt(defaults, alice, entry.outbox_id)
        assert not isinstance(err.value, TransientError)
        assert "cut-off or malformed reply" in str(err.value)
        # It went out on the kept connection, without a new login.
        assert connection_of(smtp_server, entry) == connection_of(smtp_server, first)
    else:
        command = fault.rpartition(" ")[2]
        with smtp_server.failing(1, command=command), pytest.raises(TransientError):
            attempt(defaults, alice, entry.outbox_id)
        assert smtp_server.delivered(entry.message_id) == []
    assert smtp_server.logins == logins  # the failed transaction ran on the kept connection
    assert row_of(db_engine, entry.outbox_id).status == status
    assert sessions.idle_count(key) == 0  # closed, not given back

    after = send_one(defaults, alice, bob.address, "the next one")
    assert smtp_server.logins - logins == 1  # a new session
    assert connection_of(smtp_server, after) != connection_of(smtp_server, first)
    if status == "deferred":  # and its retry sends it, once
        assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"
        assert len(smtp_server.delivered(entry.message_id)) == 1
    else:
        with pytest.raises(PermanentError, match="NOT resent"):
            attempt(defaults, alice, entry.outbox_id)
        assert len(smtp_server.delivered(entry.message_id)) == 1


def set_smtp_login(db_engine, app_settings, account, username: str, password: str) -> None:
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(MailAccount)
            .where(MailAccount.id == uuid.UUID(account.account_id))
            .values(
                smtp_username=username,
                smtp_password_encrypted=encrypt_password(app_settings, password),
            )
        )


def test_a_changed_password_never_finds_the_old_session(
    reuse, make_account, smtp_server, db_engine, app_settings
):
    defaults = reuse.settings
    alice, bob = make_account(), make_account()
    first = send_one(defaults, alice, bob.address)

    # A wrong password now: refused by the server, not carried by the kept session.
    set_smtp_login(db_engine, app_settings, alice, smtp_server.username, "not-the-password")
    entry = store(defaults, alice, {"to": [bob.address], "body": "wrong password"})
    with pytest.raises(PermanentError, match="rejected the login"):
        attempt(defaults, alice, entry.outbox_id)
    assert smtp_server.delivered(entry.message_id) == []
    assert row_of(db_engine, entry.outbox_id).status == "failed"

    # A new valid login: a session of its own, then kept for the next send.
    username, password = f"relay-{secrets.token_hex(4)}@mailworker.test", secrets.token_hex(8)
    smtp_server.add_login(username, password)
    set_smtp_login(db_engine, app_settings, alice, username, password)
    logins = smtp_server.logins
    second = send_one(defaults, alice, bob.address, "new password")
    third = send_one(defaults, alice, bob.address, "new password again")
    assert smtp_server.logins - logins == 1
    assert connection_of(smtp_server, second) != connection_of(smtp_server, first)
    assert connection_of(smtp_server, third) == connection_of(smtp_server, second)


def test_reuse_off_opens_a_session_per_mail(reuse, make_account, smtp_server):
    off = dataclasses.replace(reuse.settings, smtp_idle_reuse=0.0)
    alice, bob = make_account(), make_account()
    logins, quits = smtp_server.logins, smtp_server.quits
    entries = [send_one(off, alice, bob.address, f"mail {n}") for n in range(3)]
    assert len({connection_of(smtp_server, e) for e in entries}) == 3
    assert smtp_server.logins - logins == 3
    assert smtp_server.quits - quits == 3  # each one ended with QUIT, as before reuse
    assert kept_smtp(off).idle_count() == 0


# -- the bounds and the process rules, on send_message itself -----------------------------------


def mail(smtp_server, recipient: str, body: str = "x"):
    return build_message(
        {"to": [recipient], "subject": "reuse", "body": body}, sender="alice@tenant-a.test"
    )


def test_an_idle_connection_is_closed_with_quit_after_the_idle_time(smtp_server, dovecot):
    kept = kept_smtp_connections(1.0, 100, 4)
    endpoint = smtp_server.endpoint()
    bob = dovecot.new_user()
    quits = smtp_server.quits
    send_message(endpoint, mail(smtp_server, bob.address), sessions=kept, account="a")
    assert kept.idle_count() == 1
    deadline = time.monotonic() + 10
    while kept.idle_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kept.idle_count() == 0
    deadline = time.monotonic() + 5
    while smtp_server.quits == quits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert smtp_server.quits - quits == 1, smtp_server.log()


def test_a_connection_carries_at_most_max_messages_and_the_cache_at_most_max_connections(
    smtp_server, dovecot
):
    kept = kept_smtp_connections(60.0, 2, 1)
    endpoint = smtp_server.endpoint()
    bob = dovecot.new_user()
    logins = smtp_server.logins
    results = [
        send_message(endpoint, mail(smtp_server, bob.address, str(n)), sessions=kept, account="a")
        for n in range(4)
    ]
    numbers = [connection_of(smtp_server, result) for result in results]
    assert numbers[0] == numbers[1] != numbers[2] == numbers[3]
    assert smtp_server.logins - logins == 2
    assert kept.idle_count() == 0  # the 2nd message of each connection closed it

    send_message(endpoint, mail(smtp_server, bob.address), sessions=kept, account="a")
    send_message(endpoint, mail(smtp_server, bob.address), sessions=kept, account="b")
    assert kept.idle_count() == 1  # the cache was full when b's came back: closed
    kept.close_all()


def test_threads_never_share_a_connection_at_once(smtp_server, dovecot):
    kept = kept_smtp_connections(60.0, 100, 8)
    endpoint = smtp_server.endpoint()
    bob = dovecot.new_user()
    logins = smtp_server.logins
    results, errors = [], []

    def sender(thread: int) -> None:
        for n in range(5):
            try:
                message = mail(smtp_server, bob.address, f"{thread}-{n}")
                results.append(send_message(endpoint, message, sessions=kept, account="a"))
            except Exception as error:  # reported below
                errors.append(error)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(results) == 20
    for result in results:
        assert len(smtp_server.delivered(result.message_id)) == 1
    # At most one session per thread, kept and handed on between their 20 sends.
    assert smtp_server.logins - logins <= 4
    assert len({connection_of(smtp_server, result) for result in results}) <= 4
    kept.close_all()


def test_a_kept_connection_does_not_survive_a_fork(smtp_server, dovecot):
    endpoint = smtp_server.endpoint()
    bob = dovecot.new_user()
    kept = kept_smtp_connections(60.0, 100, 20)
    send_message(endpoint, mail(smtp_server, bob.address), sessions=kept, account="fork")
    key = SessionKey.of("fork", endpoint)
    assert kept.idle_count(key) == 1
    pid = os.fork()
    if pid == 0:  # the child: neither the parent's cache nor its connection
        ok = False
        try:
            child = kept_smtp_connections(60.0, 100, 20)
            ok = child is not kept and child.idle_count() == 0 and kept.take(key, 10) is None
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert kept.idle_count(key) == 1  # the parent's is still there, and still works
    result = send_message(endpoint, mail(smtp_server, bob.address), sessions=kept, account="fork")
    assert len(smtp_server.delivered(result.message_id)) == 1
    kept.close_all()


# -- in a worker, as deployed -------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_keeps_its_sessions_between_tasks_and_says_goodbye_at_shutdown(
    default_fleet, make_account, smtp_server, dovecot, pool
):
    default_fleet.configure(
        MAILWORKER_POOL=pool, MAILWORKER_CONCURRENCY="1", MAILWORKER_QUEUES="send"
    )
    settings = load_settings(default_fleet.env)
    worker = default_fleet.start_worker()
    client = default_fleet.client()
    alice, bob = make_account(), make_account()
    entries = []
    for n in range(3):
        entry, result = submit(settings, client, alice, {"to": [bob.address], "body": f"{n}"})
        assert result is not None
        assert result.get(timeout=60)["status"] == "sent", worker.log
        entries.append(entry)
    (number,) = {connection_of(smtp_server, entry) for entry in entries}
    assert imap_logins(dovecot, alice.address, at_least=1) == 1  # the Sent copies' session
    assert logouts(dovecot, alice.address) == 0

    # A warm stop as systemd does it (KillMode=mixed: SIGTERM to the main process only).
    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGTERM)
    worker.process.wait(60)
    deadline = time.monotonic() + 5
    while f"QUIT on connection {number}" not in smtp_server.log():
        assert time.monotonic() < deadline, f"{smtp_server.log()}\n{worker.log}"
        time.sleep(0.05)
    while logouts(dovecot, alice.address) != 1:
        assert time.monotonic() < deadline, f"{dovecot.log()}\n{worker.log}"
        time.sleep(0.05)


def logouts(dovecot, address: str) -> int:
    """IMAP sessions of `address` that ended with LOGOUT (Dovecot's log)."""
    text = dovecot.log_file.read_text(errors="replace")
    return sum(
        1
        for line in text.splitlines()
        if f"imap({address})" in line and "Disconnected: Logged out" in line
    )


# -- the Sent copy's IMAP session ----------------------------------------------------------------


def imap_logins(dovecot, address: str, at_least: int = 0) -> int:
    """Dovecot's count of logins of `address` (its log), once it has logged `at_least`."""
    line = f"Login: user=<{address}>"
    deadline = time.monotonic() + 5
    while dovecot.log_file.read_text(errors="replace").count(line) < at_least:
        assert time.monotonic() < deadline, dovecot.log()
        time.sleep(0.05)
    time.sleep(0.3)  # a later login still on its way to the log
    return dovecot.log_file.read_text(errors="replace").count(line)


def test_the_sent_copies_of_one_account_share_one_imap_session(
    reuse, make_account, smtp_server, dovecot
):
    alice, bob = make_account(), make_account()
    entries = [send_one(reuse.settings, alice, bob.address, f"mail {n}") for n in range(3)]
    assert imap_logins(dovecot, alice.address, at_least=1) == 1
    copies = {stored.message_id for stored in dovecot.mailbox(alice.address, "Sent")}
    assert copies == {entry.message_id for entry in entries}


def test_a_kept_imap_session_the_server_closed_is_replaced_and_the_copy_made_once(
    reuse, make_account, smtp_server, dovecot, db_engine
):
    alice, bob = make_account(), make_account()
    first = send_one(reuse.settings, alice, bob.address)
    assert imap_logins(dovecot, alice.address, at_least=1) == 1
    kicked = subprocess.run(
        ["doveadm", "-c", str(dovecot.config_file), "kick", alice.address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert kicked.returncode == 0, kicked.stderr

    second = send_one(reuse.settings, alice, bob.address, "after the kick")
    third = send_one(reuse.settings, alice, bob.address, "on the new session")
    assert row_of(db_engine, second.outbox_id).copied_to_sent is True
    assert imap_logins(dovecot, alice.address, at_least=2) == 2  # one new session, kept
    sent = [stored.message_id for stored in dovecot.mailbox(alice.address, "Sent")]
    assert sorted(sent) == sorted(e.message_id for e in (first, second, third))


def test_imap_reuse_off_logs_in_for_every_copy(reuse, make_account, smtp_server, dovecot):
    off = dataclasses.replace(reuse.settings, imap_idle_reuse=0.0)
    alice, bob = make_account(), make_account()
    for n in range(3):
        send_one(off, alice, bob.address, f"mail {n}")
    assert imap_logins(dovecot, alice.address, at_least=3) == 3
    assert len(dovecot.mailbox(alice.address, "Sent")) == 3
