"""Mail passwords never leave memory in plaintext: not in the worker's log (at DEBUG), not in
task results in Redis, not in any stored row."""

import subprocess

import pytest
from mailworker.db.models import Message
from mailworker.settings import load_settings
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.fixtures.outbox import submit
from tests.fixtures.servers import PG_BIN

pytestmark = pytest.mark.slow

SYNC = "mailworker.tasks.sync.sync_mailbox"
CLASSIFY = "mailworker.tasks.spam.classify_spam"
DELETE = "mailworker.tasks.delete.delete_messages"


def database_dump(postgres_server) -> str:
    return subprocess.run(
        [
            str(PG_BIN / "pg_dump"), "-h", "127.0.0.1", "-p", str(postgres_server.port),
            "-U", "postgres", "--data-only", "mailworker",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


def redis_values(client) -> str:
    return "\n".join(
        (client.get(key) or b"").decode("utf-8", "replace")
        for key in client.scan_iter(count=500)
        if client.type(key) == b"string"
    )


def test_passwords_stay_out_of_logs_results_and_rows(
    fleet, make_account, smtp_server, postgres_server, redis_server
):
    alice, bob = make_account(), make_account()
    wrong = "Wr0ng-password-that-must-not-leak"
    locked_out = make_account(stored_password=wrong)
    fleet.configure(MAILWORKER_LOG_LEVEL="DEBUG")
    worker = fleet.start_worker()
    client = fleet.client()

    message = {"to": [bob.address], "subject": "hello", "body": "a message with no secret"}
    _, sent = submit(load_settings(fleet.env), client, alice, message)
    assert sent is not None
    assert sent.get(timeout=30)["status"] == "sent"
    assert client.send_task(SYNC, args=bob.ids).get(timeout=30)["stored"] == 1
    with Session(fleet.db_engine) as session:
        query = select(Message.id).where(Message.account_id == bob.account_id)
        message_id, *_ = session.scalars(query).all()
    classify = [bob.tenant_id, bob.user_id, [str(message_id)]]
    assert client.send_task(CLASSIFY, args=classify).get(timeout=30)["classified"] == 1
    assert (
        client.send_task(DELETE, args=[*bob.ids, [str(message_id)]]).get(timeout=30)["marked"] == 1
    )
    failed = client.send_task(SYNC, args=locked_out.ids)
    assert type(failed.get(timeout=30, propagate=False)).__name__ == "AuthenticationFailed"

    broker_db = int(fleet.env["MAILWORKER_BROKER_URL"].rpartition("/")[2])
    results = redis_values(redis_server.client(db=broker_db + 1))
    log = worker.log
    rows = database_dump(postgres_server)
    # The scans are not vacuous: each place holds what these tasks wrote.
    assert failed.id in results
    assert failed.id in log
    assert alice.address in rows
    assert "gAAAAA" in rows  # Fernet tokens: the passwords, encrypted

    secrets = {
        "alice's mailbox password": alice.password,
        "bob's mailbox password": bob.password,
        "the relay password": smtp_server.password,
        "a wrong stored password": wrong,
    }
    for what, secret in secrets.items():
        assert secret not in log, f"{what} is in the worker log"
        assert secret not in results, f"{what} is in a task result"
        assert secret not in rows, f"{what} is in the database"
