"""What send promises under faults, at the application's DEFAULT settings (SMTP timeout 30 s,
final-reply timeout 600 s, retry window 24 h), against the real aiosmtpd and Dovecot:

- a relay slow to answer the final "." is waited for, and the message is sent once;
- a connection dropped after the data went out is `unknown`: recorded, failed, never resent;
- a Message-ID is one message: other content under it is refused, the same content is
  idempotent; a malformed or non-ASCII one is refused before anything is stored;
- the outbox: task arguments and results carry ids and counts, a message above the size limit
  is refused at submit, a lost publish and an exhausted retry chain are picked up by the sweeper,
  and a send past its retry window fails saying so, also when an attempt finds it before the
  sweeper does (one just inside it is sent);
- the lock's connection lost before the data ends (the attempt's writes run on it): nothing is
  delivered, and the attempt still records `deferred`, on a new connection;
- a client process submitting sends subscribes to none of their results (a long-lived one would
  otherwise hold a subscription per send and replay them all after a broker reconnect).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email
import email.policy
import json
import socket
import subprocess
import threading
import time
import uuid
from datetime import timedelta
from email.generator import BytesGenerator
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from mailworker.db.engine import get_engine
from mailworker.db.locks import advisory_lock
from mailworker.db.models import SentMessage
from mailworker.errors import InvalidTaskArguments, PermanentError, TransientError
from mailworker.services import outbox
from mailworker.services.access import owned_access
from mailworker.services.send import send
from mailworker.settings import load_settings
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from tests.fixtures.outbox import SEND, submit
from tests.fixtures.servers import (
    MAILWORKER,
    VENV_BIN,
    celery_client,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.slow

RESUBMIT = "mailworker.tasks.periodic.resubmit_due_sends"


@pytest.fixture(scope="module")
def defaults(default_env):
    """Settings at the defaults (app_env shortens timeouts and retries; not here)."""
    settings = load_settings(default_env)
    assert (settings.smtp_timeout, settings.smtp_final_reply_timeout) == (30, 600)
    assert settings.send_retry_window == 86400
    return settings


def ids(account) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    return uuid.UUID(account.tenant_id), uuid.UUID(account.user_id), uuid.UUID(account.account_id)


def store(settings, account, message: dict) -> outbox.Submission:
    return outbox.store(settings, *ids(account), message)


def attempt(settings, account, outbox_id: uuid.UUID) -> dict:
    """One send_email attempt, in this process (what the task runs after its checks)."""
    return send(settings, owned_access(settings, *ids(account)), outbox_id, "test-attempt")


def row_of(db_engine, outbox_id) -> SentMessage:
    with Session(db_engine) as session:
        row = session.get(SentMessage, outbox_id)
        assert row is not None
        session.expunge(row)
        return row


def rows_of(db_engine, account) -> list[SentMessage]:
    with Session(db_engine) as session:
        query = select(SentMessage).where(SentMessage.account_id == account.account_id)
        return list(session.scalars(query))


def test_slow_final_reply_is_waited_for_and_sent_once(
    defaults, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "slow relay"})
    started = time.monotonic()
    with smtp_server.replying_late(35):  # longer than the 30 s SMTP timeout
        value = attempt(defaults, alice, entry.outbox_id)
    assert time.monotonic() - started >= 35
    assert (value["status"], value["accepted"], value["duplicate"]) == ("sent", 1, False)
    assert len(smtp_server.delivered(entry.message_id)) == 1
    row = row_of(db_engine, entry.outbox_id)
    assert (row.status, row.attempts, row.content) == ("sent", 1, None)


def test_final_reply_timeout_is_an_unknown_outcome_not_a_retry(
    defaults, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    short = dataclasses.replace(defaults, smtp_final_reply_timeout=2.0)
    entry = store(short, alice, {"to": [bob.address], "body": "no answer in time"})
    with smtp_server.replying_late(5), pytest.raises(PermanentError) as error:
        attempt(short, alice, entry.outbox_id)
    assert not isinstance(error.value, TransientError)
    assert "unknown" in str(error.value)
    assert "NOT resent" in str(error.value)
    assert "no reply within 2 s to the end of the message data" in str(error.value)
    assert row_of(db_engine, entry.outbox_id).status == "unknown"


def test_connection_dropped_after_data_is_unknown_and_never_resent(
    defaults, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    spec = {"to": [bob.address], "subject": "once", "body": "the reply is lost"}
    entry = store(defaults, alice, spec)
    with smtp_server.dropping_reply(), pytest.raises(PermanentError, match="NOT resent"):
        attempt(defaults, alice, entry.outbox_id)
    row = row_of(db_engine, entry.outbox_id)
    assert (row.status, row.attempts) == ("unknown", 1)
    assert "may have accepted it" in row.error
    assert len(smtp_server.delivered(entry.message_id)) == 1  # the server did take it

    # A redelivered task and a resubmission of the same message both refuse to resend.
    with pytest.raises(PermanentError, match="NOT resent"):
        attempt(defaults, alice, entry.outbox_id)
    with pytest.raises(PermanentError, match="unknown send outcome"):
        store(defaults, alice, {**spec, "message_id": entry.message_id})
    assert len(smtp_server.delivered(entry.message_id)) == 1


def test_a_reply_cut_off_after_the_data_is_unknown_not_failed(
    defaults, make_account, smtp_server, db_engine
):
    # smtplib reads the "25" of a broken-off "250" as reply code 25: the server may have the
    # message, so the row must say unknown (a `failed` send is one a user may submit again).
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "half a reply"})
    with smtp_server.cutting_reply(), pytest.raises(PermanentError, match="NOT resent") as error:
        attempt(defaults, alice, entry.outbox_id)
    assert "cut-off or malformed reply" in str(error.value)
    assert row_of(db_engine, entry.outbox_id).status == "unknown"
    assert len(smtp_server.delivered(entry.message_id)) == 1


def test_failure_before_the_data_ends_is_deferred_and_sent_later(
    defaults, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "try again"})
    with smtp_server.failing(1, "451 4.3.0 Try again later"), pytest.raises(TransientError):
        attempt(defaults, alice, entry.outbox_id)
    row = row_of(db_engine, entry.outbox_id)
    assert row.status == "deferred"
    assert row.next_attempt_at is not None
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"
    assert len(smtp_server.delivered(entry.message_id)) == 1


# Messages whose wire form takes the generator's every turn: MIME alternatives, 8-bit text, lines
# that start with "." (stuffed on the wire), a folded non-ASCII subject, a Bcc that stays off it.
WIRE_SPECS = [
    {"to": ["reader@remote.example"], "subject": "plain", "body": "one line\n.two\n"},
    {
        "to": ["Reader <reader@remote.example>", "other@remote.example"],
        "cc": "Carol <carol@remote.example>",
        "bcc": ["hidden@remote.example"],
        "subject": "Gr\u00fc\u00dfe aus dem B\u00fcro, " * 6,
        "body": "Zeile eins\n.Zeile mit Punkt\n\u00c4rger \u00fcber Umlaute\n" * 20,
        "html": "<p>rich</p>\n.<p>dot</p>\n" * 20,
    },
]


def as_the_default_policy_writes_it(stored: bytes) -> bytes:
    """The stored message as email.policy.default parses and writes it, CRLF, without Bcc."""
    message = email.message_from_bytes(stored, policy=email.policy.default)
    del message["Bcc"]
    buffer = BytesIO()
    BytesGenerator(buffer, policy=email.policy.default.clone(linesep="\r\n")).flatten(message)
    return buffer.getvalue()


@pytest.mark.parametrize("spec", WIRE_SPECS, ids=["plain", "alternatives"])
def test_the_wire_carries_the_stored_message_byte_for_byte(
    defaults, make_account, smtp_server, db_engine, spec
):
    """What send parses and reads on the way (its header caches, the envelope) changes no byte
    of what the server receives (aiosmtpd hands it over with the dots unstuffed)."""
    alice = make_account()
    entry = store(defaults, alice, spec)
    stored = row_of(db_engine, entry.outbox_id).content
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"
    (delivery,) = smtp_server.delivered(entry.message_id)
    expected = as_the_default_policy_writes_it(stored)
    received, trace = delivery.data, delivery.data[: -len(expected)]
    assert received.endswith(expected), (received[len(trace) :], expected)
    assert trace.startswith(b"Return-Path: ")
    assert trace.count(b"\r\n") == 3  # the trace headers the server adds, nothing else
    assert b"hidden@" not in received
    envelope = {*spec["to"], spec.get("cc", "")} | set(spec.get("bcc", []))
    addresses = {value.rpartition("<")[2].rstrip(">") for value in envelope if value}
    assert set(delivery.rcpt_tos) == addresses


def test_same_message_id_other_content_is_refused_same_content_is_idempotent(
    defaults, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    message_id = f"<{uuid.uuid4()}@tenant-a.test>"
    first = {"to": [bob.address], "subject": "v1", "body": "first", "message_id": message_id}
    entry = store(defaults, alice, first)
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"

    for other in ({**first, "body": "second"}, {**first, "to": [alice.address]}):
        with pytest.raises(InvalidTaskArguments, match="already used for a different message"):
            store(defaults, alice, other)
    again = store(defaults, alice, first)
    assert (again.outbox_id, again.status, again.queued) == (entry.outbox_id, "sent", False)
    value = attempt(defaults, alice, entry.outbox_id)
    assert (value["status"], value["duplicate"]) == ("sent", True)
    assert len(smtp_server.delivered(message_id)) == 1
    assert len(rows_of(db_engine, alice)) == 1


@pytest.mark.parametrize(
    "message_id", ["<r\u00e9sum\u00e9@tenant-a.test>", "<a b@c>", "<@x>", "<a@b>>", "<a@b\r\n>"]
)
def test_malformed_message_id_is_refused_before_anything_is_stored(
    defaults, make_account, db_engine, message_id
):
    alice = make_account()
    spec = {"to": ["bob@example.org"], "body": "x", "message_id": message_id}
    with pytest.raises(InvalidTaskArguments, match="message_id"):
        store(defaults, alice, spec)
    assert rows_of(db_engine, alice) == []


def test_message_above_the_size_limit_is_refused_at_submit(defaults, make_account, db_engine):
    alice = make_account()
    body = "x" * 76 + "\n"
    spec = {"to": ["bob@example.org"], "body": body * (defaults.max_message_size // len(body))}
    with pytest.raises(InvalidTaskArguments, match="above MAILWORKER_MAX_MESSAGE_SIZE"):
        store(defaults, alice, spec)
    assert rows_of(db_engine, alice) == []


@pytest.fixture
def mail(dovecot, smtp_server) -> SimpleNamespace:
    return SimpleNamespace(dovecot=dovecot, smtp=smtp_server)


def test_task_carries_ids_and_its_result_no_mail_content(
    app_env, app_settings, shared_worker, make_account, mail
):
    alice, bob = make_account(), make_account()
    spec = {
        "to": [bob.address],
        "bcc": ["hidden@example.org"],
        "subject": "Payroll",
        "body": "$",
        "message_id": f"<{uuid.uuid4()}@tenant-a.test>",
    }
    client = celery_client(app_env)
    published: list[tuple[list[str], Any]] = []

    def publish(args: list[str]) -> None:
        published.append((args, client.send_task(SEND, args=args)))

    entry = outbox.submit_send(app_settings, *ids(alice), spec, publish=publish)
    assert [args for args, _ in published] == [[*alice.ids, str(entry.outbox_id)]]
    again = outbox.submit_send(app_settings, *ids(alice), spec, publish=publish)
    assert (again.outbox_id, again.queued, len(published)) == (entry.outbox_id, False, 1)
    value = published[0][1].get(timeout=30)
    assert (value["status"], value["accepted"], value["refused"]) == ("sent", 2, 0)
    assert value["outbox_id"] == str(entry.outbox_id)
    (stored,) = mail.dovecot.mailbox(alice.address, "Sent")
    assert b"Bcc: hidden@example.org" in stored.raw  # the Sent copy keeps Bcc
    (delivered,) = mail.smtp.delivered(entry.message_id)
    assert b"hidden@example.org" not in delivered.data  # the wire does not
    shown = json.dumps(value) + shared_worker.log
    for secret in (bob.address, "hidden@example.org", "Payroll"):
        assert secret not in shown


@pytest.mark.usefixtures("shared_worker")
def test_lost_publish_is_sent_by_the_sweeper(
    app_env, app_settings, make_account, smtp_server, db_engine
):
    alice, bob = make_account(), make_account()
    redis_down = celery_client(
        {**app_env, "MAILWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )
    entry, result = submit(app_settings, redis_down, alice, {"to": [bob.address], "body": "x"})
    assert result is None
    assert entry.queued
    assert not entry.published
    assert row_of(db_engine, entry.outbox_id).status == "queued"

    value = celery_client(app_env).send_task(RESUBMIT).get(timeout=30)
    assert value["resubmitted"] >= 1
    wait_until(lambda: row_of(db_engine, entry.outbox_id).status == "sent", 30, "the send")
    assert len(smtp_server.delivered(entry.message_id)) == 1


def test_deferred_send_whose_retries_ran_out_is_resubmitted(
    defaults, make_account, smtp_server, db_engine
):
    """Celery's retries of a send end (or their publish is lost); the row says deferred."""
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "after the outage"})
    with smtp_server.failing(1), pytest.raises(TransientError):
        attempt(defaults, alice, entry.outbox_id)
    published: list[list[str]] = []
    outbox.resubmit_due(defaults, published.append)
    assert [*alice.ids, str(entry.outbox_id)] not in published  # its own retry comes first

    with Session(db_engine) as session, session.begin():
        session.execute(
            update(SentMessage)
            .where(SentMessage.id == entry.outbox_id)
            .values(next_attempt_at=func.now() - timedelta(minutes=1))
        )
    key = outbox.lock_of(uuid.UUID(alice.account_id), entry.message_id)
    with advisory_lock(defaults, key) as held:  # an attempt is running: left alone
        assert held
        published.clear()
        outbox.resubmit_due(defaults, published.append)
        assert [*alice.ids, str(entry.outbox_id)] not in published
    published.clear()
    outbox.resubmit_due(defaults, published.append)
    assert [*alice.ids, str(entry.outbox_id)] in published
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"


def test_a_send_no_attempt_took_is_published_again_after_twice_the_redelivery_delay(
    defaults, make_account, smtp_server, db_engine
):
    """A stored send whose task never started (its delivery died in a killed worker's BRPOP, or
    a Redis failover lost it) waits 2 x (visibility timeout + restore interval), 140 s at the
    defaults, for the sweeper; then one attempt sends it and a second copy of the task sends
    nothing."""
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "lost on its way"})
    row = row_of(db_engine, entry.outbox_id)
    assert row.next_attempt_at - row.queued_at == timedelta(seconds=140)
    published: list[list[str]] = []
    outbox.resubmit_due(defaults, published.append)
    assert [*alice.ids, str(entry.outbox_id)] not in published  # its task comes first

    with Session(db_engine) as session, session.begin():
        session.execute(
            update(SentMessage)
            .where(SentMessage.id == entry.outbox_id)
            .values(next_attempt_at=func.now(), queued_at=func.now() - timedelta(seconds=140))
        )
    outbox.resubmit_due(defaults, published.append)
    assert published.count([*alice.ids, str(entry.outbox_id)]) == 1
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"
    assert attempt(defaults, alice, entry.outbox_id)["duplicate"] is True
    assert len(smtp_server.delivered(entry.message_id)) == 1


def test_send_past_its_retry_window_fails_saying_so(defaults, make_account, smtp_server, db_engine):
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "too late"})
    later = store(defaults, alice, {"to": [bob.address], "body": "too late as well"})
    with Session(db_engine) as session, session.begin():
        session.execute(
            update(SentMessage)
            .where(SentMessage.id.in_([entry.outbox_id, later.outbox_id]))
            .values(status="deferred", error="SMTP server refused the connection")
            .values(queued_at=func.now() - timedelta(days=1, hours=1))
        )
    assert outbox.give_up_expired(defaults) >= 1
    row = row_of(db_engine, entry.outbox_id)
    assert row.status == "failed"
    assert row.error.startswith("gave up after 86400 s (MAILWORKER_SEND_RETRY_WINDOW)")
    assert "refused the connection" in row.error
    with pytest.raises(PermanentError, match="gave up after"):
        attempt(defaults, alice, entry.outbox_id)
    assert smtp_server.delivered(entry.message_id) == []

    # Resubmitting the unchanged message is asking again: a new window, and it is sent.
    again = store(
        defaults,
        alice,
        {"to": [bob.address], "body": "too late"} | {"message_id": entry.message_id},
    )
    assert (again.outbox_id, again.status, again.queued) == (entry.outbox_id, "queued", True)
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"


def test_an_attempt_fails_a_send_past_its_window_and_sends_one_inside_it(
    defaults, make_account, smtp_server, db_engine
):
    """The attempt's own check of the retry window (the sweeper may not have run yet)."""
    alice, bob = make_account(), make_account()
    late = store(defaults, alice, {"to": [bob.address], "body": "a day and a minute"})
    in_time = store(defaults, alice, {"to": [bob.address], "body": "a day less a minute"})
    no_content = store(defaults, alice, {"to": [bob.address], "body": "stored before the outbox"})
    with Session(db_engine) as session, session.begin():
        for entry, age in ((late, timedelta(days=1, minutes=1)), (in_time, timedelta(hours=23))):
            session.execute(
                update(SentMessage)
                .where(SentMessage.id == entry.outbox_id)
                .values(status="deferred", error="SMTP server refused the connection")
                .values(queued_at=func.now() - age)
            )
        session.execute(
            update(SentMessage).where(SentMessage.id == no_content.outbox_id).values(content=None)
        )

    with pytest.raises(PermanentError, match="gave up after 86400 s"):
        attempt(defaults, alice, late.outbox_id)
    row = row_of(db_engine, late.outbox_id)
    assert (row.status, row.attempts, row.next_attempt_at) == ("failed", 0, None)
    assert "refused the connection" in row.error
    assert smtp_server.delivered(late.message_id) == []

    with pytest.raises(PermanentError, match="has no stored message"):
        attempt(defaults, alice, no_content.outbox_id)
    untouched = row_of(db_engine, no_content.outbox_id)
    assert (untouched.status, untouched.attempts) == ("queued", 0)

    assert attempt(defaults, alice, in_time.outbox_id)["status"] == "sent"
    row = row_of(db_engine, in_time.outbox_id)
    assert (row.status, row.attempts, row.error, row.next_attempt_at) == ("sent", 1, None, None)
    assert len(smtp_server.delivered(in_time.message_id)) == 1


def test_the_lock_connection_lost_before_the_data_ends_is_deferred_on_a_new_one(
    defaults, make_account, smtp_server, db_engine
):
    """The attempt's writes run on its advisory lock's connection. Its backend terminated just
    before the attempt records the final "." (the lock is gone with it): the attempt stops
    before the final ".", and records `deferred` on a pool connection (still fenced)."""
    alice, bob = make_account(), make_account()
    entry = store(defaults, alice, {"to": [bob.address], "body": "the lock dies first"})
    engine = get_engine(defaults)
    terminated: list[int] = []

    def terminate(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "SET data_sent_at=now()" in statement and not terminated:
            pid = cursor.connection.get_backend_pid()
            with db_engine.connect() as other:
                assert other.scalar(select(func.pg_terminate_backend(pid, 10_000)))
            terminated.append(pid)

    event.listen(engine, "before_cursor_execute", terminate)
    try:
        with pytest.raises(TransientError, match="could not record that the message data ends"):
            attempt(defaults, alice, entry.outbox_id)
    finally:
        event.remove(engine, "before_cursor_execute", terminate)
    assert terminated
    assert smtp_server.delivered(entry.message_id) == []
    row = row_of(db_engine, entry.outbox_id)
    assert (row.status, row.attempts, row.data_sent_at) == ("deferred", 1, None)
    assert row.error.startswith("could not record that the message data ends")
    assert attempt(defaults, alice, entry.outbox_id)["status"] == "sent"
    assert len(smtp_server.delivered(entry.message_id)) == 1


def send_email_cli(env: dict[str, str], account, message: dict, *options: str):
    return subprocess.run(
        [MAILWORKER, "task", "send-email", *account.ids, "--json", *options],
        input=json.dumps(message),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.usefixtures("shared_worker")
def test_cli_send_email_stores_queues_and_refuses_bad_input(app_env, make_account, db_engine):
    alice, bob = make_account(), make_account()
    ran = send_email_cli(app_env, alice, {"to": [bob.address], "body": "hi"}, "--wait", "30")
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    # Without "state" the CLI stored the send but could not publish its task (it says why on
    # stderr; the sweeper would queue it): seen once in CI under `pytest -n 4`, cause unknown.
    assert "state" in shown, f"not published: {shown}; stderr: {ran.stderr}"
    assert (shown["state"], shown["result"]["status"]) == ("SUCCESS", "sent")
    assert row_of(db_engine, uuid.UUID(shown["outbox_id"])).status == "sent"

    ran = send_email_cli(
        app_env, alice, {"to": [bob.address], "body": "x", "message_id": "<\u00e9@x>"}
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "message_id" in ran.stderr
    assert "ASCII" in ran.stderr

    down = {**app_env, "MAILWORKER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    ran = send_email_cli(down, alice, {"to": [bob.address], "body": "while Redis is down"})
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    assert shown["task"] is None
    assert row_of(db_engine, uuid.UUID(shown["outbox_id"])).status == "queued"


class DropAtData:
    """A minimal SMTP server that takes any login, MAIL and RCPT, then closes the connection on
    DATA, before the client sent a byte of the message."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.commands: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                with connection, connection.makefile("rwb") as stream:
                    self._session(stream)

    def _session(self, stream) -> None:
        stream.write(b"220 drop.test ESMTP\r\n")
        stream.flush()
        for line in stream:
            verb = line.split(b" ", 1)[0].strip().upper().decode()
            self.commands.append(verb)
            if verb == "DATA":
                return  # closes the connection
            replies = {
                "EHLO": b"250-drop.test\r\n250 AUTH PLAIN LOGIN\r\n",
                "AUTH": b"235 2.7.0 ok\r\n",
                "QUIT": b"221 bye\r\n",
            }
            stream.write(replies.get(verb, b"250 ok\r\n"))
            stream.flush()

    def close(self) -> None:
        self.listener.close()


def test_connection_dropped_before_the_data_is_deferred_not_unknown(
    defaults, make_account, db_engine
):
    server = DropAtData()
    try:
        alice = make_account(smtp_port=server.port, smtp_security="plain")
        entry = store(defaults, alice, {"to": ["bob@example.org"], "body": "x"})
        with pytest.raises(TransientError, match="closed the connection"):
            attempt(defaults, alice, entry.outbox_id)
    finally:
        server.close()
    assert server.commands[-3:] == ["MAIL", "RCPT", "DATA"]
    row = row_of(db_engine, entry.outbox_id)
    assert (row.status, row.attempts) == ("deferred", 1)


# A client process: submit_send as an integrator calls it, then one send_task whose result it
# keeps (Celery subscribes to that task's result channel); the SUBSCRIBE commands the server ran
# meanwhile. Counted by the server, because a dropped AsyncResult unsubscribes again at once.
CLIENT = """
import json, sys, time, uuid
from mailworker.celery_app import app
from mailworker.redis_client import redis_from_url
from mailworker.settings import load_settings
from mailworker.tasks.send import submit_send

settings = load_settings()
redis = redis_from_url(settings.broker_url, settings)

def subscribes():
    return redis.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)

before = subscribes()
ids = [uuid.UUID(value) for value in sys.argv[1:4]]
entry = submit_send(settings, *ids, {"to": [sys.argv[4]], "body": "from a client process"})
kept = app.send_task(sys.argv[5], retry=False)
deadline = time.monotonic() + 10
while subscribes() == before and time.monotonic() < deadline:
    time.sleep(0.1)
time.sleep(1)  # a SUBSCRIBE still on its way
print(json.dumps({"outbox_id": str(entry.outbox_id), "subscribes": subscribes() - before}))
"""


@pytest.mark.usefixtures("shared_worker")
def test_a_client_process_submitting_sends_subscribes_to_no_result(
    app_env, make_account, db_engine
):
    alice, bob = make_account(), make_account()
    ran = subprocess.run(
        [str(VENV_BIN / "python"), "-c", CLIENT, *alice.ids, bob.address, RESUBMIT],
        env=app_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    # One SUBSCRIBE: the kept result's (so the count sees this process's); none for the send.
    assert shown["subscribes"] == 1, shown
    outbox_id = uuid.UUID(shown["outbox_id"])
    wait_until(lambda: row_of(db_engine, outbox_id).status == "sent", 30, "the send")
