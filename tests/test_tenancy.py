"""Cross-tenant and malformed arguments: rejected at once by a real worker, never retried,
logged with the task id and the reason, and nothing of the other tenant touched."""

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from mailworker.db.models import FolderSyncState, MailAccount, Message, TaskAttempt, Tenant, User
from mailworker.errors import TenantMismatch
from mailworker.services import outbox
from mailworker.tenancy import owned_account_row
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.fixtures.servers import celery_client, wait_until

pytestmark = pytest.mark.slow

SEND = "mailworker.tasks.send.send_email"
SYNC = "mailworker.tasks.sync.sync_mailbox"
CLASSIFY = "mailworker.tasks.spam.classify_spam"
DELETE = "mailworker.tasks.delete.delete_messages"


@pytest.fixture(scope="module")
def client(app_env, shared_worker):
    return celery_client(app_env)


@pytest.fixture(scope="module")
def victim(make_account, dovecot, client, db_engine):
    """Tenant B: a synced mailbox with two messages, which tenant A must never reach."""
    account = make_account()
    for number in range(2):
        private = (
            f"From: Ann <ann@example.org>\r\nTo: {account.address}\r\n"
            f"Message-ID: <private{number}@example.org>\r\nSubject: private {number}\r\n\r\n"
            "secret\r\n"
        )
        dovecot.deliver(account.address, private.encode())
    result = client.send_task(SYNC, args=account.ids)
    assert result.get(timeout=30)["stored"] == 2
    # The sync queued their classification: wait for it, so nothing changes them afterwards.
    wait_until(
        lambda: None not in [score for *_, score in untouched(db_engine, account)],
        30,
        "the classification",
    )
    return account


@pytest.fixture(scope="module")
def intruder(make_account):
    return make_account()


def attempts(db_engine, task_id: str) -> list[TaskAttempt]:
    with Session(db_engine) as session:
        return list(
            session.scalars(
                select(TaskAttempt)
                .where(TaskAttempt.task_id == task_id)
                .order_by(TaskAttempt.started_at)
            )
        )


@dataclass(frozen=True)
class Rejections:
    """Runs tasks through the shared worker and checks they were rejected, not retried."""

    client: Any
    db_engine: Any
    worker: Any

    def check(self, name: str, args: list, kwargs: dict | None = None) -> str:
        result = self.client.send_task(name, args=args, kwargs=kwargs or {})
        error = result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE", error
        assert type(error).__name__ in {"TenantMismatch", "InvalidTaskArguments"}, repr(error)
        # The ledger is written after the result; wait for the attempt to be closed.
        rows = wait_until(
            lambda: [a for a in attempts(self.db_engine, result.id) if a.state != "started"],
            10,
            "the attempt to be recorded",
        )
        assert [(a.state, a.retries) for a in rows] == [("rejected", 0)]
        line = f"task {result.id} rejected (not retried)"
        wait_until(lambda: line in self.worker.log, 10, "the rejection in the worker log")
        return str(error)


@pytest.fixture
def rejections(client, db_engine, shared_worker) -> Rejections:
    return Rejections(client, db_engine, shared_worker)


def untouched(db_engine, victim) -> list[tuple[str, str, float | None]]:
    with Session(db_engine) as session:
        rows = session.scalars(
            select(Message).where(Message.account_id == victim.account_id).order_by(Message.uid)
        )
        return [(m.subject, m.state, m.spam_score) for m in rows]


def test_foreign_account_is_rejected_for_every_task(
    rejections, db_engine, dovecot, victim, intruder
):
    before = untouched(db_engine, victim)
    assert [(subject, state) for subject, state, _ in before] == [
        ("private 0", "present"),
        ("private 1", "present"),
    ]
    foreign = [intruder.tenant_id, intruder.user_id, victim.account_id]

    message = rejections.check(SYNC, foreign)
    assert f"account {victim.account_id} does not belong to user {intruder.user_id}" in message
    rejections.check(DELETE, [*foreign, [str(uuid.uuid4())]])
    rejections.check(SEND, [*foreign, str(uuid.uuid4())])
    # The victim's ids under the intruder's tenant, and the intruder's user with the victim's.
    rejections.check(SYNC, [intruder.tenant_id, victim.user_id, victim.account_id])
    rejections.check(SYNC, [victim.tenant_id, intruder.user_id, victim.account_id])
    with Session(db_engine) as session:
        query = select(Message.id).where(Message.account_id == victim.account_id)
        victim_ids = [str(message_id) for message_id in session.scalars(query)]
    message = rejections.check(CLASSIFY, [intruder.tenant_id, intruder.user_id, victim_ids])
    assert "2 message(s) do not belong" in message

    assert untouched(db_engine, victim) == before
    assert len(dovecot.mailbox(victim.address)) == 2
    assert dovecot.mailbox(victim.address, "Trash") == []


def test_another_accounts_outbox_entry_is_rejected(rejections, app_settings, victim, intruder):
    victim_ids = (uuid.UUID(i) for i in victim.ids)
    draft = outbox.store(app_settings, *victim_ids, {"to": ["x@example.org"], "body": "x"})
    message = rejections.check(SEND, [*intruder.ids, str(draft.outbox_id)])
    assert f"outbox entry {draft.outbox_id} is not a message of this account" in message
    # Nor can the intruder store a message under the victim's account.
    foreign = (uuid.UUID(i) for i in (intruder.tenant_id, intruder.user_id, victim.account_id))
    with pytest.raises(TenantMismatch):
        outbox.store(app_settings, *foreign, {"to": ["x@example.org"], "body": "x"})


def test_inactive_tenant_is_rejected(rejections, db_engine, make_account):
    account = make_account()
    with Session(db_engine) as session, session.begin():
        session.execute(update(Tenant).where(Tenant.id == account.tenant_id).values(active=False))
    message = rejections.check(SYNC, account.ids)
    assert "is not active" in message
    with Session(db_engine) as session:
        assert session.get(FolderSyncState, (account.account_id, "INBOX")) is None


NIL = str(uuid.UUID(int=0))
VALID_MESSAGE = {"to": ["bob@example.org"], "subject": "s", "body": "b"}


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "reason"),
    [
        (SYNC, ["not-a-uuid", NIL, NIL], {}, "tenant_id is not a UUID"),
        (SYNC, [NIL, 42, NIL], {}, "user_id must be a UUID string"),
        (SYNC, [NIL, NIL], {}, "missing a required argument: 'account_id'"),
        (SYNC, [NIL, NIL, NIL, NIL], {}, "too many positional arguments"),
        (DELETE, [NIL, NIL, NIL, []], {}, "message_ids must be a non-empty list"),
        # Bare UIDs (the old signature) are refused: they do not say which messages were seen.
        (DELETE, [NIL, NIL, NIL, [1]], {}, "message_ids[] must be a UUID string"),
        (DELETE, [NIL, NIL, NIL, ["1"]], {}, "message_ids[] is not a UUID"),
        (DELETE, [NIL, NIL, NIL, [NIL]], {"permanent": "yes"}, "permanent must be true or false"),
        (DELETE, [NIL, NIL, NIL, [NIL]], {"folder": "a\r\nb"}, "control characters"),
        (CLASSIFY, [NIL, NIL, "x"], {}, "message_ids must be a non-empty list"),
        (CLASSIFY, [NIL, NIL, ["nope"]], {}, "message_ids[] is not a UUID"),
        (SEND, [NIL, NIL, NIL, "hello"], {}, "outbox_id is not a UUID"),
        # A message object is what a release before the outbox queued: still checked first.
        (SEND, [NIL, NIL, NIL, VALID_MESSAGE], {}, f"tenant {NIL} does not exist"),
        (SEND, [NIL, NIL, NIL, NIL], {}, f"tenant {NIL} does not exist"),
    ],
)
def test_malformed_arguments_are_rejected_without_retry(
    rejections, name: str, args: list, kwargs: dict[str, Any], reason: str
):
    message = rejections.check(name, args, kwargs)
    assert reason in message


def test_owned_account_refuses_each_mismatch_with_its_reason(db_engine, make_account):
    """The ownership check (one query) names the first thing that does not match, in order."""
    alice, bob = make_account(), make_account()
    ids = {name: uuid.UUID(value) for name, value in zip(("t", "u", "a"), alice.ids, strict=True)}
    other = {name: uuid.UUID(value) for name, value in zip(("t", "u", "a"), bob.ids, strict=True)}
    t, u, a = ids["t"], ids["u"], ids["a"]
    with Session(db_engine) as session:
        tenant_name = session.scalar(select(Tenant.name).where(Tenant.id == t))
    colleague = uuid.UUID(make_account(tenant_name).account_id)  # same tenant, another user

    def refusal(tenant: uuid.UUID, user: uuid.UUID, account: uuid.UUID) -> str:
        with db_engine.connect() as connection, pytest.raises(TenantMismatch) as raised:
            owned_account_row(connection, tenant, user, account)
        return str(raised.value)

    def set_active(model: Any, row_id: uuid.UUID, active: bool) -> None:
        with Session(db_engine) as session, session.begin():
            session.execute(update(model).where(model.id == row_id).values(active=active))

    with db_engine.connect() as connection:
        row = owned_account_row(connection, t, u, a)
        assert (row.id, row.tenant_id, row.user_id, row.active) == (a, t, u, True)
    nil = uuid.UUID(int=0)
    assert refusal(nil, u, a) == f"tenant {nil} does not exist"
    assert refusal(t, other["u"], a) == f"user {other['u']} does not belong to tenant {t}"
    assert refusal(other["t"], u, a) == f"user {u} does not belong to tenant {other['t']}"
    assert refusal(t, u, other["a"]) == f"account {other['a']} does not belong to user {u}"
    assert refusal(t, u, nil) == f"account {nil} does not belong to user {u}"
    assert refusal(t, u, colleague) == f"account {colleague} does not belong to user {u}"
    set_active(MailAccount, a, False)
    assert refusal(t, u, a) == f"account {a} is not active"
    set_active(User, u, False)
    assert refusal(t, u, a) == f"user {u} is not active"
    set_active(Tenant, t, False)
    assert refusal(t, u, a) == f"tenant {t} is not active"
